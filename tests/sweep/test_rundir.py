"""``flora_lightning.sweep.rundir``: a run directory's state from its files, failure records."""

from __future__ import annotations

import json

from fake_runs import fake_run

from flora_lightning.sweep import RunState, read_summary, run_state, write_failure
from flora_lightning.sweep.rundir import configured_rounds, read_failure


def test_states(tmp_path):
    assert run_state(tmp_path / "none") is RunState.MISSING
    (tmp_path / "empty").mkdir()
    assert run_state(tmp_path / "empty") is RunState.MISSING
    (tmp_path / "empty" / "run.lock").write_text("")  # left by a run that never began
    assert run_state(tmp_path / "empty") is RunState.MISSING

    fake_run(tmp_path / "done", [0.5, 0.6, 0.7])
    assert configured_rounds(tmp_path / "done") == 2
    assert run_state(tmp_path / "done") is RunState.FINISHED
    assert run_state(tmp_path / "done", rounds=2) is RunState.FINISHED
    assert run_state(tmp_path / "done", rounds=1) is RunState.FINISHED  # more than asked
    # Asked for more rounds than it has: continue from its resume state.
    fake_run(tmp_path / "short", [0.5, 0.6], resume=True)
    assert run_state(tmp_path / "short") is RunState.FINISHED
    assert run_state(tmp_path / "short", rounds=4) is RunState.RESUMABLE

    # Interrupted after round 1 of 3: summary and resume state, no final/.
    fake_run(tmp_path / "cut", [0.5, 0.6], rounds=3, final=False, resume=True)
    assert run_state(tmp_path / "cut") is RunState.RESUMABLE
    # Stopped before the first resume state.
    fake_run(tmp_path / "early", [0.5], rounds=3, final=False)
    assert run_state(tmp_path / "early") is RunState.INCOMPLETE
    (tmp_path / "configonly").mkdir()
    (tmp_path / "configonly" / "config.yaml").write_text("trainer: {rounds: 3}\n")
    assert run_state(tmp_path / "configonly") is RunState.INCOMPLETE
    # A summary.json without a readable config: its rounds are unknown, so not finished.
    fake_run(tmp_path / "noconfig", [0.5, 0.6])
    (tmp_path / "noconfig" / "config.yaml").unlink()
    assert run_state(tmp_path / "noconfig") is RunState.INCOMPLETE
    assert run_state(tmp_path / "noconfig", rounds=1) is RunState.FINISHED


def test_resumed_config_wins(tmp_path):
    fake_run(tmp_path / "run", [0.5, 0.6, 0.7])
    (tmp_path / "run" / "config.resumed.yaml").write_text("trainer: {rounds: 5}\n")
    assert configured_rounds(tmp_path / "run") == 5
    assert run_state(tmp_path / "run") is RunState.INCOMPLETE


def test_unreadable_summary(tmp_path):
    fake_run(tmp_path / "run", [0.5, 0.6])
    (tmp_path / "run" / "summary.json").write_text("{not json")
    assert read_summary(tmp_path / "run") is None
    assert run_state(tmp_path / "run") is RunState.INCOMPLETE


def test_failure_record(tmp_path):
    try:
        raise RuntimeError("model.name_or_path: could not load CLIP model '/nope'")
    except RuntimeError as err:
        path = write_failure(tmp_path / "cell", "d/p/m/seed0", err, ["--config", "x.yaml"])
    assert path == tmp_path / "cell" / "failed.json"
    record = json.loads(path.read_text())
    assert record["cell"] == "d/p/m/seed0"
    assert record["error_type"] == "RuntimeError"
    assert record["message"] == "model.name_or_path: could not load CLIP model '/nope'"
    assert "Traceback (most recent call last)" in record["traceback"]
    assert 'raise RuntimeError("model.name_or_path' in record["traceback"]
    assert record["args"] == ["fit", "--config", "x.yaml"]
    assert read_failure(tmp_path / "cell") == record
    assert run_state(tmp_path / "cell") is RunState.FAILED
    # A failed cell with a resume state is resumed, not restarted.
    fake_run(tmp_path / "cell", [0.5], rounds=3, final=False, resume=True)
    assert run_state(tmp_path / "cell") is RunState.RESUMABLE
