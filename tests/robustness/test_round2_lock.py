"""One writer per run directory (issue 14, round 2): ``ibcore.engine.lock.run_directory_lock``.

A second process that wants to write a run directory is refused with the holder's pid and command;
a holder killed with SIGKILL leaves nothing stuck (the kernel drops an flock with its process; the
O_EXCL fallback for systems without fcntl takes over a pid file whose process is gone).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _support import TINY_DATA_PLUGIN, no_traceback, tiny_config, write_module

from ibcore.engine import lock
from ibcore.engine.lock import LOCK_FILE, PID_LOCK_FILE, RunDirectoryLocked, run_directory_lock
from ibcore.errors import TrainingError
from ibcore.files import OutputError

HOLDER = textwrap.dedent(
    """
    import sys, time
    from ibcore.engine import lock
    if sys.argv[2] == "fallback":
        lock.fcntl = None
    with lock.run_directory_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
    """
)


@pytest.fixture(params=["flock", "fallback"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with fcntl.flock and with the O_EXCL pid file used where fcntl does not exist."""
    if request.param == "fallback":
        monkeypatch.setattr(lock, "fcntl", None)
    return str(request.param)


def lock_file(mode: str) -> str:
    return LOCK_FILE if mode == "flock" else PID_LOCK_FILE


@pytest.fixture
def holder(tmp_path: Path, mode: str) -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """``holder(run_dir)``: another process that holds the lock of ``run_dir`` until it is killed."""
    started: list[subprocess.Popen[str]] = []

    def start(run_dir: Path) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(run_dir), mode, "--marker-arg"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the lock is held (or the process died)
        assert line.strip() == "locked", process.stderr.read() if process.stderr else line
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_a_second_process_is_refused_with_the_holders_pid_and_command(
    tmp_path: Path, holder: Callable[[Path], subprocess.Popen[str]]
) -> None:
    process = holder(tmp_path)
    with pytest.raises(RunDirectoryLocked) as error:
        with run_directory_lock(tmp_path):
            pytest.fail("the lock was taken twice")
    message = str(error.value)
    assert f"in use by process {process.pid}" in message and "--marker-arg" in message, message
    assert str(tmp_path) in message and error.value.pid == process.pid
    assert isinstance(error.value, TrainingError)  # the CLI prints it and exits 1


def test_the_lock_of_a_process_killed_with_sigkill_is_free_again(
    tmp_path: Path, holder: Callable[[Path], subprocess.Popen[str]], mode: str
) -> None:
    process = holder(tmp_path)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert (tmp_path / lock_file(mode)).exists()  # left by the killed process: it must not be a problem
    with run_directory_lock(tmp_path) as path:
        assert path.name == lock_file(mode) and json.loads(path.read_text())["pid"] == os.getpid()
    assert not list(tmp_path.iterdir())  # released cleanly: nothing left behind
    with run_directory_lock(tmp_path):  # and again
        pass


def test_the_lock_is_released_when_the_block_raises_and_is_not_reentrant(tmp_path: Path, mode: str) -> None:
    with pytest.raises(ValueError):
        with run_directory_lock(tmp_path):
            with pytest.raises(RunDirectoryLocked, match=rf"in use by process {os.getpid()}"):
                with run_directory_lock(tmp_path):  # a second writer in this very process
                    pass
            raise ValueError("training failed")
    with run_directory_lock(tmp_path):
        pass
    assert not list(tmp_path.iterdir())


