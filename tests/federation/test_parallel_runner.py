"""resolve_parallel_clients: K for the run, refused or falling back where batching cannot apply;
the step shape the memory model reads from a method."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from flora_lightning.clip.backbone import CLIPBundle
from flora_lightning.clip.feature_cache import FeatureCache
from flora_lightning.federation.availability import Availability
from flora_lightning.federation.local_trainer import LocalTrainer
from flora_lightning.federation.parallel import ParallelFit
from flora_lightning.federation.parallel_memory import client_step_bytes
from flora_lightning.federation.parallel_runner import resolve_parallel_clients, step_shape
from flora_lightning.methods import FedLC, FLoRA, OptimizerConfig
from flora_lightning.methods.base import build_model_from_bundle

TINY_CLIP = "flora-offline/tiny-clip"
# as tests/federation/test_parallel.py (where they are derived): rounding of the same math
ADAPTER_TOL = 1e-5
LOSS_TOL = 4 * torch.finfo(torch.float32).eps * 100


def engine(tiny_clip, data, cls=FLoRA, cached=True, ranks=None):
    bundle = CLIPBundle(copy.deepcopy(tiny_clip.model), tiny_clip.tokenizer,
                        tiny_clip.image_transform, tiny_clip.device_preprocess)  # fmt: skip
    model = build_model_from_bundle(cls(TINY_CLIP, optimizer=OptimizerConfig()), bundle)
    model.configure_task(data.class_names, data.template)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    trainer = LocalTrainer(fabric)
    cache = FeatureCache(fabric, model, data) if cached else None
    return SimpleNamespace(local_trainer=trainer, model=model, fabric=fabric, datamodule=data,
                           ranks=ranks, feature_cache=cache)  # fmt: skip


@pytest.fixture(scope="module")
def data(make_datamodule):
    data = make_datamodule(num_clients=4, batch_size=64)
    data.setup("fit")
    return data


def test_explicit_k_is_capped_by_the_round(tiny_clip, data):
    e = engine(tiny_clip, data)
    assert resolve_parallel_clients(e, 1, None, 4) == 1
    assert resolve_parallel_clients(e, 3, None, 4) == 3
    assert resolve_parallel_clients(e, 8, None, 4) == 4


def test_auto_picks_k_from_the_budget(tiny_clip, data):
    e = engine(tiny_clip, data)
    per_client = client_step_bytes(step_shape(e.model, 64))
    assert resolve_parallel_clients(e, "auto", 2.5 * per_client / 2**20, 10) == 2
    assert resolve_parallel_clients(e, "auto", 0.5 * per_client / 2**20, 10) == 1
    assert resolve_parallel_clients(e, "auto", 1e6, 10) == 10


def test_step_shape_reads_the_text_tower_for_flora_only(tiny_clip, data):
    flora = step_shape(engine(tiny_clip, data).model, 64)
    text = tiny_clip.model.config.text_config
    assert (flora.layers, flora.width, flora.heads) == (
        text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
    )  # fmt: skip
    assert flora.captions == 10 and flora.trainable > 0
    head = step_shape(engine(tiny_clip, data, FedLC).model, 64)
    assert head.layers == 0 and head.trainable == 10 * (head.feature_dim + 1)


def test_refused_k_raises_and_auto_falls_back(tiny_clip, data, caplog):
    e = engine(tiny_clip, data, cached=False)
    with pytest.raises(ValueError, match="trainer.parallel_clients=4: .*Set trainer.parallel"):
        resolve_parallel_clients(e, 4, None, 4)
    with caplog.at_level(logging.WARNING):
        assert resolve_parallel_clients(e, "auto", 1e6, 4) == 1
    assert "trainer.parallel_clients=auto trains one client at a time" in caplog.text


def test_loop_trains_k_at_a_time_as_one_at_a_time(
    make_flora, make_datamodule, make_loop, monkeypatch
):
    """A run with trainer.parallel_clients 3 (4 clients: groups of 3 and 1, fewer when a client
    drops) records the same rounds and ends at the same global adapters as one at a time."""
    availability = Availability(dropout=0.3, straggler=0.5, straggler_fraction=0.5)
    groups, fit = [], ParallelFit.fit

    def spy(self, model, data, clients, *args):
        groups.append(list(clients))
        return fit(self, model, data, clients, *args)

    monkeypatch.setattr(ParallelFit, "fit", spy)
    runs = {}
    for k in (1, 3):
        model, data = make_flora(), make_datamodule(num_clients=4, batch_size=64)
        loop = make_loop(rounds=2, max_local_steps=None, availability=availability,
                         parallel_clients=k, run=f"k{k}")  # fmt: skip
        runs[k] = (loop.fit(model, data), model.communicated_state())
    (seq, seq_state), (par, par_state) = runs[1], runs[3]
    trained = [sorted(r["accepted_clients"]) for r in par["rounds"][1:]]
    assert sorted(c for g in groups for c in g) == sorted(c for t in trained for c in t)
    assert max(len(g) for g in groups) == 3  # batched, three at a time
    events = 0
    for a, b in zip(seq["rounds"][1:], par["rounds"][1:], strict=True):
        for key in ("accepted_clients", "dropped_clients", "straggler_clients"):
            assert a[key] == b[key]
        events += len(a["dropped_clients"]) + len(a["straggler_clients"])
        assert set(a["client_train_loss"]) == set(b["client_train_loss"])
        for client, loss in a["client_train_loss"].items():
            assert abs(b["client_train_loss"][client] - loss) <= LOSS_TOL
    assert events > 0  # this seed drops or slows some client: groups shrink, caps differ
    moved = max(float((seq_state[n] - make_flora().communicated_state()[n]).abs().max())
                for n in seq_state)  # fmt: skip
    assert moved > 1e-3
    for name, tensor in seq_state.items():
        # the mean of client adapters each within ADAPTER_TOL: within it too
        torch.testing.assert_close(par_state[name], tensor, rtol=0, atol=ADAPTER_TOL)


def test_a_group_whose_fit_raises_is_left_out_whole(
    make_flora, make_datamodule, make_loop, monkeypatch
):
    def boom(self, model, data, clients, *args):
        raise RuntimeError(f"out of memory training {clients}")

    monkeypatch.setattr(ParallelFit, "fit", boom)
    model, data = make_flora(), make_datamodule(num_clients=4, batch_size=64)
    loop = make_loop(rounds=1, parallel_clients=3, on_too_few_updates="skip")
    record = loop.fit(model, data)["rounds"][1]
    assert record["accepted_clients"] == []
    assert record["rejected_clients"] == {
        str(c): f"its batched fit raised RuntimeError: out of memory training {group}"
        for group in ([0, 1, 2], [3])
        for c in group
    }


def _global_after(make_flora, make_datamodule, make_loop, k, setup, run):
    model, data = make_flora(), make_datamodule(num_clients=4, batch_size=64)
    loop = make_loop(rounds=2, max_local_steps=None, parallel_clients=k, run=f"{run}{k}")
    setup(loop)
    summary = loop.fit(model, data)
    return summary, model.communicated_state()


def _server_optimiser(loop):
    from flora_lightning.strategy import FedAdam

    loop.strategy = FedAdam(server_lr=0.01)


def _client_level_dp(loop):
    from flora_lightning.privacy import PrivacyConfig

    loop.use_privacy(PrivacyConfig(level="client", noise_multiplier=0.5, clip_norm=0.05))


@pytest.mark.parametrize(
    "setup", [_server_optimiser, _client_level_dp], ids=["FedAdam", "client-dp"]
)
def test_server_side_steps_see_the_same_updates_k_at_a_time(
    make_flora, make_datamodule, make_loop, setup
):
    """A server optimiser and client-level DP (clipping + seeded noise) act on the clients'
    updates after their fits, so K at a time gives the same global state as one at a time.
    Bound: each client's adapter is within ADAPTER_TOL of its sequential fit (as the test
    above). Clipping is 1-Lipschitz, the seeded noise is the same draw, the weighted mean is
    1-Lipschitz; FedAdam's step eta m / (sqrt(v) + tau) with v >= tau^2 moves by at most
    about eta (1 - beta_1) / (2 tau) = 0.01 * 0.1 / 2e-3 = 0.5 times a change of the mean
    update (plus a smaller second-moment term), so 2 * ADAPTER_TOL holds over these rounds."""
    runs = {
        k: _global_after(make_flora, make_datamodule, make_loop, k, setup, setup.__name__)
        for k in (1, 3)
    }
    (seq, seq_state), (par, par_state) = runs[1], runs[3]
    start = make_flora().communicated_state()
    assert max(float((seq_state[n] - start[n]).abs().max()) for n in seq_state) > 1e-4
    for a, b in zip(seq["rounds"][1:], par["rounds"][1:], strict=True):
        assert a["accepted_clients"] == b["accepted_clients"]
    for name, tensor in seq_state.items():
        torch.testing.assert_close(par_state[name], tensor, rtol=0, atol=2 * ADAPTER_TOL)
