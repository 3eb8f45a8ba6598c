"""``trainer.client_ranks``: per-client LoRA ranks, assigned, checked and simulated in a run."""

from __future__ import annotations

from collections import Counter
from functools import partial

import pytest
import torch

from flora_lightning.callbacks import Callback
from flora_lightning.federation.ranks import (
    RankMask,
    RankTier,
    assign_ranks,
    check_rank_run,
    tier_counts,
)
from flora_lightning.methods import FedFFT, FLoRA, LoraSettings
from flora_lightning.privacy.config import PrivacyConfig
from flora_lightning.strategy import (
    FedAvg,
    FedProx,
    LoraProductAverage,
    SvdRedistribution,
    ZeroPaddingAverage,
    for_rank,
)
from flora_lightning.strategy.lora_product import lora_pairs

TINY_CLIP = "flora-offline/tiny-clip"


def first_lora_a(state) -> str:
    """The first lora_A name of ``state``."""
    return next(iter(lora_pairs(state)))


# ------------------------------------------------------------------ assignment
def test_a_list_gives_each_client_its_rank():
    assert assign_ranks([4, 2, 1], num_clients=3, seed=0) == [4, 2, 1]
    assert assign_ranks(None, num_clients=3, seed=0) is None


def test_tier_counts_follow_the_largest_remainder():
    tiers = [RankTier(4, 0.5), RankTier(2, 0.3), RankTier(1, 0.2)]
    # 7 clients: 3.5, 2.1, 1.4 -> floors 3, 2, 1; the one left goes to the .5 remainder
    assert tier_counts(tiers, 7) == [4, 2, 1]
    # 10 clients: 5, 3, 2 exactly
    assert tier_counts(tiers, 10) == [5, 3, 2]
    # 3 clients: 1.5, 0.9, 0.6 -> floors 1, 0, 0; remainders .9 then .6 get one each
    assert tier_counts(tiers, 3) == [1, 1, 1]
    assert tier_counts([RankTier(8, 0.2), RankTier(2, 0.8)], 1) == [0, 1]


def test_tiers_are_dealt_by_seed_reproducibly():
    tiers = [{"rank": 8, "share": 0.2}, {"rank": 2, "share": 0.8}]  # as YAML gives them
    ranks = assign_ranks(tiers, num_clients=10, seed=3)
    assert Counter(ranks) == {8: 2, 2: 8}
    assert assign_ranks([RankTier(8, 0.2), RankTier(2, 0.8)], 10, seed=3) == ranks
    others = {tuple(assign_ranks(tiers, 10, seed=s)) for s in range(10)}
    assert len(others) > 1  # the seed decides which clients get rank 8
    assert all(Counter(o) == {8: 2, 2: 8} for o in others)


@pytest.mark.parametrize(
    ("client_ranks", "message"),
    [
        ([4, 0, 1], "every rank must be >= 1"),
        ([], "is empty"),
        ([RankTier(4, 0.5), RankTier(2, 0.4)], "shares must sum to 1"),
        ([{"rank": 4, "share": 0.7}, {"rank": 2, "share": 0.7}], "shares must sum to 1"),
        ([{"rank": 0, "share": 1.0}], "rank must be >= 1"),
        ([{"rank": 2, "share": 0.0}, {"rank": 1, "share": 1.0}], "share must be in (0, 1]"),
        ([4, {"rank": 2, "share": 1.0}], "not a mix"),
    ],
)
def test_bad_client_ranks_are_refused_when_the_loop_is_built(make_loop, client_ranks, message):
    with pytest.raises(ValueError, match="trainer.client_ranks") as err:
        make_loop(client_ranks=client_ranks)
    assert message in str(err.value)


def test_a_list_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match=r"lists 2 rank\(s\) for data.partition.num_clients=3"):
        assign_ranks([4, 2], num_clients=3, seed=0)


def flora(rank: int = 4, **lora) -> FLoRA:
    """A FLoRA module with its settings only (nothing loaded)."""
    return FLoRA(TINY_CLIP, lora=LoraSettings(rank=rank, **lora))


@pytest.mark.parametrize(
    ("model", "strategy", "privacy", "fields"),
    [
        (flora(2), ZeroPaddingAverage(), False, ["model.lora.rank=2", "must be the largest"]),
        (flora(alpha=64.0), ZeroPaddingAverage(), False, ["model.lora.alpha", "null"]),
        (flora(freeze_a=True), SvdRedistribution(), False, ["model.lora.freeze_a"]),
        (
            flora(),
            FedAvg(),
            False,
            ["trainer.strategy=FedAvg", "ZeroPaddingAverage, SparsityWeightedAverage or Svd"],
        ),
        (flora(), FedProx(mu=0.1), False, ["trainer.strategy=FedProx"]),
        (flora(), ZeroPaddingAverage(), True, ["privacy.level"]),
        (FedFFT(TINY_CLIP), ZeroPaddingAverage(), False, ["needs a LoRA method", "FedFFT"]),
    ],
)
def test_runs_that_cannot_mix_ranks_are_refused(model, strategy, privacy, fields):
    with pytest.raises(ValueError, match="trainer.client_ranks") as err:
        check_rank_run([4, 2, 1], model, strategy, privacy)
    for field in fields:
        assert field in str(err.value)


