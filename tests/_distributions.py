"""Hand-made installed distributions for plugin tests (shared by tests/ and tests/robustness/)."""

from __future__ import annotations

import textwrap
from pathlib import Path


def write_distribution(root: Path, name: str, entry_points: dict[str, dict[str, str]], module: str) -> Path:
    """An installed distribution ``name`` 0.1.0 under ``root``, with one module ``<name as identifier>_mod``."""
    identifier = name.replace("-", "_")
    dist_info = root / f"{identifier}-0.1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n", encoding="utf-8")
    sections = [
        f"[{group}]\n" + "".join(f"{ep} = {target}\n" for ep, target in entries.items())
        for group, entries in entry_points.items()
    ]
    (dist_info / "entry_points.txt").write_text("\n".join(sections), encoding="utf-8")
    (root / f"{identifier}_mod.py").write_text(textwrap.dedent(module), encoding="utf-8")
    return root
