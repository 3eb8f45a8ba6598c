"""OptimizerStore on disk: one folder per run, pruning by round, foreign or damaged files refused."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from flora_lightning.flower.optimizer_store import OptimizerStore, run_fingerprint
from flora_lightning.rundir.integrity import CorruptCheckpointError

RUN_A = "model: {class_path: FLoRA}\ntrainer: {seed: 1, rounds: 5, default_root_dir: runs/a}\n"
RUN_A_LONGER = RUN_A.replace("rounds: 5", "rounds: 9")  # a resumed run: same fingerprint
RUN_B = RUN_A.replace("seed: 1", "seed: 2")
RUN_A_ELSEWHERE = RUN_A.replace("runs/a", "runs/a2")


def store(tmp_path, config_yaml: str = RUN_A, keep: int = 2) -> OptimizerStore:
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "state-dir": str(tmp_path)},
        state=RecordDict(),
        run_config={},
    )
    return OptimizerStore(context, 0, keep, config_yaml)


def adam(step: float) -> dict[int, dict]:
    """Client 0's optimizer state after ``step`` steps (one slot, its own value)."""
    return {0: {0: {"step": torch.tensor(step), "exp_avg": torch.full((2,), step)}}}


def steps(states: dict[int, dict]) -> float | None:
    return float(states[0][0]["step"]) if states else None


def rounds_on_disk(s: OptimizerStore) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in s.folder.glob("round_*.safetensors"))


def test_the_fingerprint_names_the_run_not_its_length():
    assert run_fingerprint(RUN_A) == run_fingerprint(RUN_A_LONGER)
    assert run_fingerprint(RUN_A) != run_fingerprint(RUN_B)
    assert run_fingerprint(RUN_A) != run_fingerprint(RUN_A_ELSEWHERE)


def test_an_earlier_runs_files_are_neither_loaded_nor_prune_the_new_one(tmp_path):
    """Keyed by partition only, run B loaded run A's state, and its pruning (the 2 newest
    rounds kept: A's 4 and 5) deleted B's round 1 file just written."""
    a = store(tmp_path)
    for r in range(1, 6):
        a.save(r, adam(10.0 * r))
    b = store(tmp_path, RUN_B)
    assert steps(b.load(2)) is None  # nothing of B's own yet; A's round 1 is not B's
    b.save(1, adam(1.0))
    assert rounds_on_disk(b) == [1]
    assert steps(b.load(2)) == 1.0
    assert rounds_on_disk(a) == [4, 5]  # A's files untouched
    assert steps(store(tmp_path, RUN_A_LONGER).load(6)) == 50.0  # A resumed: its own state


def test_a_run_started_again_from_round_1_keeps_what_it_writes(tmp_path):
    """Files of rounds after the one written are from before the server resumed earlier (or
    started again): they are deleted, and never count towards ``keep``."""
    s = store(tmp_path)
    for r in range(1, 6):
        s.save(r, adam(10.0 * r))
    assert rounds_on_disk(s) == [4, 5]
    s.save(1, adam(1.0))
    assert rounds_on_disk(s) == [1]
    assert steps(s.load(2)) == 1.0


def test_pruning_sorts_by_round_number_past_999(tmp_path):
    s = store(tmp_path)
    for r in (998, 999, 1000, 1001):
        s.save(r, adam(float(r)))
    assert rounds_on_disk(s) == [1000, 1001]
    assert steps(s.load(1002)) == 1001.0


def test_a_file_the_store_did_not_write_is_refused(tmp_path):
    s = store(tmp_path)
    s.save(1, adam(1.0))
    (s.folder / "round_002.safetensors").write_bytes(
        (s.folder / "round_001.safetensors").read_bytes()
    )
    with pytest.raises(CorruptCheckpointError, match="round_002.safetensors: an optimizer state"):
        s.load(3)


def test_a_damaged_file_fails_its_checksum(tmp_path):
    s = store(tmp_path)
    s.save(1, adam(1.0))
    path = s.folder / "round_001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the tensor bytes: still a readable safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        s.load(2)


def test_files_in_the_layout_before_fingerprints_are_named_not_loaded(tmp_path, caplog):
    """``<state-dir>/partition-0/round_001.safetensors`` (an older version's layout) is not
    loaded, and the warning names it and the run's folder to move it to."""
    s = store(tmp_path)
    old = tmp_path / "partition-0"
    old.mkdir()
    (old / "round_001.safetensors").write_bytes(b"from an older version")
    with caplog.at_level("WARNING", logger="flora_lightning.flower.optimizer_store"):
        assert s.load(2) == {}
    text = caplog.text
    assert f"{old} holds optimizer states in the layout before run fingerprints" in text
    assert f"move them into {s.folder}" in text
    caplog.clear()
    with caplog.at_level("WARNING", logger="flora_lightning.flower.optimizer_store"):
        store(tmp_path / "elsewhere").load(2)  # no old folder there: only the usual warning
    assert "layout before run fingerprints" not in caplog.text