def test_equal_ranks_need_no_special_strategy():
    check_rank_run([4, 4, 4], flora(alpha=64.0), FedAvg())  # a plain run: nothing to refuse


def test_a_bad_rank_stops_the_run_before_training(make_flora, make_datamodule, make_loop, tmp_path):
    loop = make_loop(client_ranks=[4, 2, 1], strategy=FedAvg(), run="refused")
    with pytest.raises(ValueError, match="trainer.strategy=FedAvg"):
        loop.fit(make_flora(LoraSettings(rank=4)), make_datamodule())
    assert not (tmp_path / "refused" / "summary.json").exists()
    with pytest.raises(ValueError, match="privacy.level"):
        loop = make_loop(client_ranks=[4, 2, 1], strategy=ZeroPaddingAverage(), run="dp")
        loop.use_privacy(PrivacyConfig(level="sample", noise_multiplier=1.0))
        loop.fit(make_flora(LoraSettings(rank=4)), make_datamodule())


# --------------------------------------------------------------------- masking
A, B = "layer.lora_A.default.weight", "layer.lora_B.default.weight"


def lora_params(pad_a: bool) -> dict[str, torch.nn.Parameter]:
    """A rank-4 pair [4, 6] / [5, 4] whose slots 2, 3 are zero (A's too unless ``pad_a``)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen)
    b[:, 2:] = 0
    if not pad_a:
        a[2:] = 0
    return {A: torch.nn.Parameter(a), B: torch.nn.Parameter(b)}


def train(params, steps: int = 5) -> torch.optim.Adam:
    """Adam with coupled weight decay on ``||B A x - y||^2`` for random x, y."""
    gen = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(params.values(), lr=0.1, weight_decay=0.2)
    for _ in range(steps):
        x, y = torch.randn(6, 8, generator=gen), torch.randn(5, 8, generator=gen)
        loss = (params[B] @ params[A] @ x - y).pow(2).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_padded_slots_stay_exactly_zero_under_adam_with_weight_decay():
    params = lora_params(pad_a=False)
    mask = RankMask(params, rank=2)
    optimizer = train(params)
    assert torch.equal(params[A][2:], torch.zeros(2, 6))
    assert torch.equal(params[B][:, 2:], torch.zeros(5, 2))
    assert params[A][:2].abs().min() > 0 and params[B][:, :2].abs().min() > 0  # these trained
    for p in params.values():
        moments = optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]
        kept = moments[0][2:] if p is params[A] else moments[0][:, 2:]
        assert torch.equal(kept, torch.zeros_like(kept))
    mask.remove()


def test_the_mask_zeroes_gradients_the_padding_alone_would_not():
    # A's padded rows nonzero: B's padded columns get a gradient, which only the mask removes
    unmasked = lora_params(pad_a=True)
    train(unmasked)
    assert unmasked[B][:, 2:].abs().max() > 0
    masked = lora_params(pad_a=True)
    mask = RankMask(masked, rank=2)
    train(masked)
    assert torch.equal(masked[B][:, 2:], torch.zeros(5, 2))
    mask.remove()  # off again: the next steps move them
    train(masked, steps=1)
    assert masked[B][:, 2:].abs().max() > 0


def test_a_low_rank_client_trains_as_a_real_rank_2_lora(make_flora, make_datamodule, make_loop):
    """The rank-4 model simulating a rank-2 client equals a rank-2 FLoRA from the same slice."""
    data = make_datamodule()
    sim = make_loop(client_ranks=[2, 2, 2], strategy=ZeroPaddingAverage(), run="sim")
    # float64: the padded rank-4 and the real rank-2 layers are the same sums in different
    # kernel shapes, so they may round differently (FMA, blocking: CPU dependent), and Adam
    # (eps 1e-6) grows a difference by up to lr (wd + |H|) / eps per step. From float64's
    # u = 1.1e-16, 1e-6 leaves 1e10 of growth over the 4 steps (float32's u = 6e-8 left 17);
    # a real difference (another slot trained, another scaling) is O(lr) = 1e-3.
    sim.set_up(make_flora(LoraSettings(rank=4)).double(), data, tensorboard=False)
    real = make_loop(run="real")
    real.set_up(make_flora(LoraSettings(rank=2)).double(), make_datamodule(), tensorboard=False)
    global_state = sim.model.communicated_state()
    real.model.load_communicated_state(for_rank(global_state, 2))
    sim.prepare_client(for_rank(global_state, 2), 0)  # a runtime may send the slice only
    from_slice = sim.model.communicated_state()
    assert sim.state_for_client(global_state, 0)[first_lora_a(global_state)].shape[0] == 2
    for round_ in (1, 2):  # the second fit reuses the kept Adam state
        sim.prepare_client(global_state, 0)
        if round_ == 1:
            for name, tensor in sim.model.communicated_state().items():
                assert torch.equal(tensor, from_slice[name])
        got = sim.client_state_to_send(sim.local_trainer.fit(sim.model, data, 0, round_))
        want = real.local_trainer.fit(real.model, real.datamodule, 0, round_)
        assert got.state.keys() == want.state.keys()
        for name, tensor in want.state.items():
            assert got.state[name].shape == tensor.shape and tensor.dtype == torch.float64
            torch.testing.assert_close(got.state[name], tensor, rtol=0, atol=1e-6)
        assert got.train_loss == pytest.approx(want.train_loss, abs=1e-6)
        global_state = sim.model.communicated_state()  # round 2 starts from what it trained
        real.model.load_communicated_state(for_rank(global_state, 2))


# ------------------------------------------------------------------------ runs
class Watch(Callback):
    """Per round and client: the update's shapes and the model's padded entries after the fit."""

    def __init__(self) -> None:
        self.shapes: dict[tuple[int, int], dict] = {}
        self.padded_max: dict[tuple[int, int], float] = {}

    def on_client_fit_end(self, loop, model, update) -> None:
        key = (loop.round, update.client_id)
        self.shapes[key] = {k: tuple(v.shape) for k, v in update.state.items()}
        rank = loop.ranks[update.client_id]
        live = model.communicated_state()
        padded = [live[a][rank:] for a in lora_pairs(live)]
        padded += [live[b][:, rank:] for b in lora_pairs(live).values()]
        self.padded_max[key] = max((t.abs().max().item() for t in padded if t.numel()), default=0)


@pytest.mark.parametrize("strategy", [ZeroPaddingAverage, SvdRedistribution])
def test_a_run_with_ranks_4_2_1(make_flora, make_datamodule, make_loop, strategy, capsys):
    watch = Watch()
    loop = make_loop(rounds=2, client_ranks=[4, 2, 1], strategy=strategy(), callbacks=[watch])
    model = make_flora(LoraSettings(rank=4))
    summary = loop.fit(model, make_datamodule())
    assert "Client LoRA ranks: [4, 2, 1]" in capsys.readouterr().out
    final = model.communicated_state()
    pairs = lora_pairs(final)
    assert pairs and all(final[a].shape[0] == 4 for a in pairs)  # the global model stays rank 4

    def expected_bytes(rank: int) -> int:
        return sum(4 * rank * (final[a].shape[1] + final[b].shape[0]) for a, b in pairs.items())

    for record in summary["rounds"][1:]:
        assert record["accepted_clients"] == [0, 1, 2]
        assert record["bytes_up"] == sum(expected_bytes(r) for r in (4, 2, 1))
        assert record["bytes_down"] == record["bytes_up"]  # each receives its rank's slice
        for client, rank in enumerate([4, 2, 1]):
            key = (record["round"], client)
            shapes = watch.shapes[key]
            for a, b in pairs.items():
                assert shapes[a] == (rank, final[a].shape[1])
                assert shapes[b] == (final[b].shape[0], rank)
            assert watch.padded_max[key] == 0.0  # exactly zero after local training
        assert 0 <= record["test_acc"] <= 1


@pytest.mark.parametrize(
    ("plain", "hetero"),
    [
        (FedAvg, ZeroPaddingAverage),
        # Equal with the same factor alignment: SvdRedistribution's default is none.
        (partial(LoraProductAverage, factor_alignment="none"), SvdRedistribution),
    ],
)
def test_equal_ranks_run_as_a_plain_run(make_flora, make_datamodule, make_loop, plain, hetero):
    states, accuracies = [], []
    for name, kwargs in (
        ("plain", {"strategy": plain()}),
        ("ranks", {"strategy": hetero(), "client_ranks": [4, 4, 4]}),
    ):
        model = make_flora(LoraSettings(rank=4)).double()  # float64: see the test above
        loop = make_loop(rounds=2, run=name, cache_features=False, **kwargs)  # cache: float32
        summary = loop.fit(model, make_datamodule())
        states.append(model.communicated_state())
        accuracies.append([r["test_acc"] for r in summary["rounds"]])
    assert states[0].keys() == states[1].keys()
    for name, tensor in states[0].items():
        assert tensor.dtype == torch.float64
        torch.testing.assert_close(states[1][name], tensor, rtol=0, atol=1e-6)
    assert accuracies[0] == pytest.approx(accuracies[1], abs=1e-6)
