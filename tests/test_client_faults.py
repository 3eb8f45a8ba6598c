"""Faults inside the in-process loop: crashing and diverging clients, resume edge cases."""

from __future__ import annotations

import json

import pytest
import torch

from flora_lightning.callbacks import Callback
from flora_lightning.federation.loop import RoundFailedError
from flora_lightning.rundir.checkpoint import load_state
from flora_lightning.strategy import FedAdam


class FailClient(Callback):
    """Makes the local fit of ``clients`` in ``round_`` raise ``error`` (e.g. out of memory)."""

    def __init__(self, model, clients: set[int], round_: int, error: Exception) -> None:
        self.fail = False
        step = model.training_step

        def failing_step(*args, **kwargs):
            if self.fail:
                raise error
            return step(*args, **kwargs)

        model.training_step = failing_step
        self.clients, self.round = clients, round_

    def on_client_fit_start(self, loop, model, client_id) -> None:
        self.fail = loop.round == self.round and client_id in self.clients


OOM = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize(
    ("on_client_error", "failing", "min_clients", "expected"),
    [
        ("skip", {1}, 1, "round continues"),
        ("skip", {0, 1}, 2, "run stops"),
        ("raise", {1}, 1, "error raised"),
    ],
)
def test_a_client_whose_fit_raises(
    make_flora, make_datamodule, make_loop, on_client_error, failing, min_clients, expected
):
    from flora_lightning.strategy import FedAvg

    model = make_flora()
    loop = make_loop(
        rounds=3, on_client_error=on_client_error, strategy=FedAvg(min_clients=min_clients)
    )
    loop.callbacks.append(FailClient(model, failing, round_=2, error=OOM))

    if expected == "round continues":
        summary = loop.fit(model, make_datamodule())
        record = summary["rounds"][2]
        assert record["accepted_clients"] == [0, 2]
        assert record["rejected_clients"] == {
            "1": "its fit raised RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
        }
        assert summary["rounds"][3]["accepted_clients"] == [0, 1, 2]  # it trains again
        assert sorted(loop.local_trainer.optimizer_states) == [0, 1, 2]
        assert len(summary["rounds"]) == 4
        return
    error = RoundFailedError if expected == "run stops" else RuntimeError
    with pytest.raises(error) as info:
        loop.fit(model, make_datamodule())
    if expected == "error raised":
        assert info.value is OOM
    else:
        message = str(info.value)
        assert "round 2: 1 client update(s) accepted, fewer than" in message
        assert "trainer.strategy.min_clients=2" in message
        assert "--trainer.resume true" in message
    # The last complete round stays saved and resumable.
    state = json.loads((loop.run_dir / "resume" / "state.json").read_text())
    assert state["round"] == 1
    assert sorted(p.name for p in (loop.run_dir / "checkpoints").glob("round_*")) == [
        "round_001.safetensors"
    ]


def test_resuming_a_finished_run_with_more_rounds_continues_it(
    make_flora, make_datamodule, make_loop
):
    full = make_loop(rounds=3, run="a")
    full.fit(make_flora(), make_datamodule())

    make_loop(rounds=2, run="b").fit(make_flora(), make_datamodule())
    more = make_loop(rounds=3, run="b", resume=True)
    summary = more.fit(make_flora(seed=7), make_datamodule())

    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3]
    a = load_state(full.run_dir / "checkpoints" / "round_003.safetensors")
    b = load_state(more.run_dir / "checkpoints" / "round_003.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_resume_with_nothing_to_resume_says_it_starts_a_new_run(
    make_flora, make_datamodule, make_loop, capsys
):
    summary = make_loop(rounds=1, resume=True).fit(make_flora(), make_datamodule())
    assert "nothing to resume" in capsys.readouterr().out
    assert [r["round"] for r in summary["rounds"]] == [0, 1]


def test_resume_keeps_the_server_optimizer_and_precision_state(
    make_flora, make_datamodule, make_loop, monkeypatch
):
    """FedAdam's moments and the precision plugin's state (the 16-mixed GradScaler's scale;
    16-mixed needs CUDA, so the plugin's state_dict stands in for it here) are part of the
    resume state: a resumed FedAdam run equals an uninterrupted one."""
    from lightning.fabric.plugins import Precision

    scaler = {"scale": 1024.0, "growth_factor": 2.0, "_growth_tracker": 3}
    loaded = []
    monkeypatch.setattr(Precision, "state_dict", lambda self: dict(scaler))
    monkeypatch.setattr(Precision, "load_state_dict", lambda self, state: loaded.append(state))

    full = make_loop(rounds=3, run="a", strategy=FedAdam(server_lr=0.01))
    full.fit(make_flora(), make_datamodule())
    first = make_loop(rounds=2, run="b", strategy=FedAdam(server_lr=0.01))
    first.fit(make_flora(), make_datamodule())
    saved = json.loads((first.run_dir / "resume" / "state.json").read_text())
    assert saved["precision"] == scaler
    names = load_state(first.run_dir / "checkpoints" / "round_002.safetensors")
    moments = load_state(first.run_dir / "resume" / "strategy.safetensors")
    assert set(moments) == {f"{m}.{name}" for m in ("m", "v") for name in names}
    assert loaded == []

    resumed = make_loop(rounds=3, run="b", resume=True, strategy=FedAdam(server_lr=0.01))
    resumed.fit(make_flora(seed=5), make_datamodule())
    assert loaded == [scaler]
    a = load_state(full.run_dir / "checkpoints" / "round_003.safetensors")
    b = load_state(resumed.run_dir / "checkpoints" / "round_003.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
