"""Atomic checkpoints: written to a temp file in the same folder, fsynced, renamed; verified on load.

A manifest (``checkpoints.json``) lists each checkpoint with its SHA-256, so a truncated or
corrupted file is detected and the previous one is used. Loading uses ``weights_only=True``: a
checkpoint cannot run code. A loaded checkpoint is also checked for its structure (the types of
``epoch``, ``runs``, ``history``, ``rng``, ...): a file with the right checksum can still be crafted
or come from another program, and every problem is a :class:`~ibcore.errors.CheckpointError` that
names the file, never a ``KeyError`` from deep inside a resume. :func:`load_run_state`,
:func:`load_optimizer_state` and :func:`restore_rng` do the same for what only the trainer can check
(a state dict that does not fit the model, an RNG state torch refuses).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ibcore.errors import CheckpointError
from ibcore.files import OutputError, _fsync_dir, atomic_write_text, temp_file_beside

MANIFEST = "checkpoints.json"
#: key under which :func:`load_checkpoint` records the file a state was read from (see :func:`loaded_from`)
LOADED_FROM = "_loaded_from"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_CHECKPOINT_NAME = re.compile(r"epoch-\d{4,}\.pt")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _valid_entry(entry: Any) -> bool:
    """A manifest entry names a checkpoint file in this folder: a crafted manifest cannot point elsewhere."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("file"), str)
        and _CHECKPOINT_NAME.fullmatch(entry["file"]) is not None
        and isinstance(entry.get("epoch"), int)
        and not isinstance(entry.get("epoch"), bool)
        and isinstance(entry.get("sha256"), str)
        and _SHA256.fullmatch(entry["sha256"]) is not None
    )


def _read_manifest(directory: Path) -> list[dict[str, Any]]:
    try:
        entries = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: a crafted, deeply nested JSON file
        return []
    if not isinstance(entries, list):
        warnings.warn(f"{directory / MANIFEST} is not a list of checkpoints; ignoring it", stacklevel=2)
        return []
    valid = [e for e in entries if _valid_entry(e)]
    if len(valid) != len(entries):
        warnings.warn(f"{directory / MANIFEST}: ignored {len(entries) - len(valid)} malformed entries", stacklevel=2)
    return valid


def remove_stale_temp_files(directory: Path) -> None:
    """Delete temp files of checkpoint writes that a crash interrupted (each as large as a checkpoint).

    Best effort: on a read-only run directory they stay (reading the checkpoints does not need it).
    """
    try:
        stale = list(directory.glob(".epoch-*.pt.*.tmp"))
    except OSError:
        return
    for path in stale:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: torch.save turns a failed write into a RuntimeError ("unexpected pos")
    raised while it closes the archive, with the disk's OSError as its context."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        if isinstance(current, OSError):
            return current
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def save_checkpoint(directory: Path, epoch: int, state: dict[str, Any], keep: int) -> Path:
    """Save ``state`` as ``epoch-NNNN.pt`` atomically, record it in the manifest, keep the last ``keep``.

    A write the system refuses raises :class:`~ibcore.files.OutputError` (an ``OSError``) naming the
    file; the previous checkpoint and the manifest are then unchanged.
    """
    path = directory / f"epoch-{epoch:04d}.pt"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file_beside(path)
    except OSError as exc:
        raise OutputError.from_os_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        digest = _sha256(Path(tmp))
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in(exc)
        if cause is not None:
            raise OutputError.from_os_error(path, cause) from exc
        raise
    entries = [e for e in _read_manifest(directory) if e["file"] != path.name]
    entries.append({"file": path.name, "epoch": epoch, "sha256": digest})
    entries.sort(key=lambda e: e["epoch"])
    kept, dropped = entries[-keep:], entries[:-keep]
    atomic_write_text(directory / MANIFEST, json.dumps(kept, indent=1))
    for entry in dropped:  # only after the manifest no longer points at them
        try:
            (directory / entry["file"]).unlink(missing_ok=True)
        except OSError as exc:  # the new checkpoint is saved: an old one left on disk is no reason to stop
            warnings.warn(f"could not delete the old checkpoint {directory / entry['file']}: {exc}", stacklevel=2)
    return path


