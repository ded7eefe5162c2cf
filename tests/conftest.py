"""Shared fixtures: run the ``ib`` command in-process (fast) or in a fresh interpreter (isolated)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

# Wide enough that rich never wraps a table cell, so a row ("poly1 | ib-plugin-demo 0.1.0 | ...") stays on one line.
_COLUMNS = "250"


@dataclasses.dataclass
class CliResult:
    """Exit code and captured output of one ``ib`` invocation."""

    rc: int
    out: str
    err: str

    @property
    def output(self) -> str:
        return self.out + self.err

    def line_with(self, text: str) -> str:
        """The first output line that contains ``text`` (fails the test when there is none)."""
        for line in self.output.splitlines():
            if text in line:
                return line
        raise AssertionError(f"no output line contains {text!r}:\n{self.output}")


@pytest.fixture
def ib_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """``ib_cli("list", "losses")`` runs ``ibcore.cli.main`` in this process and captures its output.

    argparse's own exits (``--help``, ``--version``, usage errors) become the result's ``rc``.
    """
    from ibcore.cli import main

    monkeypatch.setenv("COLUMNS", _COLUMNS)

    def run(*args: str) -> CliResult:
        capsys.readouterr()  # drop anything printed before this call
        try:
            rc = main(list(args))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(rc, out, err)

    return run


def _user_plugins() -> dict[str, set[str]]:
    """Distributions other than this project that provide ibcore components here, by name, with where they are
    installed: plugins the user installed (``pip install examples/plugin-package``, a lab's own package). The
    suite must not depend on them."""
    from ibcore.registry import ENTRY_POINT_GROUPS, _entry_points, _normalise_dist

    found: dict[str, set[str]] = {}
    for group in ENTRY_POINT_GROUPS.values():
        for entry_point in _entry_points(group):
            dist = getattr(entry_point, "dist", None)
            if dist is not None and _normalise_dist(dist.name) != "ibcore":
                found.setdefault(_normalise_dist(dist.name), set()).add(str(getattr(dist, "_path", dist.name)))
    return found


USER_PLUGINS = _user_plugins()


def _hide_user_plugins() -> None:
    """In this process, discovery skips the user's installed plugins (tests may still put distributions of their
    own on sys.path): the registry sees what an environment with only this project installed would."""
    import ibcore.registry as registry

    hidden = {path for paths in USER_PLUGINS.values() for path in paths}
    if not hidden:
        return
    find = registry._entry_points

    def entry_points(group: str) -> list[Any]:
        return [ep for ep in find(group) if str(getattr(ep.dist, "_path", None)) not in hidden]

    registry._entry_points = entry_points  # type: ignore[assignment]


_hide_user_plugins()


def subprocess_env(python_path: Sequence[Path | str] = (), **env: str) -> dict[str, str]:
    """The environment of an isolated ``ib`` process: no inherited IB_* switches, wide output, and the user's
    installed plugins switched off (unless the test puts a distribution of that name on ``python_path``)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IB_") and k != "PYTHONPATH"}
    clean["COLUMNS"] = _COLUMNS
    if python_path:
        clean["PYTHONPATH"] = os.pathsep.join(str(p) for p in python_path)
    shipped = {_dist_name(info) for p in python_path for info in Path(p).glob("*.dist-info")}
    foreign = sorted(set(USER_PLUGINS) - shipped)
    given = [part for part in env.get("IB_DISABLE_PLUGINS", "").split(",") if part]
    clean.update(env)
    if foreign:
        clean["IB_DISABLE_PLUGINS"] = ",".join(given + foreign)
    return clean


def _dist_name(dist_info: Path) -> str:
    from ibcore.registry import _normalise_dist

    return _normalise_dist(dist_info.name.removesuffix(".dist-info").rsplit("-", 1)[0])


@pytest.fixture
def ib_subprocess(tmp_path: Path) -> Callable[..., CliResult]:
    """``ib_subprocess(["list"], python_path=[...], env={...})`` runs ``python -m ibcore.cli`` in a new process.

    The working directory is ``tmp_path`` (not the repository), so only what is installed or on
    ``python_path`` can be imported. ``code=`` runs ``python -c code`` instead of the CLI.
    """

    def run(
        args: Sequence[str] = (),
        *,
        python_path: Sequence[Path | str] = (),
        env: dict[str, str] | None = None,
        code: str | None = None,
        timeout: float = 120,
    ) -> CliResult:
        command = [sys.executable, "-c", code] if code is not None else [sys.executable, "-m", "ibcore.cli"]
        done = subprocess.run(
            [*command, *args],
            cwd=tmp_path,
            env=subprocess_env(python_path, **(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return CliResult(done.returncode, done.stdout, done.stderr)

    return run


@pytest.fixture
def float64() -> Iterator[None]:
    """Run a test in float64, where the fused and sequential paths must agree to rounding error."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
