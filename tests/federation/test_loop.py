"""FederatedLoop: communication accounting, client sampling, outputs, checkpoints and resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flora_lightning.callbacks import Callback
from flora_lightning.federation.loop import FederatedLoop
from flora_lightning.methods import LoraSettings
from flora_lightning.rundir.checkpoint import load_state
from flora_lightning.rundir.round_record import RoundRecord

ROUNDS = 3
RANK = 4
SUMMARY_KEYS = {"method", "trainable_params", "final_test_acc", "best_test_acc", "rounds"}
ROUND_KEYS = {"round", "test_acc", "test_loss", "bytes_up", "bytes_down", "seconds"}


class Recorder(Callback):
    """Remembers which clients each round sampled and what each client sent."""

    def __init__(self) -> None:
        self.clients: dict[int, list[int]] = {}
        self.sent: dict[int, list[int]] = {}

    def on_round_start(self, loop, round, clients) -> None:
        self.clients[round] = list(clients)
        self.sent[round] = []

    def on_client_fit_end(self, loop, model, update) -> None:
        self.sent[loop.round].append(
            sum(t.numel() * t.element_size() for t in update.state.values())
        )


@pytest.fixture(scope="module")
def finished(make_flora, make_datamodule, tmp_path_factory):
    """One 3-round run (3 clients, all joining, LoRA rank 4) shared by the output tests."""
    run_dir = tmp_path_factory.mktemp("loop") / "run"
    model = make_flora(LoraSettings(rank=RANK))
    recorder = Recorder()
    loop = FederatedLoop(
        rounds=ROUNDS,
        max_local_steps=2,
        accelerator="cpu",
        default_root_dir=str(run_dir),
        progress=False,
        callbacks=[recorder],
    )
    summary = loop.fit(model, make_datamodule())
    return SimpleNamespace(
        loop=loop, model=model, summary=summary, run_dir=run_dir, recorder=recorder
    )


def trainable_bytes(model) -> int:
    """Independently of the loop: float32 trainable parameters as they are sent."""
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


def test_bytes_counted_equal_tensors_sent(finished):
    per_client = trainable_bytes(finished.model)
    assert per_client == 2 * 2 * RANK * 64 * 4  # 2 layers x (A + B) x rank x width x fp32
    assert finished.summary["trainable_params"] == per_client // 4
    assert finished.summary["bytes_per_client_per_direction"] == per_client
    rounds = finished.summary["rounds"]
    assert rounds[0]["bytes_up"] == rounds[0]["bytes_down"] == 0
    for record in rounds[1:]:
        clients = finished.recorder.clients[record["round"]]
        assert clients == [0, 1, 2]
        assert finished.recorder.sent[record["round"]] == [per_client] * 3
        assert record["bytes_up"] == len(clients) * per_client
        assert record["bytes_down"] == len(clients) * per_client
    assert rounds[-1]["bytes_up_total"] == ROUNDS * 3 * per_client
    assert rounds[-1]["bytes_down_total"] == ROUNDS * 3 * per_client


def test_summary_keys_and_consistency(finished):
    on_disk = json.loads((finished.run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(finished.summary))
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk["method"] == "FLoRA"
    assert on_disk["trainable_params"] == finished.model.num_trainable_parameters() == 1024
    rounds = on_disk["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    for record in rounds:
        assert ROUND_KEYS <= set(record)
        assert 0.0 <= record["test_acc"] <= 1.0
        assert record["test_loss"] > 0
    assert rounds[0]["seconds"] == 0.0
    assert all(r["seconds"] > 0 for r in rounds[1:])
    accs = [r["test_acc"] for r in rounds]
    assert on_disk["final_test_acc"] == accs[-1]
    assert on_disk["best_test_acc"] == max(accs)  # round 0 (zero-shot) included
    assert accs[on_disk["best_round"]] == max(accs)
    # Round 0 is the zero-shot tiny CLIP: better than chance (0.1) on digits.
    assert accs[0] > 0.3
    assert set(rounds[1]["client_train_loss"]) == {"0", "1", "2"}


def test_summary_best_includes_round_zero(finished, tmp_path):
    """A run whose every round is worse than zero-shot reports round 0 as best."""
    loop = FederatedLoop(default_root_dir=str(tmp_path), progress=False)
    loop.history[:] = [
        RoundRecord(round=0, test_acc=0.9, test_loss=1.0),
        RoundRecord(round=1, test_acc=0.5, test_loss=1.0),
        RoundRecord(round=2, test_acc=0.7, test_loss=1.0),
    ]
    summary = loop.summary(finished.model)
    assert summary["best_test_acc"] == 0.9
    assert summary["best_round"] == 0
    assert summary["final_test_acc"] == 0.7


def test_tensorboard_scalars(finished):
    events = list((finished.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    expected = {
        "test/acc",
        "test/loss",
        "client/0/train_loss",
        "client/1/train_loss",
        "client/2/train_loss",
        "comm/bytes_up",
        "comm/bytes_down",
        "time/round_seconds",
    }
    assert expected <= tags
    rounds = finished.summary["rounds"]
    acc = accumulator.Scalars("test/acc")
    assert [e.step for e in acc] == list(range(ROUNDS + 1))
    for event, record in zip(acc, rounds, strict=True):
        assert event.value == pytest.approx(record["test_acc"], abs=1e-6)
    up = accumulator.Scalars("comm/bytes_up")
    assert [e.value for e in up] == [r["bytes_up"] for r in rounds]
    loss0 = accumulator.Scalars("client/0/train_loss")
    assert [e.step for e in loss0] == list(range(1, ROUNDS + 1))
    for event, record in zip(loss0, rounds[1:], strict=True):
        assert event.value == pytest.approx(record["client_train_loss"]["0"], rel=1e-6)


def test_per_round_checkpoints(finished):
    checkpoints = sorted(p.name for p in (finished.run_dir / "checkpoints").glob("round_*"))
    assert checkpoints == [f"round_{r:03d}.safetensors" for r in range(1, ROUNDS + 1)]
    last = load_state(finished.run_dir / "checkpoints" / f"round_{ROUNDS:03d}.safetensors")
    state = finished.model.communicated_state()
    assert set(last) == set(state)
    for name, tensor in state.items():
        assert torch.equal(last[name], tensor)
    first = load_state(finished.run_dir / "checkpoints" / "round_001.safetensors")
    assert any(not torch.equal(first[n], last[n]) for n in last)
    assert (finished.run_dir / "resume" / "state.json").is_file()
    assert json.loads((finished.run_dir / "resume" / "state.json").read_text())["round"] == ROUNDS
    assert (finished.run_dir / "label_table.txt").read_text().startswith("client")
    hidden = [p.name for p in finished.run_dir.rglob(".*")]
    assert hidden == []  # no temporary files or folders left behind


def test_keep_last_checkpoints_prunes(make_flora, make_datamodule, make_loop):
    loop = make_loop(rounds=3, max_local_steps=1, keep_last_checkpoints=2, cache_features=False)
    loop.fit(make_flora(), make_datamodule(max_test_samples=64))
    names = sorted(p.name for p in (loop.run_dir / "checkpoints").glob("round_*"))
    assert names == ["round_002.safetensors", "round_003.safetensors"]


@pytest.mark.parametrize(
    ("join_ratio", "num_clients", "expected"),
    [
        (1.0, 3, 3),
        (0.67, 3, 2),
        (0.3, 10, 3),
        (0.01, 10, 1),
        (0.5, 8, 4),
    ],
)
def test_clients_per_round(tmp_path, join_ratio, num_clients, expected):
    loop = FederatedLoop(join_ratio=join_ratio, default_root_dir=str(tmp_path), seed=3)
    for round_ in range(1, 6):
        clients = loop.sample_clients(round_, num_clients)
        assert len(clients) == expected
        assert clients == sorted(set(clients))
        assert all(0 <= c < num_clients for c in clients)


def test_client_sampling_is_seeded(tmp_path):
    def draws(seed):
        loop = FederatedLoop(join_ratio=0.3, default_root_dir=str(tmp_path), seed=seed)
        return [loop.sample_clients(r, 10) for r in range(1, 11)]

    assert draws(42) == draws(42)
    assert len({tuple(d) for d in draws(42)}) > 1  # rounds differ
    assert draws(42) != draws(43)


def test_join_ratio_in_a_run(make_flora, make_datamodule, make_loop):
    recorder = Recorder()
    loop = make_loop(
        rounds=2, join_ratio=0.5, max_local_steps=1, callbacks=[recorder], cache_features=False
    )
    summary = loop.fit(make_flora(), make_datamodule(num_clients=4, max_test_samples=64))
    per_client = trainable_bytes(loop.model)
    for record in summary["rounds"][1:]:
        expected = loop.sample_clients(record["round"], 4)
        assert len(expected) == 2
        assert recorder.clients[record["round"]] == expected
        assert sorted(int(c) for c in record["client_train_loss"]) == expected
        assert record["bytes_up"] == record["bytes_down"] == 2 * per_client


def test_resume_equals_uninterrupted_run(make_flora, make_datamodule, make_loop):
    full = make_loop(rounds=4, run="a")
    full_summary = full.fit(make_flora(), make_datamodule())

    first = make_loop(rounds=2, run="b")
    first.fit(make_flora(), make_datamodule())
    # As saved by an earlier version: no global copy in resume/, the round's checkpoint is read.
    (first.run_dir / "resume" / "global.safetensors").unlink()
    # A fresh process would build everything again: new model (even another init), new data.
    resumed = make_loop(rounds=4, run="b", resume=True)
    resumed_summary = resumed.fit(make_flora(seed=99), make_datamodule())

    for round_ in (3, 4):
        name = f"checkpoints/round_{round_:03d}.safetensors"
        a, b = load_state(full.run_dir / name), load_state(resumed.run_dir / name)
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    opt_a = load_state(full.run_dir / "resume" / "optimizers.safetensors")
    opt_b = load_state(resumed.run_dir / "resume" / "optimizers.safetensors")
    assert set(opt_a) == set(opt_b)
    for key in opt_a:
        torch.testing.assert_close(opt_b[key], opt_a[key], rtol=0, atol=1e-6)

    def comparable(summary):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in summary["rounds"]]

    assert [r["round"] for r in resumed_summary["rounds"]] == [0, 1, 2, 3, 4]
    a_rounds, b_rounds = comparable(full_summary), comparable(resumed_summary)
    for ra, rb in zip(a_rounds, b_rounds, strict=True):
        assert rb["round"] == ra["round"]
        assert rb["bytes_up"] == ra["bytes_up"] and rb["bytes_down"] == ra["bytes_down"]
        assert rb["bytes_up_total"] == ra["bytes_up_total"]
        assert rb["test_acc"] == pytest.approx(ra["test_acc"], abs=1e-6)
        assert rb["test_loss"] == pytest.approx(ra["test_loss"], abs=1e-5)
        assert rb["client_train_loss"] == pytest.approx(ra["client_train_loss"], abs=1e-5)
    assert resumed_summary["final_test_acc"] == pytest.approx(full_summary["final_test_acc"])


class CrashAtRound(Callback):
    """Stands for a killed process: raises once ``round`` is recorded, before it is saved."""

    def __init__(self, round: int) -> None:
        self.round = round

    def on_round_end(self, loop, round, record) -> None:
        if round == self.round:
            raise KeyboardInterrupt(f"killed in round {round}")


def test_sparse_resume_state_restarts_from_the_last_one_written(
    make_flora, make_datamodule, make_loop
):
    full = make_loop(rounds=4, run="a", keep_last_checkpoints=1)
    full.fit(make_flora(), make_datamodule())

    crashed = make_loop(rounds=4, run="b", resume_every_n_rounds=2, keep_last_checkpoints=1)
    crashed.callbacks.append(CrashAtRound(4))
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(make_flora(), make_datamodule())
    state = json.loads((crashed.run_dir / "resume" / "state.json").read_text())
    assert state["round"] == 2  # written after round 2, not after 1, 3 or the unfinished 4
    # The global state travels with the resume state: round 2's checkpoint was pruned.
    checkpoints = sorted(p.name for p in (crashed.run_dir / "checkpoints").glob("round_*"))
    assert checkpoints == ["round_003.safetensors"]

    resumed = make_loop(rounds=4, run="b", resume=True, resume_every_n_rounds=2)
    summary = resumed.fit(make_flora(seed=99), make_datamodule())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3, 4]
    a = load_state(full.run_dir / "checkpoints" / "round_004.safetensors")
    b = load_state(resumed.run_dir / "checkpoints" / "round_004.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert json.loads((resumed.run_dir / "resume" / "state.json").read_text())["round"] == 4
    with pytest.raises(ValueError, match="resume_every_n_rounds must be >= 1"):
        make_loop(resume_every_n_rounds=0)


def test_existing_run_without_resume_refused(make_flora, make_datamodule, make_loop):
    datamodule = make_datamodule(max_test_samples=64)
    loop = make_loop(rounds=1, max_local_steps=1, cache_features=False)
    loop.fit(make_flora(), datamodule)
    summary_before = (loop.run_dir / "summary.json").read_bytes()
    checkpoint_before = (loop.run_dir / "checkpoints" / "round_001.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--trainer.resume") as err:
        make_loop(rounds=1, max_local_steps=1).fit(make_flora(), datamodule)
    assert str(loop.run_dir) in str(err.value)
    assert (loop.run_dir / "summary.json").read_bytes() == summary_before
    assert (
        loop.run_dir / "checkpoints" / "round_001.safetensors"
    ).read_bytes() == checkpoint_before


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rounds": -1}, "trainer.rounds"),
        ({"local_epochs": 0}, "trainer.local_epochs"),
        ({"max_local_steps": 0}, "trainer.max_local_steps"),
        ({"join_ratio": 0.0}, "trainer.join_ratio"),
        ({"join_ratio": 1.5}, "trainer.join_ratio"),
        ({"precision": "64-true"}, "trainer.precision"),
        ({"keep_last_checkpoints": 0}, "trainer.keep_last_checkpoints"),
        ({"on_too_few_updates": "ignore"}, "trainer.on_too_few_updates"),
    ],
)
def test_invalid_settings_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError) as err:
        FederatedLoop(default_root_dir=str(tmp_path), **kwargs)
    assert str(err.value).startswith(field)
    assert not any(tmp_path.iterdir())


class Diverge(Callback):
    """Makes one client's local fit diverge in one round (its loss becomes NaN)."""

    def __init__(self, model, client: int, round_: int) -> None:
        self.poison = False
        step = model.training_step
        model.training_step = lambda *a, **k: step(*a, **k) * (float("nan") if self.poison else 1)
        self.client, self.round = client, round_

    def on_client_fit_start(self, loop, model, client_id) -> None:
        self.poison = (loop.round, client_id) == (self.round, self.client)