# --------------------------------------------------------------------------------------------
# Structure of a loaded checkpoint


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _rng_problem(value: Any, what: str) -> str | None:
    """Why ``value`` cannot be torch's CPU generator state, or None."""
    if not isinstance(value, torch.Tensor):
        return f"{what} must be a tensor, got {_describe(value)}"
    expected = torch.get_rng_state()
    if value.dtype != expected.dtype or value.dim() != 1 or value.numel() != expected.numel():
        return (
            f"{what} must be a {expected.dtype} tensor of {expected.numel()} bytes (torch's CPU generator), "
            f"got {value.dtype} of shape {list(value.shape)}"
        )
    return None


def _runs_problems(runs: Any) -> list[str]:
    if not isinstance(runs, dict):
        return [f"'runs' must map run names to their states, got {_describe(runs)}"]
    if not runs:
        return ["'runs' is empty"]
    problems = []
    for name, saved in runs.items():
        where = f"runs[{name!r}]"
        if not isinstance(name, str):
            problems.append(f"run names must be strings, got {_describe(name)}")
        elif not isinstance(saved, dict):
            problems.append(f"{where} must be a mapping with 'model', 'optimizer' and 'failed', got {_describe(saved)}")
        else:
            model, optimizer = saved.get("model"), saved.get("optimizer")
            if "model" not in saved:
                problems.append(f"{where} has no 'model'")
            elif not isinstance(model, dict) or not all(isinstance(k, str) for k in model):
                problems.append(f"{where}['model'] must be a state dict (names to tensors), got {_describe(model)}")
            else:
                bad = [
                    k for k, v in model.items() if not isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
                ]
                if bad:
                    problems.append(f"{where}['model'][{bad[0]!r}] is not a tensor: {_describe(model[bad[0]])}")
            if "optimizer" not in saved:
                problems.append(f"{where} has no 'optimizer'")
            elif not isinstance(optimizer, dict):
                problems.append(f"{where}['optimizer'] must be a mapping, got {_describe(optimizer)}")
            elif optimizer and not (
                isinstance(optimizer.get("state"), dict)
                and isinstance(optimizer.get("param_groups"), list)
                and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])
            ):
                problems.append(f"{where}['optimizer'] is not a torch optimizer state (state, param_groups)")
            if "failed" not in saved:
                problems.append(f"{where} has no 'failed'")
            elif saved["failed"] is not None and not isinstance(saved["failed"], str):
                problems.append(f"{where}['failed'] must be null or a message, got {_describe(saved['failed'])}")
    return problems


def _history_problem(history: Any) -> str | None:
    if not isinstance(history, list):
        return f"'history' must be a list of metrics lines, got {_describe(history)}"
    for i, line in enumerate(history):
        if not isinstance(line, dict):
            return f"history[{i}] must be a mapping, got {_describe(line)}"
        if not (isinstance(line.get("split"), str) and isinstance(line.get("run"), str) and _whole(line.get("epoch"))):
            return f"history[{i}] must have a 'split', a 'run' and a whole-number 'epoch', got {_describe(line)}"
    return None


def _best_problem(best: Any) -> str | None:
    if not isinstance(best, dict):
        return f"'best' must be a mapping, got {_describe(best)}"
    for name, entry in best.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("score"), (int, float))
            and _whole(entry.get("epoch"))
            and isinstance(entry.get("test"), dict)
        ):
            return f"best[{name!r}] must have a numeric 'score', a whole-number 'epoch' and 'test' metrics"
    return None


def _rng_problems(rng: Any, world_size: int | None) -> list[str]:
    if not isinstance(rng, dict):
        return [f"'rng' must be a mapping of RNG states, got {_describe(rng)}"]
    problems = []
    if "torch" not in rng:
        problems.append("rng has no 'torch' state")
    else:
        problem = _rng_problem(rng["torch"], "rng['torch']")
        if problem:
            problems.append(problem)
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
        problems.append(f"rng['cuda'] must be a list of uint8 tensors, got {_describe(cuda)}")
    if "torch_per_rank" in rng:
        per_rank = rng["torch_per_rank"]
        if not isinstance(per_rank, list):
            problems.append(f"rng['torch_per_rank'] must be a list, got {_describe(per_rank)}")
        else:
            problems += [p for i, s in enumerate(per_rank) if (p := _rng_problem(s, f"rng['torch_per_rank'][{i}]"))]
            if world_size is not None and len(per_rank) != world_size:
                problems.append(f"rng['torch_per_rank'] holds {len(per_rank)} states for {world_size} processes")
    return problems


