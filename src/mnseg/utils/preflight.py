"""Checks made before long work starts, so a full disk or a read-only folder fails in seconds, not hours."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from mnseg.errors import MnsegError

MiB = 1024 * 1024


def nearest_existing(path: Path) -> Path:
    """The path itself or its closest ancestor that exists (the folder a new output tree will start in)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(directory: str | os.PathLike, need_bytes: int = 0, what: str = "output folder") -> None:
    """Raise ``MnsegError`` unless ``directory`` (created later if missing) can take ``need_bytes`` of files.

    Checks permissions (``os.access``), that no ancestor is a regular file, that a probe file can really be
    created (read-only mounts, quotas) and that the file system has ``need_bytes`` free. Creates nothing
    except the probe, which is removed at once.
    """
    target = Path(directory)
    base = nearest_existing(target)
    if not base.is_dir():
        raise MnsegError(f"{target}: cannot create the {what}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise MnsegError(f"{target}: cannot write the {what}: no write permission in {base}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mnseg_write_probe_", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MnsegError(f"{target}: cannot write the {what} in {base} ({describe_os_error(exc)})") from None
    free = shutil.disk_usage(base).free
    if need_bytes and free < need_bytes:
        raise MnsegError(
            f"{target}: not enough free disk space for the {what}: {free / MiB:.1f} MiB free in {base}, "
            f"about {need_bytes / MiB:.1f} MiB needed; free some space or choose another folder"
        )


def describe_os_error(exc: OSError) -> str:
    """A short human reason for a failed write (disk full, read-only, permission) plus the system's words."""
    reasons = {
        errno.ENOSPC: "disk full",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
    }
    reason = reasons.get(exc.errno)
    detail = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason}: {detail}" if reason and reason.lower() != detail.lower() else detail
