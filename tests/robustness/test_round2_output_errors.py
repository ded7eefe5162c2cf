"""A disk that fills up or turns read-only while files are written (issue 14, round 2).

Every write helper of ``ibcore.files`` raises one error type, ``OutputError`` (a ``TrainingError`` and an
``OSError``), naming the file and the system's reason, and never leaves a partial or 0-byte file. The
failures are simulated by making ``os``/``tempfile`` refuse writes, so the tests run as root too.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _support import no_traceback

from ibcore.engine import checkpoint as ckpt
from ibcore.errors import IbError, TrainingError
from ibcore.files import OutputError, append_text, atomic_write_bytes, atomic_write_text, atomic_writer

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
EROFS = OSError(errno.EROFS, os.strerror(errno.EROFS))


class _FullDiskHandle(io.BufferedWriter):
    """A file handle that writes ``room`` bytes, then finds the disk full."""

    room = 10

    def write(self, data: Any) -> int:
        data = bytes(data)
        if len(data) <= self.room:
            self.room -= len(data)
            return super().write(data)
        super().write(data[: self.room])  # what fitted reaches the file, then the disk is full
        self.room = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    original = os.fdopen

    def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" not in mode:
            return original(fd, mode, *args, **kwargs)
        handle = _FullDiskHandle(io.FileIO(fd, "wb"))
        handle.room = room
        return handle

    monkeypatch.setattr(os, "fdopen", fdopen)


def refuse(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, error: OSError) -> None:
    def failing(*args: Any, **kwargs: Any) -> Any:
        raise OSError(error.errno, error.strerror)

    monkeypatch.setattr(module, name, failing)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_output_error_is_one_catchable_type_with_the_os_reason(tmp_path: Path) -> None:
    error = OutputError.from_os_error(tmp_path / "x.json", ENOSPC)
    assert isinstance(error, TrainingError) and isinstance(error, IbError) and isinstance(error, OSError)
    assert str(error) == f"cannot write {tmp_path / 'x.json'}: No space left on device (free some space)"
    assert (error.errno, error.strerror, error.filename) == (
        errno.ENOSPC,
        "No space left on device",
        str(error.filename),
    )
    import pickle

    assert str(pickle.loads(pickle.dumps(error))) == str(error)


@pytest.mark.parametrize("existed", [True, False], ids=["replacing a file", "a new file"])
def test_a_disk_full_mid_write_leaves_the_old_file_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existed: bool
) -> None:
    target = tmp_path / "results.json"
    if existed:
        target.write_text('{"old": true}')
    fill_disk_after(monkeypatch, room=4)
    with pytest.raises(OutputError, match=rf"cannot write {target}: No space left on device"):
        atomic_write_text(target, json.dumps({"new": list(range(100))}))
    monkeypatch.undo()
    assert (target.read_text() == '{"old": true}') if existed else not target.exists()  # never a 0-byte file
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize(
    ("module", "name", "error", "reason"),
    [
        (tempfile, "mkstemp", EROFS, "Read-only file system"),
        (tempfile, "mkstemp", ENOSPC, "No space left on device"),
        (os, "replace", EROFS, "Read-only file system"),
        (os, "fsync", ENOSPC, "No space left on device"),
    ],
    ids=["read-only: no temp file", "full: no temp file", "read-only: rename", "full: fsync"],
)
def test_every_failing_step_of_an_atomic_write_is_an_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: Any, name: str, error: OSError, reason: str
) -> None:
    target = tmp_path / "plot.png"
    target.write_bytes(b"old plot")
    refuse(monkeypatch, module, name, error)
    with pytest.raises(OutputError, match=rf"cannot write {target}: {reason}"):
        atomic_write_bytes(target, b"new plot")
    monkeypatch.undo()
    assert target.read_bytes() == b"old plot" and no_temp_files(tmp_path)


def test_a_folder_that_cannot_be_created_is_an_output_error(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(OutputError, match=r"cannot write .*blocker/sub/x\.txt"):
        atomic_write_text(tmp_path / "blocker" / "sub" / "x.txt", "x")


def test_atomic_writer_takes_any_writer_and_keeps_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    with atomic_writer(target) as handle:
        torch.save({"w": torch.ones(2)}, handle)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(2))
    with pytest.raises(ValueError):  # an error that is not the disk's passes unchanged, the old file stays
        with atomic_writer(target) as handle:
            handle.write(b"half")
            raise ValueError("the writer failed")
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(2)) and no_temp_files(tmp_path)


# --------------------------------------------------------------------------------------------
# Appends: metrics.jsonl, train.log


def test_an_append_that_fills_the_disk_leaves_no_half_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "metrics.jsonl"
    append_text(log, '{"epoch": 1}\n')
    original, calls = os.write, [0]

    def write(fd: int, data: Any) -> int:
        calls[0] += 1
        if calls[0] == 1:
            return original(fd, bytes(data)[:5])  # a short write: part of the line reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OutputError, match=rf"cannot write {log}: No space left on device"):
        append_text(log, '{"epoch": 2, "acc": 50.0}\n')
    monkeypatch.undo()
    assert log.read_text() == '{"epoch": 1}\n'
    append_text(log, '{"epoch": 2}\n')  # once there is room again
    assert log.read_text().splitlines() == ['{"epoch": 1}', '{"epoch": 2}']


def test_an_append_to_a_read_only_file_system_is_an_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse(monkeypatch, os, "open", EROFS)
    with pytest.raises(OutputError, match=rf"cannot write {tmp_path / 'train.log'}: Read-only file system"):
        append_text(tmp_path / "train.log", "line\n")


# --------------------------------------------------------------------------------------------
# Checkpoints and `ib report`


def test_a_checkpoint_on_a_full_disk_is_an_output_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "checkpoints"
    ckpt.save_checkpoint(directory, 1, {"format": 1, "epoch": 1}, keep=1)
    fill_disk_after(monkeypatch, room=100)
    with pytest.raises(OutputError, match=rf"cannot write {directory / 'epoch-0002.pt'}: No space left on device"):
        ckpt.save_checkpoint(directory, 2, {"format": 1, "epoch": 2, "w": torch.ones(1000)}, keep=1)
    monkeypatch.undo()
    assert ckpt.load_latest(directory)["epoch"] == 1 and no_temp_files(directory)


def test_ib_report_on_a_read_only_run_directory_is_a_clear_error(
    ib_cli: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "meta.json").write_text(json.dumps({"class_counts": [5, 1]}), encoding="utf-8")
    results = json.dumps({"last": [{"run": "ce", "status": "ok", "acc": 50.0}]})
    (run_dir / "results.json").write_text(results, encoding="utf-8")
    original = tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        if Path(kwargs.get("dir") or ".").resolve() == run_dir.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return original(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    result = ib_cli("report", str(run_dir))
    monkeypatch.undo()
    assert result.rc == 1 and no_traceback(result.output), result.output
    message = " ".join(result.err.split())
    assert f"cannot write {run_dir}" in message and "Read-only file system" in message, message
    assert (run_dir / "results.json").read_text() == results
    assert sorted(p.name for p in run_dir.iterdir()) == ["meta.json", "results.json"]


def test_a_plot_on_a_full_disk_leaves_no_partial_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ibcore.report import write_plots

    def print_png(self: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(target, (str, os.PathLike)):
            with open(target, "wb") as handle:
                handle.write(b"\x89PNG partial")
        else:
            target.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(FigureCanvasAgg, "print_png", print_png)
    metrics = [{"split": "train", "run": "ce", "epoch": e, "train_loss": 1.0 / e} for e in (1, 2)]
    with pytest.raises(OutputError, match=r"loss_curves\.png: No space left on device"):
        write_plots(tmp_path, metrics, [], [])
    assert not list(tmp_path.glob("*.png")) and no_temp_files(tmp_path)
