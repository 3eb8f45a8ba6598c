"""Running a sweep: validate every cell, then run, resume or skip each one; record failures.

Each cell runs through the ordinary command line, ``flora fit`` (:func:`flora_lightning.stages.fit`)
in this process, so a cell's folder is an ordinary run directory. What happens to a cell
depends on its folder (:func:`~flora_lightning.sweep.rundir.run_state`):

- finished (all rounds, ``final/``): skipped;
- resumable (a ``resume/`` state, unfinished): ``--trainer.resume true`` continues after the
  last saved round (also how a cell whose ``trainer.rounds`` was raised gets extended);
- incomplete or failed without a resume state: the folder is cleared and the cell starts fresh;
- missing: it starts;
- busy (another process holds the folder's ``run.lock``: another sweep, or a ``flora fit``,
  is writing it): left alone, its status ``busy`` naming the holder; a later run handles it.

The runner holds the cell's lock (:class:`~flora_lightning.rundir.lock.RunDirLock`) from reading
its state to the end of its run, so two sweep processes never clear or write one cell at once.

A cell that raises is recorded in its ``failed.json`` (error type, message, traceback, the
arguments) and the sweep goes on; a later run retries it. ``OUT/sweep.json`` (with ``--shard
i/n``: ``OUT/sweep_shard<i>of<n>.json``) lists every cell of this run with its status; it is
rewritten after each cell.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flora_lightning.rundir.checkpoint import write_json
from flora_lightning.rundir.lock import RunDirLock, RunDirLockedError
from flora_lightning.sweep.cells import Cell, Shard, cell_args, expand_cells, validate_cells
from flora_lightning.sweep.rundir import (
    FAILED_FILE,
    RunState,
    clear_run_dir,
    read_summary,
    run_state,
    write_failure,
)
from flora_lightning.sweep.spec import SweepSpec

ACTIONS = {
    RunState.FINISHED: "skip",
    RunState.RESUMABLE: "resume",
    RunState.FAILED: "run",
    RunState.INCOMPLETE: "run",
    RunState.MISSING: "run",
}
"""What the runner does with a cell in each state."""


@dataclass
class CellResult:
    """What happened to one cell in this run (an entry of ``sweep.json``)."""

    cell: str
    """The cell id, ``<dataset>/<partition>/<method>/seed<k>``."""
    run_dir: str
    """Its run directory."""
    state: str
    """Its folder's state before this run: finished, resumable, failed, incomplete, missing."""
    action: str
    """``skip``, ``resume`` or ``run`` (from scratch, in a cleared folder)."""
    status: str
    """``skipped`` (already finished), ``done``, ``failed``, ``busy`` (another process is
    writing its folder), or ``planned`` (dry run)."""
    seconds: float = 0.0
    """Wall-clock seconds of this run of the cell."""
    best_test_acc: float | None = None
    """From its summary.json, when finished."""
    error: str | None = None
    """``Type: message`` of a failure."""


def sweep_record_path(out: Path, shard: Shard | None) -> Path:
    name = "sweep.json" if shard is None else f"sweep_shard{shard.index}of{shard.count}.json"
    return Path(out) / name