def test_a_diverging_client_is_recorded_and_its_optimizer_state_reset(
    make_flora, make_datamodule, tmp_path
):
    model = make_flora()
    states = {}

    class Snapshot(Callback):
        def on_round_end(self, loop, round, record) -> None:
            states[round] = {c: dict(s) for c, s in loop.local_trainer.optimizer_states.items()}

    loop = FederatedLoop(
        rounds=3,
        max_local_steps=2,
        accelerator="cpu",
        default_root_dir=str(tmp_path / "run"),
        progress=False,
        callbacks=[Diverge(model, client=1, round_=2), Snapshot()],
    )
    summary = loop.fit(model, make_datamodule())
    rounds = summary["rounds"]
    assert rounds[0]["accepted_clients"] == [] and rounds[0]["rejected_clients"] == {}
    assert rounds[1]["accepted_clients"] == [0, 1, 2] and rounds[1]["rejected_clients"] == {}
    assert rounds[2]["accepted_clients"] == [0, 2]
    assert list(rounds[2]["rejected_clients"]) == ["1"]
    assert "holds NaN or Inf" in rounds[2]["rejected_clients"]["1"]
    # Its NaN Adam moments are dropped, not kept to poison round 3 ...
    assert set(states[1]) == {0, 1, 2} and set(states[2]) == {0, 2}
    # ... so in round 3 it trains from a fresh optimizer, is accepted, and all stays finite.
    assert rounds[3]["accepted_clients"] == [0, 1, 2]
    for slots in states[3][1].values():
        assert all(torch.isfinite(v).all() for v in slots.values() if torch.is_tensor(v))
    assert all(torch.isfinite(t).all() for t in model.communicated_state().values())
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"]
    assert on_disk[2]["rejected_clients"] == rounds[2]["rejected_clients"]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    rejected = {e.step: e.value for e in events.Scalars("clients/rejected")}
    assert rejected == {1: 0.0, 2: 1.0, 3: 0.0}


