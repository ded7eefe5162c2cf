"""The engine: ``run`` an experiment, ``resume`` an interrupted one."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ibcore.config import load_experiment
from ibcore.config.schema import Experiment
from ibcore.errors import TrainingError
from ibcore.files import atomic_write_text


def _run_dir(parent: Path, name: str) -> Path:
    """A new, writable run directory under ``parent``; fails before any training if it cannot be made."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for suffix in [""] + [f"-{i}" for i in range(1, 1000)]:
            candidate = parent / f"{name}-{stamp}{suffix}"
            try:
                candidate.mkdir()
                break
            except FileExistsError:
                continue
        probe = candidate / ".write-test"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"cannot write the run directory under {parent}: {exc.strerror or exc}") from exc
    return candidate


def run(
    source: Any,
    *,
    overrides: list[str] | None = None,
    out_dir: str | Path | None = None,
    quiet: bool = False,
) -> Any:
    """Validate ``source`` (path, mapping or Experiment) in full, then train all its runs together.

    Returns :class:`~ibcore.engine.trainer.Results`: the run directory and one row per run.
    """
    experiment = (
        source if isinstance(source, Experiment) and not overrides else load_experiment(source, overrides=overrides)
    )
    name = Path(source).stem if isinstance(source, (str, Path)) else "experiment"
    config_dir = str(Path(source).resolve().parent) if isinstance(source, (str, Path)) else None
    run_dir = _run_dir(Path(out_dir or experiment.trainer.out_dir), name)
    resolved = experiment.model_dump(mode="json")
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    atomic_write_text(run_dir / "origin.json", json.dumps({"config": str(source), "config_dir": config_dir}) + "\n")
    from ibcore.engine.trainer import Trainer  # torch is imported only once the config is valid

    trainer = Trainer(experiment, run_dir, quiet=quiet)
    return trainer.fit()


def resume(run_dir: str | Path, *, quiet: bool = False) -> Any:
    """Continue an interrupted experiment from its newest valid checkpoint."""
    from ibcore.engine.checkpoint import load_latest
    from ibcore.engine.trainer import Trainer

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise TrainingError(f"{run_dir} is not an ibcore run directory (no config.yaml)")
    origin: dict[str, Any] = {}
    try:
        origin = json.loads((run_dir / "origin.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    config_dir = origin.get("config_dir")
    if config_dir and config_dir not in sys.path and os.path.isdir(config_dir):
        sys.path.insert(0, config_dir)  # plugins: next to the original config file
    experiment = load_experiment(config)
    state = load_latest(run_dir / "checkpoints")
    trainer = Trainer(experiment, run_dir, quiet=quiet)
    trainer.restore(state)
    return trainer.fit()


__all__ = ["resume", "run"]
