"""RunDirLock: one process writes a run directory; a refused one is told who holds it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from flora_lightning.rundir.lock import LOCK_FILE, RunDirLock, RunDirLockedError, holder
from flora_lightning.rundir.recorder import RunRecorder

HOLD = textwrap.dedent(
    """
    import sys, time
    from flora_lightning.rundir.lock import RunDirLock
    RunDirLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def held_elsewhere(tmp_path):
    """``tmp_path/run`` locked by another process; yields (run dir, that process)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run_dir, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_process_is_refused_naming_the_holder(held_elsewhere):
    run_dir, proc = held_elsewhere
    with pytest.raises(RunDirLockedError) as info:
        RunDirLock(run_dir).acquire()
    message = str(info.value)
    assert f"process {proc.pid} on host {socket.gethostname()} (since 20" in message
    assert f"trainer.default_root_dir={run_dir} is in use" in message
    assert holder(run_dir)["pid"] == proc.pid


def test_the_lock_is_free_once_the_holder_exits(held_elsewhere):
    run_dir, proc = held_elsewhere
    proc.kill()
    proc.wait()  # killed, not released: the kernel drops the flock with the process
    assert holder(run_dir) is None
    with RunDirLock(run_dir):
        assert holder(run_dir) is None  # held by this process
        record = (run_dir / LOCK_FILE).read_text()
        assert f'"pid": {os.getpid()}' in record


def test_reentrant_in_one_process_and_released_by_the_last_holder(tmp_path):
    outer, inner = RunDirLock(tmp_path / "run"), RunDirLock(tmp_path / "run")
    outer.acquire()
    inner.acquire()
    inner.release()
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from flora_lightning.rundir.lock import holder; "
         "print(holder(sys.argv[1]) is not None)", str(tmp_path / "run")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == "True"  # the outer holder still has it
    outer.release()
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from flora_lightning.rundir.lock import holder; "
         "print(holder(sys.argv[1]) is not None)", str(tmp_path / "run")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == "False"


def test_recorder_open_is_refused_before_writing_anything(held_elsewhere):
    run_dir, proc = held_elsewhere
    recorder = RunRecorder(run_dir)
    with pytest.raises(RunDirLockedError, match=f"process {proc.pid}"):
        recorder.open("trainer: {}\n", "client 0: 1")
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]


@pytest.mark.parametrize(
    "stage, extra",
    [("fit", ["--trainer.rounds", "1", "--trainer.max_local_steps", "1"]), ("validate", [])],
)
def test_flora_on_a_locked_run_dir_exits_1_naming_the_holder(
    held_elsewhere, offline_assets, monkeypatch, capsys, stage, extra
):
    """A fit, or an evaluation (it writes its results there too), on a folder another
    process holds: refused before writing anything, its log lines and error included (the
    folder's flora.log is the holder's)."""
    from pathlib import Path

    from flora_lightning import cli

    run_dir, proc = held_elsewhere
    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    monkeypatch.setattr(sys, "argv", [
        "flora", stage, "--config", str(quickstart), "--trainer.default_root_dir", str(run_dir),
        "--trainer.progress", "false", "--data.partition.num_clients", "2",
        "--data.max_test_samples", "32", *extra,
    ])  # fmt: skip
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(
        f"flora: error: trainer.default_root_dir={run_dir} is in use: process {proc.pid} on host"
    )
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