def test_checkpoints_are_verified_and_a_damaged_resume_state_falls_back_one_round(
    make_flora, make_datamodule, make_loop
):
    from flora_lightning.rundir.checkpoint import CorruptCheckpointError

    full = make_loop(rounds=3, run="a")
    full.fit(make_flora(), make_datamodule())
    first = make_loop(rounds=2, run="b")
    first.fit(make_flora(), make_datamodule())
    manifest = json.loads((first.run_dir / "checkpoints" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["round_001.safetensors", "round_002.safetensors"]
    # A flipped byte in round 2's checkpoint: loading it names the file.
    checkpoint = first.run_dir / "checkpoints" / "round_002.safetensors"
    damaged = bytearray(checkpoint.read_bytes())
    damaged[-1] ^= 0xFF
    (first.run_dir / "copy.safetensors").write_bytes(checkpoint.read_bytes())
    checkpoint.write_bytes(bytes(damaged))
    with pytest.raises(CorruptCheckpointError, match="round_002.safetensors"):
        load_state(checkpoint)
    (first.run_dir / "copy.safetensors").replace(checkpoint)
    # The newest resume state is truncated: resume falls back to round 1's (kept as .prev).
    optimizers = first.run_dir / "resume" / "optimizers.safetensors"
    optimizers.write_bytes(optimizers.read_bytes()[:100])
    resumed = make_loop(rounds=3, run="b", resume=True)
    summary = resumed.fit(make_flora(seed=9), make_datamodule())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3]
    a = load_state(full.run_dir / "checkpoints" / "round_003.safetensors")
    b = load_state(resumed.run_dir / "checkpoints" / "round_003.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_resume_state_written_in_shards_resumes_the_same(
    make_flora, make_datamodule, make_loop, monkeypatch
):
    """The optimizer states go to resume/ shard by shard (one shard's serialised copy in RAM
    at a time), packed; a resume reads every shard back."""
    from flora_lightning.client_state import optimizer_shards as optimizer_states
    from flora_lightning.rundir.recorder import shard_file

    full = make_loop(rounds=3, run="a")
    full.fit(make_flora(), make_datamodule())
    monkeypatch.setattr(optimizer_states, "SHARD_BYTES", 1)  # every client a shard of its own
    first = make_loop(rounds=2, run="b")
    first.fit(make_flora(), make_datamodule())
    resume = first.run_dir / "resume"
    shards = [load_state(resume / shard_file("optimizers", i)) for i in range(3)]
    assert not (resume / shard_file("optimizers", 3)).exists()
    assert [set(s) for s in shards] == [
        {f"{c}.packed.float32", f"layout.{c}"} for c in range(3)
    ]  # one buffer per client (all of its Adam slots) and the shard's layout
    resumed = make_loop(rounds=3, run="b", resume=True)
    resumed.fit(make_flora(seed=99), make_datamodule())
    name = "checkpoints/round_003.safetensors"
    a, b = load_state(full.run_dir / name), load_state(resumed.run_dir / name)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_on_too_few_updates_skip_records_the_round_and_goes_on(
    make_flora, make_datamodule, make_loop
):
    """``trainer.on_too_few_updates=skip``: a round with fewer than min_clients accepted
    updates keeps the global state and the run goes on (the default, raise, stops it:
    tests/test_client_faults.py)."""
    from flora_lightning.strategy import FedAvg

    model = make_flora()
    loop = make_loop(rounds=3, on_too_few_updates="skip", strategy=FedAvg(min_clients=3))
    loop.callbacks.append(Diverge(model, client=1, round_=2))
    summary = loop.fit(model, make_datamodule())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[2]["accepted_clients"] == [0, 2] and set(rounds[2]["rejected_clients"]) == {"1"}
    assert (rounds[2]["test_acc"], rounds[2]["test_loss"]) == (
        rounds[1]["test_acc"],
        rounds[1]["test_loss"],
    )
    checkpoints = loop.run_dir / "checkpoints"
    before = load_state(checkpoints / "round_001.safetensors")
    after = load_state(checkpoints / "round_002.safetensors")
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert rounds[3]["accepted_clients"] == [0, 1, 2]  # it trains again
