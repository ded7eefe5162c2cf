"""The engine: ``run`` an experiment, ``resume`` an interrupted one (in one process or under ``torchrun``)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ibcore.config import load_experiment
from ibcore.config.paths import resolve_data_paths
from ibcore.config.schema import Experiment, resolved_config
from ibcore.config.validation import load_experiment_with_plugin_dirs, select_runs
from ibcore.engine.lock import run_directory_lock
from ibcore.errors import IbError, Terminated, TrainingError
from ibcore.files import append_text, atomic_write_text

if TYPE_CHECKING:
    from ibcore.engine.distributed import Distributed


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) stopped ``run`` or ``resume``; the message says how to continue.

    ``run_dir`` is the run directory; ``epoch`` the number of epochs its newest checkpoint holds (None
    when none was written yet: resuming starts again from the beginning); ``command`` what to type.
    """

    def __init__(
        self, run_dir: Path, epoch: int | None, command: str, epochs: int, signal_name: str | None = None
    ) -> None:
        self.run_dir, self.epoch, self.command = run_dir, epoch, command
        self.signal_name = signal_name  # "SIGTERM" when a termination signal stopped it (see ibcore.errors.Terminated)
        if epoch is None:
            where = "no checkpoint was written yet, so it starts again from the beginning"
        else:
            where = f"it continues after epoch {epoch} of {epochs}, from the newest checkpoint"
        by = f" by {signal_name}" if signal_name else ""
        super().__init__(f"interrupted{by}. To continue, run: {command} ({where})")


def _interrupted(
    run_dir: Path, experiment: Experiment, distributed: Distributed | None, cause: BaseException
) -> RunInterrupted:
    """The :class:`RunInterrupted` for ``run_dir``, with the resume command for this launch; the same line
    goes to train.log (rank 0), so a job stopped by its scheduler says so where its log ends."""
    from ibcore.engine.checkpoint import _read_manifest

    entries = _read_manifest(run_dir / "checkpoints")
    epoch = max(int(entry["epoch"]) for entry in entries) if entries else None
    world = distributed.world_size if distributed is not None and distributed.enabled else 1
    where = shlex.quote(str(run_dir))
    command = f"torchrun --nproc_per_node={world} -m ibcore.cli resume {where}" if world > 1 else f"ib resume {where}"
    signal_name = cause.signal_name if isinstance(cause, Terminated) else None
    interrupted = RunInterrupted(run_dir, epoch, command, experiment.trainer.epochs, signal_name)
    if distributed is None or distributed.is_main:
        with contextlib.suppress(OSError):  # a full disk must not hide the interruption
            append_text(run_dir / "train.log", f"{time.strftime('%Y-%m-%d %H:%M:%S')} {interrupted}\n")
    return interrupted


# What the engine writes into a new run directory before the first batch; a directory holding only these
# is removed when the experiment fails before training (missing data, a component that cannot be built).
_WRITTEN_BEFORE_TRAINING = frozenset({"config.yaml", "origin.json", "train.log", ".lock"})


def _remove_untrained(run_dir: Path, created: list[Path]) -> None:
    """Remove ``run_dir`` if it holds only what the engine wrote, and the parent folders made for it."""
    try:
        if not {entry.name for entry in run_dir.iterdir()} <= _WRITTEN_BEFORE_TRAINING:
            return
        shutil.rmtree(run_dir)
        for folder in created:  # innermost first; only while empty
            folder.rmdir()
    except OSError:
        pass  # leaving a directory behind is harmless; hiding the real error is not


