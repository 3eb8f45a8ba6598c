"""Where offline assets live, and how they are written without leaving half-built folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Root folder for offline assets: ``$FLORA_CACHE_DIR`` or ``~/.cache/flora_lightning``."""
    return Path(os.environ.get("FLORA_CACHE_DIR", Path.home() / ".cache" / "flora_lightning"))


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build ``target`` with ``build(tmp_dir)`` unless it exists; the rename makes it atomic.

    A crash mid-build leaves only a temporary folder next to ``target``, never a partial
    ``target``, so the next call simply builds again.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # another process won the race only if target now exists
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
