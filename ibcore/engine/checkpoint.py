"""Atomic checkpoints: written to a temp file in the same folder, fsynced, renamed; verified on load.

A manifest (``checkpoints.json``) lists each checkpoint with its SHA-256, so a truncated or
corrupted file is detected and the previous one is used. Loading uses ``weights_only=True``: a
checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ibcore.errors import CheckpointError
from ibcore.files import _fsync_dir, atomic_write_text, temp_file_beside

MANIFEST = "checkpoints.json"


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
    except (OSError, ValueError):
        return []
    if not isinstance(entries, list):
        warnings.warn(f"{directory / MANIFEST} is not a list of checkpoints; ignoring it", stacklevel=2)
        return []
    valid = [e for e in entries if _valid_entry(e)]
    if len(valid) != len(entries):
        warnings.warn(f"{directory / MANIFEST}: ignored {len(entries) - len(valid)} malformed entries", stacklevel=2)
    return valid


def remove_stale_temp_files(directory: Path) -> None:
    """Delete temp files of checkpoint writes that a crash interrupted (each as large as a checkpoint)."""
    for path in directory.glob(".epoch-*.pt.*.tmp"):
        path.unlink(missing_ok=True)


def save_checkpoint(directory: Path, epoch: int, state: dict[str, Any], keep: int) -> Path:
    """Save ``state`` as ``epoch-NNNN.pt`` atomically, record it in the manifest, keep the last ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"epoch-{epoch:04d}.pt"
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        digest = _sha256(Path(tmp))
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    entries = [e for e in _read_manifest(directory) if e["file"] != path.name]
    entries.append({"file": path.name, "epoch": epoch, "sha256": digest})
    entries.sort(key=lambda e: e["epoch"])
    kept, dropped = entries[-keep:], entries[:-keep]
    atomic_write_text(directory / MANIFEST, json.dumps(kept, indent=1))
    for entry in dropped:  # only after the manifest no longer points at them
        (directory / entry["file"]).unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load one checkpoint with ``weights_only=True``; a refused or broken file is a CheckpointError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != 1:
        raise CheckpointError(f"{path} is not an ibcore checkpoint (format 1)")
    return state


def load_latest(directory: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The newest checkpoint in ``directory`` whose checksum matches; earlier ones if the newest is bad."""
    entries = _read_manifest(directory)
    if not entries:
        raise CheckpointError(f"no checkpoints found in {directory} (missing or unreadable {MANIFEST})")
    remove_stale_temp_files(directory)
    problems = []
    for entry in reversed(entries):
        path = directory / entry["file"]
        if not path.is_file():
            problems.append(f"{path.name}: missing")
            continue
        if _sha256(path) != entry["sha256"]:
            problems.append(f"{path.name}: checksum mismatch (truncated or corrupted)")
            continue
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems:
            warnings.warn(f"skipped bad checkpoints: {'; '.join(problems)}; using {path.name}", stacklevel=2)
        return state
    raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(problems))