def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _run_dir(parent: Path, name: str) -> Path:
    """A new, writable run directory under ``parent``; fails before any training if it cannot be made.

    On failure (a full disk, a read-only file system) nothing is left behind: the probe file, the run
    directory and the parent folders made for it are removed again.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    made = _missing_parents(parent)  # innermost first
    candidate: Path | None = None
    probe: Path | None = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for suffix in [""] + [f"-{i}" for i in range(1, 1000)]:
            try:
                (parent / f"{name}-{stamp}{suffix}").mkdir()
            except FileExistsError:
                continue
            candidate = parent / f"{name}-{stamp}{suffix}"
            break
        if candidate is None:
            raise FileExistsError(f"1000 run directories named {name}-{stamp}-* exist already")
        probe = candidate / ".write-test"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            if probe is not None:
                probe.unlink(missing_ok=True)
        for folder in (candidate, *made):  # innermost first; rmdir removes only empty folders
            if folder is not None:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise TrainingError(f"cannot write the run directory under {parent}: {exc.strerror or exc}") from exc
    return candidate


def check_device(name: str) -> None:
    """Refuse a ``trainer.device`` this machine does not have, before anything is written.

    ``cuda`` needs CUDA, ``cuda:N`` a visible device N (a ``torchrun`` launch picks ``cuda:LOCAL_RANK``
    itself), ``mps`` Apple's Metal backend. The message lists the devices that are available.
    """
    import torch

    from ibcore.engine.distributed import launched_world

    if name in ("auto", "cpu"):
        return
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    mps_backend = getattr(torch.backends, "mps", None)
    mps = bool(mps_backend is not None and mps_backend.is_available())
    devices = ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(count)] if cuda else []) + (["mps"] if mps else [])
    available = f"available here: {', '.join(devices)} (or 'auto')"
    if name == "mps" and not mps:
        raise TrainingError(
            f"trainer.device is 'mps', but Apple's MPS backend is not available on this machine; {available}"
        )
    if name.startswith("cuda"):
        if not cuda:
            raise TrainingError(f"trainer.device is {name!r}, but CUDA is not available on this machine; {available}")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= count and launched_world()[1] == 1:
            raise TrainingError(
                f"trainer.device is {name!r}, but this machine has {count} CUDA device{'s' if count != 1 else ''}; "
                f"{available}"
            )


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
    plugin_dirs: list[Path] = []
    if isinstance(source, Experiment) and not overrides:
        experiment = source
    else:
        experiment, plugin_dirs = load_experiment_with_plugin_dirs(source, overrides=overrides)
    name = Path(source).stem if isinstance(source, (str, Path)) else "experiment"
    experiment = resolve_data_paths(experiment)  # stored absolute: `ib resume` from elsewhere reads the same data
    if only:
        experiment = select_runs(experiment, only, source=str(source) if isinstance(source, (str, Path)) else None)
    config_dir = str(Path(source).resolve().parent) if isinstance(source, (str, Path)) else None
    # torch is imported only once the config is valid
    from ibcore.engine.distributed import init_distributed
    from ibcore.engine.trainer import Trainer, resolve_device

    check_device(experiment.trainer.device)  # before the run directory exists
    parent = Path(out_dir or experiment.trainer.out_dir).expanduser()  # "~/runs", like a dataset root
    created = _missing_parents(parent)

    locks = contextlib.ExitStack()

    def prepare() -> Path:
        run_dir = _run_dir(parent, name)
        locks.enter_context(run_directory_lock(run_dir))  # held by rank 0 until the tables are written
        resolved = resolved_config(experiment)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        origin = {"config": str(source), "config_dir": config_dir, "plugin_dirs": [str(d) for d in plugin_dirs]}
        atomic_write_text(run_dir / "origin.json", json.dumps(origin) + "\n")
        return run_dir

    distributed = init_distributed(experiment.trainer, resolve_device(experiment.trainer.device))
    run_dir: Path | None = None
    trainer = None
    try:
        distributed.local_batch(experiment.data.batch_size)  # refuse an uneven split before writing anything
        run_dir = _on_rank_zero(distributed, prepare)
        try:
            trainer = Trainer(experiment, run_dir, quiet=quiet, distributed=distributed, smoke=smoke)
        except Exception:
            if distributed.is_main:  # failed before the first batch: leave no half-made run directory
                _remove_untrained(run_dir, created)
            raise
        results = trainer.fit()
        distributed.barrier()  # no rank leaves the group while another still uses it (rank 0 writes the tables)
        return results
    except KeyboardInterrupt as exc:
        if run_dir is None:
            raise
        _stop_display(trainer)
        raise _interrupted(run_dir, experiment, distributed, exc) from None
    finally:
        distributed.close()
        locks.close()


def _stop_display(trainer: Any) -> None:
    """End the live progress display, so the interruption message is not drawn over."""
    try:
        trainer.display.stop()
    except Exception:  # no trainer yet, or a display already stopped
        pass


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
    """Continue an interrupted experiment from its newest valid checkpoint (from epoch 0 when it was
    stopped before its first checkpoint).

    Under ``torchrun`` every rank loads the same checkpoint (the run directory must be readable by
    every process); the world size and mode must be those the checkpoint was written with.
    """
    from ibcore.engine.checkpoint import load_latest, remove_stale_temp_files

    run_dir = Path(run_dir).expanduser()
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise TrainingError(f"{run_dir} is not an ibcore run directory (no config.yaml)")
    origin: dict[str, Any] = {}
    try:
        origin = json.loads((run_dir / "origin.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    # plugins: where the original config found them (its folder and those of the files it extended)
    saved_dirs = origin.get("plugin_dirs") if isinstance(origin, dict) else None
    if not isinstance(saved_dirs, list) or not all(isinstance(d, str) for d in saved_dirs):
        config_dir = origin.get("config_dir") if isinstance(origin, dict) else None
        saved_dirs = [config_dir] if isinstance(config_dir, str) else []
    locks = contextlib.ExitStack()
    # One writer per run directory: taken before load_latest, which deletes the temp files of cut-short saves
    # (another process's save in progress, were it still running). Under torchrun rank 0 holds it.
    is_main = os.environ.get("RANK", "0") == "0"
    if is_main:
        locks.enter_context(run_directory_lock(run_dir))
    try:
        experiment = load_experiment(config, plugin_dirs=[Path(d) for d in saved_dirs])
        checkpoints = run_dir / "checkpoints"
        state = load_latest(checkpoints, remove_temp_files=is_main) if _any_checkpoint(checkpoints) else None
        if state is None and checkpoints.is_dir() and is_main:
            remove_stale_temp_files(checkpoints)  # a first checkpoint whose write was cut short
        saved_data = _saved_data_fingerprint(run_dir)  # before the trainer rewrites meta.json
        return _resume(run_dir, experiment, state, saved_data, quiet)
    finally:
        locks.close()


def _saved_data_fingerprint(run_dir: Path) -> Any:
    """The fingerprint of the data the run started with (meta.json), or None for a run of an older ibcore."""
    try:
        meta = json.loads((run_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("data_fingerprint") if isinstance(meta, dict) else None


def _resume(run_dir: Path, experiment: Experiment, state: Any, saved_data: Any, quiet: bool) -> Any:
    from ibcore.engine.distributed import check_resume_world, init_distributed
    from ibcore.engine.trainer import Trainer, resolve_device

    check_device(experiment.trainer.device)
    distributed = init_distributed(experiment.trainer, resolve_device(experiment.trainer.device))
    trainer = None
    try:
        if state is not None:
            check_resume_world(state, distributed, run_dir)  # before any data is loaded
        epochs = distributed.all_gather_object(int(state["epoch"]) if state is not None else 0)
        if len(set(epochs)) != 1:
            raise TrainingError(f"the ranks found different latest checkpoints in {run_dir} (epochs {epochs})")
        trainer = Trainer(experiment, run_dir, quiet=quiet, distributed=distributed)
        trainer.check_same_data(saved_data)
        if state is not None:
            trainer.restore(state)
        else:
            if distributed.is_main:
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # lines of the attempt that was stopped
            trainer.display.log("no checkpoint was written before the interruption: training starts from the beginning")
        results = trainer.fit()
        trainer = None  # free the models before waiting for the other ranks
        distributed.barrier()
        return results
    except KeyboardInterrupt as exc:
        _stop_display(trainer)
        raise _interrupted(run_dir, experiment, distributed, exc) from None
    finally:
        distributed.close()


def _any_checkpoint(directory: Path) -> bool:
    """Whether a checkpoint was ever written to ``directory`` (a manifest or a checkpoint file).

    Without one, the experiment was stopped before its first checkpoint and resumes from epoch 0; with
    one, it must load (a damaged manifest is an error, never a silent restart).
    """
    if not directory.is_dir():
        return False
    return any(entry.name == "checkpoints.json" or entry.suffix == ".pt" for entry in directory.iterdir())


__all__ = ["RunInterrupted", "check_device", "resolved_config", "resume", "run"]