def structure_problems(state: Any, *, complete: bool | None = None) -> list[str]:
    """What is wrong with the structure of a loaded checkpoint (empty when nothing is).

    Every key that is present must have the type the trainer writes. ``complete=True`` also requires
    every key a resume needs (``runs``, ``history``, ``rng``); ``None`` (the default) requires them when
    the state holds ``runs`` (a training checkpoint), so small states of tests and tools still load.
    """
    if not isinstance(state, dict):
        return [f"it holds a {type(state).__name__}, not a checkpoint mapping"]
    if "format" not in state:
        return ["it has no 'format' (not an ibcore checkpoint)"]
    if not _whole(state["format"]) or state["format"] != 1:
        return [f"format {state['format']!r} is not ibcore's checkpoint format 1"]
    problems = []
    epoch: Any = state.get("epoch")
    if "epoch" not in state:
        problems.append("it has no 'epoch'")
    elif not _whole(epoch) or epoch < 1:
        problems.append(f"'epoch' must be the number of finished epochs (a whole number >= 1), got {_describe(epoch)}")
    if complete is None:
        complete = "runs" in state
    required = ("runs", "history", "rng") if complete else ()
    problems += [f"it has no {key!r}" for key in required if key not in state]
    world_size = None
    if "distributed" in state:
        saved = state["distributed"]
        if not isinstance(saved, dict) or not (
            _whole(saved.get("world_size", 1))
            and saved.get("world_size", 1) >= 1
            and isinstance(saved.get("mode", ""), str)
        ):
            problems.append(f"'distributed' must hold a world_size >= 1 and a mode, got {_describe(saved)}")
        else:
            world_size = saved.get("world_size", 1)
    if "metrics_format" in state and not _whole(state["metrics_format"]):
        problems.append(f"'metrics_format' must be a whole number, got {_describe(state['metrics_format'])}")
    if "runs" in state:
        problems += _runs_problems(state["runs"])
    if "history" in state and (problem := _history_problem(state["history"])):
        problems.append(problem)
    if "best" in state and (problem := _best_problem(state["best"])):
        problems.append(problem)
    if "rng" in state:
        problems += _rng_problems(state["rng"], world_size)
    return problems


def check_structure(state: Any, path: str | os.PathLike[str], *, complete: bool | None = None) -> None:
    """Raise a :class:`CheckpointError` naming ``path`` and every problem :func:`structure_problems` finds."""
    problems = structure_problems(state, complete=complete)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{os.fspath(path)} is not a usable ibcore checkpoint: {shown}")


def loaded_from(state: Mapping[str, Any]) -> str:
    """The file :func:`load_checkpoint` read ``state`` from (for messages), or ``"the checkpoint"``."""
    source = state.get(LOADED_FROM)
    return source if isinstance(source, str) else "the checkpoint"


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load one checkpoint with ``weights_only=True`` and check its structure.

    A refused, broken or malformed file is a :class:`CheckpointError` naming it. The returned state
    records its file under :data:`LOADED_FROM` (see :func:`loaded_from`).
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != 1:
        raise CheckpointError(f"{path} is not an ibcore checkpoint (format 1)")
    check_structure(state, path)
    state[LOADED_FROM] = str(path)
    return state


