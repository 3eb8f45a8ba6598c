"""``RunDirWriteError``: a write the disk or folder cannot take (full, quota, read-only, ...).

Raised by :mod:`flora_lightning.rundir.checkpoint`'s atomic writers in place of the ``OSError``;
pure (no I/O), so the command line can import it before the heavy imports.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

# errno -> (reason, fix) for failures that mean "this disk / folder cannot take the write".
_WRITE_FAILURES = {
    errno.ENOSPC: ("no space left on device", "free space on that disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
    errno.EFBIG: ("file too large for the filesystem", "write to another filesystem"),
    errno.EROFS: ("read-only file system", "make it writable or choose another folder"),
    errno.EACCES: ("permission denied", "make the folder writable or choose another folder"),
    errno.EPERM: ("operation not permitted", "make the folder writable or choose another folder"),
    errno.EIO: ("I/O error", "check the disk"),
}


class RunDirWriteError(OSError):
    """A run-directory (or cache) write failed: disk full, quota, read-only, permissions.

    Keeps the original ``errno`` and the original error as ``__cause__``; ``str()`` is one line
    naming the path, the reason and the fix. ``atomic``: the write was one of this module's
    (temporary file removed, previous version intact), which the message then says.
    """

    def __init__(self, path: Path, cause: OSError, atomic: bool = True):
        reason, fix = _WRITE_FAILURES.get(cause.errno, (cause.strerror or str(cause), "fix it"))
        if atomic:  # written by this module: temporary file removed, target untouched
            fix = f"Nothing half-written was left and the previous version is intact: {fix}"
        else:
            fix = fix[0].upper() + fix[1:]
        message = (
            f"could not write {path}: {reason} ({cause}). {fix}, then rerun "
            "(`--trainer.resume true` continues a run from its last complete round)."
        )
        super().__init__(cause.errno, message, str(path))
        self.path = Path(path)
        self.message = message

    def __str__(self) -> str:
        return self.message


def is_write_failure(err: OSError) -> bool:
    """Whether ``err`` means the disk or folder cannot take a write (full, read-only, ...)."""
    return err.errno in _WRITE_FAILURES


def os_error_code(err: Exception) -> int | None:
    """The errno inside a safetensors error message ("... (os error 28)"), if any."""
    match = re.search(r"\(os error (\d+)\)", str(err))
    return int(match.group(1)) if match else None
