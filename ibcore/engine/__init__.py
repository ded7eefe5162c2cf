"""The engine: ``run`` an experiment, ``resume`` an interrupted one (in one process or under ``torchrun``)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ibcore.config import load_experiment
from ibcore.config.schema import Experiment
from ibcore.config.validation import select_runs
from ibcore.errors import IbError, TrainingError
from ibcore.files import atomic_write_text

if TYPE_CHECKING:
    from ibcore.engine.distributed import Distributed


def resolved_config(experiment: Experiment) -> dict[str, Any]:
    """The experiment as written to ``config.yaml``: every default filled in, except inside stages.

    A stage changes only the fields it sets, and ``mixer: null`` there means "switch mixing off", so
    stages are written with exactly the fields they set (a filled-in null would switch mixing off
    after ``ib resume``).
    """
    resolved = experiment.model_dump(mode="json")
    for run, run_dump in zip(experiment.runs, resolved["runs"], strict=True):
        run_dump["stages"] = [stage.model_dump(mode="json", exclude_unset=True) for stage in run.stages]
    return resolved


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
    smoke: int | None = None,
    only: list[str] | None = None,
) -> Any:
    """Validate ``source`` (path, mapping or Experiment) in full, then train all its runs together.

    ``smoke=N`` trains only N batches of the first epoch, of each stage's first epoch and of the last one,
    then evaluates once on N batches: every run and stage is exercised in seconds, the numbers mean nothing.
    ``only`` keeps the runs with these names (the run directory's config.yaml then lists only those).

    Under ``torchrun`` every process calls this: rank 0 creates the run directory and tells the
    others its path. Returns :class:`~ibcore.engine.trainer.Results`: the run directory and one row per run.
    """
    experiment = (
        source if isinstance(source, Experiment) and not overrides else load_experiment(source, overrides=overrides)
    )
    name = Path(source).stem if isinstance(source, (str, Path)) else "experiment"
    if only:
        experiment = select_runs(experiment, only, source=str(source) if isinstance(source, (str, Path)) else None)
    config_dir = str(Path(source).resolve().parent) if isinstance(source, (str, Path)) else None
    # torch is imported only once the config is valid
    from ibcore.engine.distributed import init_distributed
    from ibcore.engine.trainer import Trainer, resolve_device

    def prepare() -> Path:
        run_dir = _run_dir(Path(out_dir or experiment.trainer.out_dir), name)
        resolved = resolved_config(experiment)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        origin = {"config": str(source), "config_dir": config_dir}
        atomic_write_text(run_dir / "origin.json", json.dumps(origin) + "\n")
        return run_dir

    distributed = init_distributed(experiment.trainer, resolve_device(experiment.trainer.device))
    try:
        distributed.local_batch(experiment.data.batch_size)  # refuse an uneven split before writing anything
        run_dir = _on_rank_zero(distributed, prepare)
        results = Trainer(experiment, run_dir, quiet=quiet, distributed=distributed, smoke=smoke).fit()
        distributed.barrier()  # no rank leaves the group while another still uses it (rank 0 writes the tables)
        return results
    finally:
        distributed.close()


def _on_rank_zero(distributed: Distributed, make_dir: Callable[[], Path]) -> Path:
    """``make_dir()`` on rank 0; every rank gets its path, or the error it raised."""
    if not distributed.enabled:
        return Path(make_dir())
    outcome: tuple[str, str]
    if distributed.is_main:
        try:
            outcome = ("ok", str(make_dir()))
        except IbError as exc:
            distributed.broadcast_object(("error", str(exc)))
            raise
    outcome = distributed.broadcast_object(outcome if distributed.is_main else None)
    if outcome[0] == "error":
        raise TrainingError(f"rank 0 could not prepare the run directory: {outcome[1]}")
    return Path(outcome[1])


def resume(run_dir: str | Path, *, quiet: bool = False) -> Any:
    """Continue an interrupted experiment from its newest valid checkpoint.

    Under ``torchrun`` every rank loads the same checkpoint (the run directory must be readable by
    every process); the world size and mode must be those the checkpoint was written with.
    """
    from ibcore.engine.checkpoint import load_latest
    from ibcore.engine.distributed import check_resume_world, init_distributed
    from ibcore.engine.trainer import Trainer, resolve_device

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
    distributed = init_distributed(experiment.trainer, resolve_device(experiment.trainer.device))
    try:
        check_resume_world(state, distributed, run_dir)  # before any data is loaded
        epochs = distributed.all_gather_object(int(state["epoch"]))
        if len(set(epochs)) != 1:
            raise TrainingError(f"the ranks found different latest checkpoints in {run_dir} (epochs {epochs})")
        trainer = Trainer(experiment, run_dir, quiet=quiet, distributed=distributed)
        trainer.restore(state)
        results = trainer.fit()
        del trainer
        distributed.barrier()
        return results
    finally:
        distributed.close()


__all__ = ["resume", "run"]
