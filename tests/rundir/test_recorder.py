"""RunRecorder: checkpoint pruning by round, the manifest a resume requires, safe text writes."""

from __future__ import annotations

import pytest
import torch

from flora_lightning.federation.settings import check_settings
from flora_lightning.rundir.checkpoint import CorruptCheckpointError
from flora_lightning.rundir.recorder import RunRecorder
from flora_lightning.rundir.round_record import RoundRecord


class TinyModel:
    """What RunRecorder.save/summary read from a method: one trainable tensor."""

    method_name = "FLoRA"
    name_or_path = "tiny"

    def __init__(self) -> None:
        self.w = torch.zeros(3)

    def trainable_named_parameters(self):
        return [("w", self.w)]

    def num_trainable_parameters(self) -> int:
        return self.w.numel()


def record(round_: int) -> RoundRecord:
    return RoundRecord(round=round_, test_acc=0.5, test_loss=1.0)


def save_round(recorder: RunRecorder, model: TinyModel, round_: int) -> None:
    model.w = torch.full((3,), float(round_))
    recorder.history.append(record(round_))
    recorder.save(round_, model, {"optimizers": {"m": torch.full((2,), float(round_))}}, {})


def checkpoint_names(run_dir) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").glob("round_*.safetensors")}


def test_keep_last_checkpoints_prunes_by_round_number_across_999_to_1001(tmp_path):
    """Sorted as text, round_1000 comes before round_999: it deleted the file just written."""
    recorder = RunRecorder(tmp_path, keep_last_checkpoints=2, rounds=1001)
    model = TinyModel()
    save_round(recorder, model, 999)
    assert checkpoint_names(tmp_path) == {"round_999.safetensors"}
    save_round(recorder, model, 1000)
    assert checkpoint_names(tmp_path) == {"round_999.safetensors", "round_1000.safetensors"}
    save_round(recorder, model, 1001)
    assert checkpoint_names(tmp_path) == {"round_1000.safetensors", "round_1001.safetensors"}

    round_, state, states, _ = RunRecorder(tmp_path, resume=True).restore(("optimizers",))
    assert round_ == 1001
    assert torch.equal(state["w"], torch.full((3,), 1001.0))
    assert torch.equal(states["optimizers"]["m"], torch.full((2,), 1001.0))


def saved_run(tmp_path) -> RunRecorder:
    recorder = RunRecorder(tmp_path, rounds=2)
    model = TinyModel()
    save_round(recorder, model, 1)
    save_round(recorder, model, 2)
    return recorder


def test_resume_folder_without_manifest_is_refused_unless_allowed(tmp_path):
    saved_run(tmp_path)
    for folder in ("resume", "resume.prev"):
        (tmp_path / folder / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="resume_without_manifest true") as info:
        RunRecorder(tmp_path, resume=True).restore(("optimizers",))
    assert f"{tmp_path / 'resume'} has no manifest.json" in str(info.value)

    allowed = RunRecorder(tmp_path, resume=True, resume_without_manifest=True)
    round_, state, _, _ = allowed.restore(("optimizers",))
    assert round_ == 2 and torch.equal(state["w"], torch.full((3,), 2.0))


def test_resume_without_manifest_falls_back_to_a_verified_prev(tmp_path, caplog):
    """Only resume/ lost its manifest: the previous resume point (round 1) verifies."""
    saved_run(tmp_path)
    (tmp_path / "resume" / "manifest.json").unlink()
    round_, state, _, _ = RunRecorder(tmp_path, resume=True).restore(("optimizers",))
    assert round_ == 1 and torch.equal(state["w"], torch.full((3,), 1.0))
    assert "has no manifest.json" in caplog.text


def test_resume_without_manifest_must_be_a_bool():
    base = dict(
        rounds=1, local_epochs=1, max_local_steps=None, join_ratio=1.0, precision="32-true",
        resume_every_n_rounds=1, keep_last_checkpoints=None, on_client_error="skip",
    )  # fmt: skip
    with pytest.raises(ValueError, match="trainer.resume_without_manifest must be true or false"):
        check_settings(**base, resume_without_manifest="yes")


@pytest.mark.parametrize("name", ["config.yaml", "label_table.txt"])
def test_open_never_writes_through_a_symlink(tmp_path, name):
    """A symlink at the target (or at its temporary name) pointing outside is not followed:
    neither the file it names is created nor the one it points to changed."""
    run_dir, outside, planted = tmp_path / "run", tmp_path / "outside.txt", tmp_path / "planted"
    run_dir.mkdir()
    outside.write_text("precious\n")
    (run_dir / name).symlink_to(planted)  # dangling: following it would create ``planted``
    (run_dir / f".{name}.tmp").symlink_to(outside)
    recorder = RunRecorder(run_dir)
    recorder.open("trainer: {rounds: 1}\n", "client 0: 3")
    recorder.close()
    assert outside.read_text() == "precious\n"
    assert not planted.exists()
    written = run_dir / name
    assert not written.is_symlink() and written.is_file()
    expected = "trainer: {rounds: 1}\n" if name == "config.yaml" else "client 0: 3\n"
    assert written.read_text() == expected
    assert not (run_dir / f".{name}.tmp").exists()