def run_sweep(
    spec: SweepSpec, out: str | Path, shard: Shard | None = None, dry_run: bool = False
) -> dict:
    """Run this shard's cells of ``spec`` into ``out``; returns the ``sweep.json`` record.

    Every cell of the grid (all shards) is validated first; nothing runs if one is invalid.
    With ``dry_run`` the cells and what would happen to each are printed and nothing is
    written.
    """
    out = Path(out)
    cells = expand_cells(spec)
    configs = validate_cells(spec, cells, out)
    mine = shard.select(cells) if shard else cells
    where = f" (shard {shard}: {len(mine)} of {len(cells)})" if shard else ""
    print(f"[sweep] {spec.source}: {len(mine)} cells{where} into {out}", flush=True)
    record = {
        "spec": spec.source,
        "out": str(out),
        "shard": str(shard) if shard else None,
        "dry_run": dry_run,
        "cells_total": len(cells),
        "wall_seconds": 0.0,
        "cells": [],
    }
    start = time.perf_counter()
    for k, cell in enumerate(mine, 1):
        rounds = configs[cell].trainer.rounds
        if dry_run:
            result = _plan(cell, out, rounds)
            print(f"[{k}/{len(mine)}] {cell.id}: {result.action} ({result.state})", flush=True)
        else:
            result = run_cell(spec, cell, out, rounds, f"[{k}/{len(mine)}]")
        record["cells"].append(asdict(result))
        record["wall_seconds"] = time.perf_counter() - start
        if not dry_run:
            write_json(record, sweep_record_path(out, shard))
    statuses = [c["status"] for c in record["cells"]]
    counts = {
        s: statuses.count(s)
        for s in ("done", "skipped", "failed", "busy", "planned")
        if s in statuses
    }
    record["counts"] = counts
    if not dry_run:
        write_json(record, sweep_record_path(out, shard))
        print(
            f"[sweep] {', '.join(f'{n} {s}' for s, n in counts.items()) or 'no cells'} in "
            f"{record['wall_seconds']:.0f} s",
            flush=True,
        )
    return record


def _plan(cell: Cell, out: Path, rounds: int) -> CellResult:
    run_dir = cell.run_dir(out)
    state = run_state(run_dir, rounds)
    return CellResult(cell.id, str(run_dir), state.value, ACTIONS[state], "planned")


def run_cell(spec: SweepSpec, cell: Cell, out: Path, rounds: int, tag: str = "") -> CellResult:
    """Skip, resume or (re)start one cell under its folder's lock; a failure is recorded, never
    raised; a folder another process holds is left alone (status ``busy``)."""
    run_dir = cell.run_dir(out)
    lock = RunDirLock(run_dir, field=f"cell {cell.id}: folder")
    try:
        lock.acquire()
    except RunDirLockedError as err:
        result = CellResult(cell.id, str(run_dir), "busy", "skip", "busy", error=str(err))
        print(f"{tag} {cell.id} left alone: {err}", flush=True)
        return result
    try:
        return _run_locked_cell(spec, cell, out, rounds, tag)
    finally:
        lock.release()


def _run_locked_cell(spec: SweepSpec, cell: Cell, out: Path, rounds: int, tag: str) -> CellResult:
    from flora_lightning.callbacks.memory import release_free_memory
    from flora_lightning.stages import fit

    run_dir = cell.run_dir(out)
    state = run_state(run_dir, rounds)
    result = CellResult(cell.id, str(run_dir), state.value, ACTIONS[state], "skipped")
    if state is RunState.FINISHED:
        result.best_test_acc = read_summary(run_dir)["best_test_acc"]
        print(f"{tag} {cell.id} skipped (finished; best acc {result.best_test_acc:.4f})")
        return result
    args = cell_args(spec, cell, out)
    if state is RunState.RESUMABLE:
        args += ["--trainer.resume", "true"]
        print(f"{tag} {cell.id}: resuming", flush=True)
    else:
        if run_dir.exists():  # a run that stopped before its first resume state, or failed
            clear_run_dir(run_dir)
        print(f"{tag} {cell.id}: running", flush=True)
    t0 = time.perf_counter()
    try:
        summary = fit(args)
    except (Exception, SystemExit) as err:  # one cell's failure must not stop the sweep
        result.seconds = time.perf_counter() - t0
        result.status = "failed"
        result.error = f"{type(err).__name__}: {err}"
        path = write_failure(run_dir, cell.id, err, args)
        print(f"{tag} {cell.id} failed ({result.error}; see {path})", flush=True)
        return result
    finally:
        release_free_memory()
    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # a retried cell that now succeeded
    result.seconds = time.perf_counter() - t0
    result.status = "done"
    result.best_test_acc = summary["best_test_acc"]
    print(
        f"{tag} {cell.id} done (best acc {result.best_test_acc:.4f}, {result.seconds:.1f} s)",
        flush=True,
    )
    return result