def load_latest(directory: Path, map_location: Any = "cpu", *, remove_temp_files: bool = True) -> dict[str, Any]:
    """The newest checkpoint in ``directory`` whose checksum and structure are right; earlier ones if the
    newest is bad (with a warning naming what was skipped and why).

    It also deletes the temp files of saves a crash interrupted, unless ``remove_temp_files`` is false:
    call it while holding the run directory's lock (:mod:`ibcore.engine.lock`), or a second ``ib resume``
    would delete the temp file of a save in progress; under torchrun only rank 0 should remove them.
    """
    entries = _read_manifest(directory)
    if not entries:
        raise CheckpointError(f"no checkpoints found in {directory} (missing or unreadable {MANIFEST})")
    if remove_temp_files:
        remove_stale_temp_files(directory)
    problems = []
    for entry in reversed(entries):
        path = directory / entry["file"]
        try:
            if not path.is_file():
                problems.append(f"{path.name}: missing")
                continue
            if _sha256(path) != entry["sha256"]:
                problems.append(f"{path.name}: checksum mismatch (truncated or corrupted)")
                continue
        except OSError as exc:
            problems.append(f"{path.name}: cannot be read ({exc.strerror or exc})")
            continue
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if state["epoch"] != entry["epoch"]:
            problems.append(f"{path}: holds epoch {state['epoch']}, but {MANIFEST} lists it as epoch {entry['epoch']}")
            continue
        if problems:
            warnings.warn(f"skipped bad checkpoints: {'; '.join(problems)}; using {path.name}", stacklevel=2)
        return state
    raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# What only the trainer can check: a state dict against its model, an RNG state torch accepts


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}, not a tensor"


def state_dict_mismatch(model: torch.nn.Module, state_dict: Mapping[str, Any]) -> str | None:
    """How ``state_dict`` fails to fit ``model`` (the first differing tensor, and how many differ), or None."""
    expected = model.state_dict()
    shapes = [
        f"{key!r} is {_shape(state_dict[key])} in the checkpoint and {_shape(value)} in the model"
        for key, value in expected.items()
        if key in state_dict
        and isinstance(value, torch.Tensor)
        and (not isinstance(state_dict[key], torch.Tensor) or state_dict[key].shape != value.shape)
    ]
    missing = [f"{key!r} is missing from the checkpoint" for key in expected if key not in state_dict]
    unexpected = [f"the checkpoint has {key!r}, which the model lacks" for key in state_dict if key not in expected]
    found = shapes + missing + unexpected
    if not found:
        return None
    counts = [
        f"{len(part)} {what}"
        for part, what in ((shapes, "of another shape"), (missing, "missing"), (unexpected, "unexpected"))
        if part
    ]
    return f"{found[0]} ({', '.join(counts)} in all)"


def load_run_state(
    model: torch.nn.Module, state_dict: Mapping[str, Any], *, run: str, path: str | os.PathLike[str]
) -> None:
    """``model.load_state_dict(state_dict)``; a state dict that does not fit is a :class:`CheckpointError`.

    Checked before loading, so the model is unchanged when it does not fit. The message names the
    checkpoint, the run and the first mismatched tensor with both shapes (a checkpoint of another
    config: another backbone or width under the same run name).
    """
    where = f"{os.fspath(path)}: run {run!r}"
    remedy = (
        "the checkpoint was written for another model (another backbone or width under the same run name?); "
        "resume a run directory only with the config.yaml it was started with"
    )
    mismatch = state_dict_mismatch(model, state_dict)
    if mismatch:
        raise CheckpointError(f"{where}: the saved model does not fit this run's model: {mismatch}; {remedy}")
    try:
        model.load_state_dict(state_dict)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{where}: cannot load the saved model: {exc}; {remedy}") from exc


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any], *, run: str, path: str | os.PathLike[str]
) -> None:
    """``optimizer.load_state_dict(state_dict)``; a state that does not fit is a :class:`CheckpointError`."""
    try:
        optimizer.load_state_dict(dict(state_dict))
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"{os.fspath(path)}: run {run!r}: the saved optimizer state does not fit this run's optimizer "
            f"({type(exc).__name__}: {exc}); resume a run directory only with the config.yaml it was started with"
        ) from exc


def restore_rng(rng_state: Any, path: str | os.PathLike[str], *, what: str = "rng['torch']") -> None:
    """``torch.set_rng_state(rng_state)``; a state torch refuses is a :class:`CheckpointError` naming ``path``."""
    problem = _rng_problem(rng_state, what)
    if problem is None:
        try:
            torch.set_rng_state(rng_state)
            return
        except (RuntimeError, TypeError, ValueError) as exc:
            problem = f"torch refuses {what}: {exc}"
    raise CheckpointError(f"{os.fspath(path)}: cannot restore the random number generator: {problem}")
