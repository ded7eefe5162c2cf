"""Writing the files of a run: atomic replacement, appends that never leave half a line, one error type.

Readers see either the old file or the whole new one, never half of it: a new version goes to a temp
file beside the target, is fsynced and renamed over it. A write the operating system refuses (disk
full, read-only file system, quota, permissions) raises :class:`OutputError` naming the file and the
OS's reason, after removing the temp file: no partial or 0-byte file is left behind.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ibcore.errors import TrainingError

_HINTS = {
    errno_codes.ENOSPC: "free some space",
    errno_codes.EDQUOT: "free some space (disk quota exceeded)",
    errno_codes.EROFS: "the file system is mounted read-only; write the run somewhere else",
    errno_codes.EACCES: "check the folder's permissions",
    errno_codes.EPERM: "check the folder's permissions",
}


class OutputError(TrainingError, OSError):
    """A file of a run could not be written (disk full, read-only file system, permissions, ...).

    Also an :class:`OSError` (``errno``, ``strerror`` and ``filename`` are those of the cause), so code
    that catches ``OSError`` around a write keeps working; the message names the file and the reason.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, errno: int | None = None) -> None:
        hint = _HINTS.get(errno) if errno is not None else None
        self.message = f"cannot write {os.fspath(path)}: {reason}" + (f" ({hint})" if hint else "")
        super().__init__(self.message)
        self.errno = errno  # type: ignore[misc]
        self.strerror = reason  # type: ignore[misc]
        self.filename = os.fspath(path)

    @classmethod
    def from_os_error(cls, path: str | os.PathLike[str], exc: OSError) -> OutputError:
        if isinstance(exc, OutputError):
            return exc
        return cls(path, exc.strerror or str(exc) or type(exc).__name__, exc.errno)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (an error may cross a process boundary)
        return (_rebuild_output_error, (self.message, self.errno, self.filename))


def _rebuild_output_error(message: str, errno: int | None, filename: str) -> OutputError:
    error = OutputError(filename, "", errno)
    error.message = message
    return error


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_file_beside(path: Path) -> tuple[int, str]:
    """An open temp file in ``path``'s folder (for an atomic rename), with the permissions a plain
    ``open`` would give: mkstemp's 0o600 would hide results and checkpoints from a shared group."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError:  # pragma: no cover - file systems without permissions
        pass
    return fd, tmp


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """``with atomic_writer(path) as handle: ...``: what is written to ``handle`` replaces ``path`` at the end.

    The bytes go to a temp file beside ``path``, fsynced and renamed over it when the block ends
    without an exception. On any failure the temp file is removed and ``path`` is unchanged; an
    ``OSError`` (inside the block or while finishing) becomes an :class:`OutputError` naming ``path``.
    For a writer that wants a file object: ``fig.savefig(handle, format="png")``, ``torch.save(obj, handle)``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file_beside(path)
    except OSError as exc:
        raise OutputError.from_os_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError.from_os_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    with atomic_writer(path) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def append_text(path: Path, text: str, *, fsync: bool = False) -> None:
    """Append ``text`` (whole lines) to ``path``, creating it; a failed append leaves the file as it was.

    Used for logs such as ``metrics.jsonl`` and ``train.log``: when the disk fills up mid-write the
    bytes already written are cut off again, so the file never ends in half a line, and the error is
    an :class:`OutputError` naming the file.
    """
    data = text.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise OutputError.from_os_error(path, exc) from exc
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # drop the part of the line that made it to the disk
            raise OutputError.from_os_error(path, exc) from exc
    finally:
        os.close(fd)


def finite_json(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as strict JSON can hold it: every NaN or infinite number (also inside lists) becomes null, and
    ``non_finite`` says which keys held what (``{"ece": "nan"}``), so the reason is not lost."""
    found: dict[str, str] = {}

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            found.setdefault(key, "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
            return None
        if isinstance(value, list):
            return [clean(item, key) for item in value]
        return value

    cleaned = {key: clean(value, key) for key, value in record.items() if key != "non_finite"}
    if found:
        cleaned["non_finite"] = {**record.get("non_finite", {}), **found}
    elif "non_finite" in record:
        cleaned["non_finite"] = record["non_finite"]
    return cleaned
