"""What state a run directory is in, read from its files alone (``flora fit``'s outputs).

- **finished**: ``summary.json`` reaches the configured last round and ``final/`` exists;
- **resumable**: unfinished, with a ``resume/`` state to continue from (``--trainer.resume``);
- **failed**: unfinished, with the sweep's ``failed.json`` and nothing to resume;
- **incomplete**: something is there (a run stopped before its first resume state);
- **missing**: nothing is there (an empty folder, or only its ``run.lock``).

Both the runner (what to do with a cell) and the report (which cells count) use this.
"""

from __future__ import annotations

import json
import shutil
import traceback
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import yaml

from flora_lightning.rundir.checkpoint import write_json
from flora_lightning.rundir.lock import LOCK_FILE

FAILED_FILE = "failed.json"


class RunState(StrEnum):
    """A run directory's state (see the module docstring)."""

    FINISHED = "finished"
    RESUMABLE = "resumable"
    FAILED = "failed"
    INCOMPLETE = "incomplete"
    MISSING = "missing"


def read_summary(run_dir: Path) -> dict | None:
    """``summary.json`` with at least one round, or None (absent or unreadable)."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("rounds") else None


def configured_rounds(run_dir: Path) -> int | None:
    """``trainer.rounds`` of the run's latest config (``config.resumed.yaml`` after a resume)."""
    for name in ("config.resumed.yaml", "config.yaml"):
        try:
            config = yaml.safe_load((Path(run_dir) / name).read_text())
            return int(config["trainer"]["rounds"])
        except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
            continue
    return None


def run_state(run_dir: Path, rounds: int | None = None) -> RunState:
    """The state of ``run_dir`` for a run of ``rounds`` rounds (default: its own config's).

    A run with more rounds than asked counts as finished.
    """
    run_dir = Path(run_dir)
    rounds = configured_rounds(run_dir) if rounds is None else rounds
    summary = read_summary(run_dir)
    if (
        summary is not None
        and rounds is not None
        and (run_dir / "final").is_dir()
        and summary["rounds"][-1]["round"] >= rounds
    ):
        return RunState.FINISHED
    if (run_dir / "resume" / "state.json").is_file():
        return RunState.RESUMABLE
    if (run_dir / FAILED_FILE).is_file():
        return RunState.FAILED
    if run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        return RunState.INCOMPLETE
    return RunState.MISSING


def write_failure(run_dir: Path, cell_id: str, err: BaseException, args: list[str]) -> Path:
    """Record a cell's error in ``run_dir/failed.json``; returns its path."""
    path = Path(run_dir) / FAILED_FILE
    write_json(
        {
            "cell": cell_id,
            "error_type": type(err).__name__,
            "message": str(err),
            "traceback": "".join(traceback.format_exception(err)),
            "args": ["fit", *args],
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        path,
    )
    return path


def clear_run_dir(run_dir: Path) -> None:
    """Remove everything in ``run_dir`` but its ``run.lock`` (held by the caller: removing the
    lock file would let another process lock a new one while this one still holds the old)."""
    for path in Path(run_dir).iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def read_failure(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / FAILED_FILE).read_text())
    except (OSError, ValueError):
        return None
