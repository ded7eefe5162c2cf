"""One writer per run directory: an exclusive lock that dies with the process holding it.

``ib run`` and ``ib resume`` hold :func:`run_directory_lock` on the run directory while they write it,
so a second ``ib resume`` of the same directory (or one started while the first run still trains) is
refused with the holder's pid and command, instead of two processes interleaving checkpoints and
``metrics.jsonl`` lines.

The lock is an OS file lock (``fcntl.flock``) on ``<run dir>/.lock``: the kernel releases it when the
holder exits in any way, ``kill -9`` included, so it can never be left stuck. The file holds the
holder's pid, command line and host for the message; it is removed when the lock is released cleanly
and is harmless when a killed process leaves it behind. Child processes forked while the lock is held
(DataLoader workers) close their copy, so a killed parent's lock does not live on in its workers.
Where ``fcntl`` does not exist (Windows) or the file system refuses locks (``ENOLCK`` on some network
mounts), ``<run dir>/.lock.pid`` is created with ``O_EXCL`` instead, and one left by a process that no
longer runs on this host is taken over (best effort: a reused pid looks alive).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ibcore.errors import TrainingError
from ibcore.files import OutputError

try:
    import fcntl as _fcntl_module
except ImportError:  # pragma: no cover - Windows
    _fcntl_module = None  # type: ignore[assignment]

fcntl: Any = _fcntl_module  # tests set this to None to exercise the O_EXCL fallback

LOCK_FILE = ".lock"
#: the O_EXCL pid file used where flock is not available (no fcntl, or a file system without locks)
PID_LOCK_FILE = ".lock.pid"

# fds of locks this process holds: a forked child closes them (see the module docstring)
_held: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class RunDirectoryLocked(TrainingError):
    """Another process is writing this run directory (``ib run`` or ``ib resume`` of it)."""

    def __init__(self, run_dir: Path, holder: dict[str, Any], *, stale_hint: bool = False) -> None:
        self.run_dir = run_dir
        self.pid = holder.get("pid") if isinstance(holder.get("pid"), int) else None
        self.command = holder.get("command") if isinstance(holder.get("command"), str) else None
        who = f"process {self.pid}" if self.pid is not None else "another process"
        host = holder.get("host")
        if isinstance(host, str) and host != socket.gethostname():
            who += f" on {host}"
        if self.command:
            who += f" ({self.command})"
        message = (
            f"the run directory {run_dir} is in use by {who}: only one `ib run`/`ib resume` may write a run "
            "directory at a time; wait for it to finish or stop it, then try again"
        )
        if stale_hint:
            message += f" (if no such process is running, delete {run_dir / PID_LOCK_FILE})"
        super().__init__(message)


def _holder_info() -> bytes:
    info = {
        "pid": os.getpid(),
        "command": " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return (json.dumps(info) + "\n").encode("utf-8")


def _read_holder(path: Path, attempts: int = 5) -> dict[str, Any]:
    """The holder's record; a lock just taken may not hold it yet, so an empty file is read again shortly."""
    for attempt in range(attempts):
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        if text:
            try:
                holder = json.loads(text)
            except ValueError:
                return {}
            return holder if isinstance(holder, dict) else {}
        if attempt + 1 < attempts:
            time.sleep(0.05)
    return {}


def _open_error(path: Path, exc: OSError) -> TrainingError:
    if isinstance(exc, FileNotFoundError) and not path.parent.is_dir():
        return TrainingError(f"cannot lock the run directory {path.parent}: it does not exist")
    return OutputError.from_os_error(path, exc)


@contextlib.contextmanager
def _flock(run_dir: Path) -> Iterator[Path]:
    path = run_dir / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise _open_error(path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryLocked(run_dir, _read_holder(path)) from None
            # a file system without locks (some network mounts: ENOLCK, EOPNOTSUPP): the pid file instead
            with contextlib.suppress(OSError):
                if path.stat().st_size == 0:
                    path.unlink()
            with _pid_file(run_dir) as pid_path:
                yield pid_path
            return
        # The previous holder may have removed the file between our open and our flock: then we hold
        # the lock of a file nobody else can find, and must lock the one at the path instead.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    _held.add(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, _holder_info())
        except OSError:
            pass  # the lock holds without the record (a full disk); the message then lacks the pid
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: whoever opened it retries on the new file
        _held.discard(fd)
        os.close(fd)  # releases the lock


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (without signalling it: ``os.kill`` kills on Windows)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return bool(kernel32.GetLastError() == 5)  # access denied: it exists
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return True
    return True


@contextlib.contextmanager
def _pid_file(run_dir: Path) -> Iterator[Path]:
    path = run_dir / PID_LOCK_FILE
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            holder = _read_holder(path)
            pid = holder.get("pid")
            same_host = holder.get("host") in (None, socket.gethostname())
            if isinstance(pid, int) and same_host and pid != os.getpid() and not _pid_alive(pid):
                with contextlib.suppress(OSError):
                    path.unlink()  # left by a process that was killed: take it over
                continue
            raise RunDirectoryLocked(run_dir, holder, stale_hint=True) from None
        except OSError as exc:
            raise _open_error(path, exc) from exc
    else:
        raise RunDirectoryLocked(run_dir, _read_holder(path), stale_hint=True)
    try:
        try:
            os.write(fd, _holder_info())
        finally:
            os.close(fd)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def run_directory_lock(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """``with run_directory_lock(run_dir): ...``: hold the run directory's exclusive lock for the block.

    Raises :class:`RunDirectoryLocked` (a :class:`~ibcore.errors.TrainingError`) naming the holder's
    pid and command when another process — or another open lock in this process — holds it, and an
    :class:`~ibcore.files.OutputError` when the lock file cannot be created (read-only directory).
    Yields the lock file's path.
    """
    run_dir = Path(run_dir)
    with _flock(run_dir) if fcntl is not None else _pid_file(run_dir) as path:
        yield path


__all__ = ["LOCK_FILE", "PID_LOCK_FILE", "RunDirectoryLocked", "run_directory_lock"]