def test_a_lock_taken_by_many_processes_at_once_has_exactly_one_holder(tmp_path: Path, mode: str) -> None:
    racer = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        from ibcore.engine import lock
        from ibcore.engine.lock import RunDirectoryLocked
        if sys.argv[2] == "fallback":
            lock.fcntl = None
        folder = Path(sys.argv[1])
        (folder / f"ready-{os.getpid()}").touch()
        while len(list(folder.glob("ready-*"))) < 3:  # all three started: now they try at once
            time.sleep(0.01)
        try:
            with lock.run_directory_lock(folder):
                print("got", flush=True)
                while len(list(folder.glob("tried-*"))) < 2:  # hold it until the two others have tried
                    time.sleep(0.05)
        except RunDirectoryLocked:
            (folder / f"tried-{os.getpid()}").touch()
            print("refused", flush=True)
        """
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", racer, str(tmp_path), mode], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outcomes = sorted(p.communicate(timeout=600)[0].strip() for p in processes)
    assert outcomes == ["got", "refused", "refused"], outcomes


def test_a_run_directory_that_cannot_hold_the_lock_file_is_a_clear_error(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(TrainingError, match=r"cannot lock the run directory .*nowhere: it does not exist"):
        with run_directory_lock(tmp_path / "nowhere"):
            pass
    original = os.open

    def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.path.basename(os.fspath(path)).startswith(LOCK_FILE):
            raise OSError(30, "Read-only file system", os.fspath(path))
        return original(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputError, match=rf"cannot write {tmp_path / lock_file(mode)}: Read-only file system"):
        with run_directory_lock(tmp_path):
            pass


def test_a_fallback_pid_file_of_a_live_process_says_how_to_clear_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock, "fcntl", None)
    (tmp_path / PID_LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "command": "ib resume x"}))
    with pytest.raises(RunDirectoryLocked, match=rf"process {os.getppid()} \(ib resume x\).*delete .*{PID_LOCK_FILE}"):
        with run_directory_lock(tmp_path):
            pass
    (tmp_path / PID_LOCK_FILE).write_text("not json")  # unreadable record: still refused, pid unknown
    with pytest.raises(RunDirectoryLocked, match="in use by another process"):
        with run_directory_lock(tmp_path):
            pass


def test_a_file_system_without_locks_falls_back_to_the_pid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoLocks:  # flock on some network mounts
        LOCK_EX, LOCK_NB = 2, 4

        @staticmethod
        def flock(fd: int, operation: int) -> None:
            raise OSError(37, "No locks available")

    monkeypatch.setattr(lock, "fcntl", NoLocks)
    with run_directory_lock(tmp_path) as path:
        assert path.name == PID_LOCK_FILE and not (tmp_path / LOCK_FILE).exists()
        with pytest.raises(RunDirectoryLocked, match=rf"in use by process {os.getpid()}"):
            with run_directory_lock(tmp_path):
                pass
    assert not list(tmp_path.iterdir())


def test_forked_children_do_not_keep_the_lock_of_a_killed_parent(tmp_path: Path) -> None:
    """DataLoader workers are forked: the lock must die with the process that took it, not with its last child."""
    code = textwrap.dedent(
        """
        import os, sys, time
        from ibcore.engine.lock import run_directory_lock
        with run_directory_lock(sys.argv[1]):
            child = os.fork()
            if child == 0:  # a worker that outlives its parent for a while
                time.sleep(60)
                os._exit(0)
            print(child, flush=True)
            time.sleep(600)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    child = int(process.stdout.readline())
    try:
        process.kill()
        process.wait(timeout=30)
        os.kill(child, 0)  # the orphaned child still runs ...
        with run_directory_lock(tmp_path):  # ... but holds no lock
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_ib_resume_of_a_run_directory_in_use_is_refused(
    ib_cli: Callable[..., Any], tmp_path: Path, isolated_plugins: None
) -> None:
    write_module(tmp_path, "ibtest_tiny_data", TINY_DATA_PLUGIN)
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(tiny_config(epochs=1)), encoding="utf-8")
    assert ib_cli("run", str(path), "--quiet", "--out", str(tmp_path / "out")).rc == 0
    (run_dir,) = (tmp_path / "out").iterdir()
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), "flock", "ib-resume-elsewhere"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "locked"
        result = ib_cli("resume", str(run_dir), "--quiet")
    finally:
        process.kill()
        process.wait(timeout=30)
    assert result.rc == 1 and no_traceback(result.output), result.output
    assert f"in use by process {process.pid}" in " ".join(result.err.split())
