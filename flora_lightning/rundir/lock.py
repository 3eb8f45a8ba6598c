"""An exclusive lock per run directory: one process writes a run folder at a time.

Two runs given the same ``trainer.default_root_dir``, or two sweep processes reaching the same
cell, would otherwise interleave their checkpoints, summaries and resume states (and a sweep
would clear a cell another process is still writing). :class:`RunDirLock` takes
``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<run dir>/run.lock`` for the run's life and records in
it who holds it (pid, host, start time); a second process is refused at once with
:class:`RunDirLockedError`, naming that holder.

``flock`` locks belong to the open file: the kernel drops them when the holder exits, however
it exits (a crash, ``kill -9``), so a stale lock cannot outlive its process, and the lock file
itself is never deleted (removing it would let a second process lock a new file while the
first still holds the old one). Within one process the lock is re-entrant: a sweep holds its
cell's lock while it inspects and clears the folder and the run it starts takes it again.
``flock`` is advisory and local to one machine's kernel on most network filesystems (NFS
gives ``fcntl`` byte-range semantics at best): give concurrent runs on different hosts
different folders.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path

LOCK_FILE = "run.lock"
"""Name of the lock file inside a run directory."""

_held: dict[Path, list] = {}
"""This process's locks: resolved run dir -> [open lock file, how many holders]."""
_registry = threading.Lock()


class RunDirLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


def holder(run_dir: str | Path) -> dict | None:
    """Who holds ``run_dir``'s lock (``{"pid", "host", "since"}``), or None when it is free
    or held by this process."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    if _key(run_dir) in _held or not path.is_file():
        return None
    fd = _open(path)
    try:
        if _try_lock(fd):
            _unlock(fd)
            return None
        return _read(path)
    finally:
        os.close(fd)


class RunDirLock:
    """The exclusive lock of one run directory (a context manager, re-entrant per process).

    Args:
        run_dir: the run directory (created if missing).
        field: the config field that named it, for the error message.
    """

    def __init__(self, run_dir: str | Path, field: str = "trainer.default_root_dir") -> None:
        self.run_dir = Path(run_dir)
        self.field = field
        self.held = False

    def acquire(self) -> RunDirLock:
        """Take the lock (or count one more holder in this process).

        Raises:
            RunDirLockedError: another process holds it (naming its pid, host and start).
        """
        if self.held:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = _key(self.run_dir)
        with _registry:
            if key in _held:
                _held[key][1] += 1
                self.held = True
                return self
            fd = _open(self.run_dir / LOCK_FILE)
            if not _try_lock(fd):
                os.close(fd)
                raise RunDirLockedError(self._refusal(_read(self.run_dir / LOCK_FILE)))
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            _held[key] = [fd, 1]
        self.held = True
        return self

    def release(self) -> None:
        """Give this holder's share back; the last one in the process unlocks the file."""
        if not self.held:
            return
        self.held = False
        key = _key(self.run_dir)
        with _registry:
            entry = _held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                _unlock(entry[0])
                os.close(entry[0])

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _refusal(self, who: dict | None) -> str:
        if who:
            by = (
                f"process {who.get('pid', '?')} on host {who.get('host', '?')} "
                f"(since {who.get('since', '?')})"
            )
        else:
            by = "another process (it has not recorded itself yet)"
        return (
            f"{self.field}={self.run_dir} is in use: {by} holds {self.run_dir / LOCK_FILE}. Two "
            f"runs must not write one folder: wait for that run to end, or choose another "
            f"{self.field}."
        )


def _key(run_dir: Path) -> Path:
    return Path(os.path.realpath(run_dir))


def _open(path: Path) -> int:
    # O_NOFOLLOW: a symlink planted at the lock file's name is refused, never followed
    return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
