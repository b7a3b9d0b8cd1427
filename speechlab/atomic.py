"""Atomic file writes, the one place they are made: a temporary file beside the target, fsync, rename.

A run killed at any moment, or a write that fails (disk full, file-size limit, quota), leaves the previous file
or the new complete one, never a truncated one, and no temporary file behind. A failed write raises
:class:`WriteFailed` naming the file and the cause in words (``torch.save`` reports a full disk only as
"unexpected pos N vs M"). Files get the usual permissions (``0o666`` minus the umask), not the owner-only ones of
a bare ``mkstemp``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["WriteFailed", "atomic_write", "write_bytes", "write_text"]

# Below this much free space a failed write is put down to a full disk.
_NEARLY_FULL_BYTES = 64 * 1024**2


class WriteFailed(OSError):
    """Writing a file failed for want of space (disk, quota, file-size limit) or another I/O error."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cause(folder: Path, error: BaseException) -> str:
    """What most likely made a write into ``folder`` fail, in words."""
    code = getattr(error, "errno", None)
    if code == errno.ENOSPC:
        return "no space left on the device"
    if code == errno.EDQUOT:
        return "disk quota exceeded"
    if code == errno.EFBIG:
        return "the file would exceed the file-size limit (ulimit -f)"
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return f"the write failed, most likely at the file-size limit (ulimit -f: {soft} bytes): {error}"
    with contextlib.suppress(OSError):
        stats = os.statvfs(folder)
        if stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES:
            return f"the write failed and the disk is (nearly) full: {error}"
    return f"the write failed: {error}"


def _is_write_failure(error: BaseException) -> bool:
    """An ``OSError``, or the ``RuntimeError`` torch's zip writer raises when a write fails."""
    if isinstance(error, OSError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("unexpected pos" in text or "failed writing" in text)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it is fsynced and renamed
    onto ``path``. ``mode``: permissions before the umask. Write failures become :class:`WriteFailed`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, mode & ~_umask())
        try:
            yield tmp
            with open(tmp, "rb+") as written:
                os.fsync(written.fileno())
        except BaseException as error:
            if isinstance(error, WriteFailed) or not _is_write_failure(error):
                raise
            raise WriteFailed(
                f"could not write {path}: {_cause(path.parent, error)}. Nothing was replaced (an earlier "
                "version of the file, if any, is intact); free some space or write elsewhere, then retry"
            ) from error
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o666) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_write(path, mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, mode: int = 0o666) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_write(path, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
