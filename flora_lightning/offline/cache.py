"""Where offline assets live, and how they are built once without leaving half-built folders."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from flora_lightning.rundir.checkpoint import write_folder
from flora_lightning.rundir.integrity import CorruptCheckpointError, verify_folder

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root folder for offline assets: ``$FLORA_CACHE_DIR`` or ``~/.cache/flora_lightning``."""
    return Path(os.environ.get("FLORA_CACHE_DIR", Path.home() / ".cache" / "flora_lightning"))


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build ``target`` with ``build(tmp_dir)`` unless a complete copy exists.

    Written by :func:`flora_lightning.rundir.checkpoint.write_folder` (the same atomic writer as run
    directories), so a crash mid-build leaves only a temporary folder next to ``target``, never a
    partial ``target``, and the folder carries a checksum manifest. A cached copy that fails its
    manifest (a damaged disk, a hand-edited file) is rebuilt, with a warning; copies built before
    manifests existed are used as they are. When two processes build at once, the first complete
    folder wins.
    """
    if target.is_dir():
        try:
            verify_folder(target)
            return target
        except CorruptCheckpointError as err:
            log.warning("offline asset cache: %s; rebuilding %s.", err, target)
            return write_folder(target, build)
    return write_folder(target, build, replace=False)
