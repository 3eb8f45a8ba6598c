"""Heterogeneous LoRA ranks: zero-padding (HetLoRA-style) and SVD redistribution (FlexLoRA)."""

from __future__ import annotations

import math

import pytest
import torch

from flora_lightning.strategy import (
    ClientUpdate,
    FedAvg,
    LoraProductAverage,
    SparsityWeightedAverage,
    SvdRedistribution,
    ZeroPaddingAverage,
    for_rank,
    state_bytes,
)
from flora_lightning.strategy.hetero_rank import global_rank

LAYERS = {"text.q_proj": (12, 10), "vision.out_proj": (9, 14)}  # name -> (out, in)
R = 4
RANKS = [4, 2, 1]
WEIGHTS = [10, 3, 25]


def a_name(layer: str) -> str:
    return f"{layer}.lora_A.default.weight"


def b_name(layer: str) -> str:
    return f"{layer}.lora_B.default.weight"


def state(seed: int, rank: int, row_space: dict | None = None) -> dict[str, torch.Tensor]:
    """Random LoRA pairs of ``rank`` plus a head; A's rows in ``row_space[layer]`` if given."""
    gen = torch.Generator().manual_seed(seed)
    out = {"head": torch.randn(3, generator=gen)}
    for layer, (fan_out, fan_in) in LAYERS.items():
        if row_space is None:
            a = torch.randn(rank, fan_in, generator=gen) / math.sqrt(rank)
        else:
            basis = row_space[layer]
            a = torch.randn(rank, basis.shape[0], generator=gen) @ basis
        out[a_name(layer)] = a
        out[b_name(layer)] = torch.randn(fan_out, rank, generator=gen)
    return out


def run(strategy, global_state, states, weights=WEIGHTS):
    strategy.begin(global_state)
    for k, (s, n) in enumerate(zip(states, weights, strict=True)):
        assert strategy.add(ClientUpdate(client_id=k, state=s, num_samples=n, train_loss=0.0)), (
            strategy.rejected
        )
    return strategy.result()


def product(s, layer) -> torch.Tensor:
    return s[b_name(layer)].double() @ s[a_name(layer)].double()


def mean_product(states, layer) -> torch.Tensor:
    total = sum(n * product(s, layer) for s, n in zip(states, WEIGHTS, strict=True))
    return total / sum(WEIGHTS)


def best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix)
    return u[:, :rank] * s[:rank] @ vh[:rank]


def test_equal_ranks_reduce_to_fedavg_and_lora_product_average():
    glob, states = state(0, R), [state(k + 1, R) for k in range(3)]
    padded, fedavg = run(ZeroPaddingAverage(), glob, states), run(FedAvg(), glob, states)
    svd, lpa = run(SvdRedistribution(), glob, states), run(LoraProductAverage(), glob, states)
    for name in glob:
        assert torch.equal(padded[name], fedavg[name])
    for layer in LAYERS:
        torch.testing.assert_close(product(svd, layer), product(lpa, layer), rtol=0, atol=1e-6)
    torch.testing.assert_close(svd["head"], fedavg["head"], rtol=0, atol=0)


def test_zero_padding_is_the_weighted_mean_of_the_padded_factors():
    glob = state(0, R)
    states = [state(k + 1, r) for k, r in enumerate(RANKS)]
    result = run(ZeroPaddingAverage(), glob, states)
    for layer, (fan_out, fan_in) in LAYERS.items():
        a_sum, b_sum = torch.zeros(R, fan_in, dtype=torch.float64), torch.zeros(fan_out, R).double()
        for s, r, n in zip(states, RANKS, WEIGHTS, strict=True):
            a_sum[:r] += n * s[a_name(layer)].double()
            b_sum[:, :r] += n * s[b_name(layer)].double()
        torch.testing.assert_close(result[a_name(layer)].double(), a_sum / 38, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(result[b_name(layer)].double(), b_sum / 38, rtol=1e-6, atol=1e-7)
    # Row 3 of A only the rank-4 client trains: diluted by the others' zeros (weight 10/38).
    layer = next(iter(LAYERS))
    torch.testing.assert_close(result[a_name(layer)][3], states[0][a_name(layer)][3] * 10 / 38)


def test_svd_gives_each_rank_the_best_factors_of_the_mean_product():
    glob = state(0, R)
    states = [state(k + 1, r) for k, r in enumerate(RANKS)]
    result = run(SvdRedistribution(), glob, states)
    for layer in LAYERS:
        exact = mean_product(states, layer)
        for rank in (1, 2, 3, 4):
            mine = for_rank(result, rank)
            torch.testing.assert_close(
                product(mine, layer), best_rank(exact, rank), rtol=0, atol=1e-5
            )
        # Mean of ranks 4 + 2 + 1 has rank up to 7 > 4: the rank-4 slice is not exact.
        assert (product(for_rank(result, R), layer) - exact).norm() > 1e-3


def test_svd_is_exact_when_the_mean_product_has_rank_at_most_the_clients():
    # Every client's A rows lie in one 2-dimensional row space per layer: rank(P) <= 2.
    gen = torch.Generator().manual_seed(7)
    row_space = {
        layer: torch.randn(2, fan_in, generator=gen) for layer, (_, fan_in) in LAYERS.items()
    }
    glob = state(0, R)
    states = [state(k + 1, r, row_space) for k, r in enumerate(RANKS)]
    result = run(SvdRedistribution(), glob, states)
    for layer in LAYERS:
        exact = mean_product(states, layer)
        assert torch.linalg.matrix_rank(exact, atol=1e-5).item() == 2  # float32 inputs
        for rank in (2, 3, 4):
            torch.testing.assert_close(
                product(for_rank(result, rank), layer), exact, rtol=0, atol=1e-5
            )
        # A rank-1 client gets the best rank-1 approximation, which is not P.
        assert (product(for_rank(result, 1), layer) - exact).norm() > 1e-2


def test_svd_keeps_every_direction_trainable():
    # A round where only a rank-1 client trained: P has rank 1, yet A keeps R nonzero rows.
    glob = state(0, R)
    result = run(SvdRedistribution(), glob, [state(1, 1)], weights=[5])
    for layer in LAYERS:
        assert (result[a_name(layer)].norm(dim=1) > 0).all()
        torch.testing.assert_close(
            product(result, layer), product(state(1, 1), layer), atol=1e-5, rtol=0
        )


def test_for_rank_shapes_and_bytes():
    glob = state(0, R)
    assert global_rank(glob) == R
    for rank in (1, 2, 4):
        mine = for_rank(glob, rank)
        assert set(mine) == set(glob)
        for layer, (fan_out, fan_in) in LAYERS.items():
            assert mine[a_name(layer)].shape == (rank, fan_in)
            assert mine[b_name(layer)].shape == (fan_out, rank)
            assert torch.equal(mine[a_name(layer)], glob[a_name(layer)][:rank])
        assert torch.equal(mine["head"], glob["head"])
        lora_numbers = sum(rank * (fan_in + fan_out) for fan_out, fan_in in LAYERS.values())
        assert state_bytes(mine) == 4 * (lora_numbers + 3)


@pytest.mark.parametrize("rank", [0, R + 1])
def test_for_rank_outside_the_global_rank_is_refused(rank):
    with pytest.raises(ValueError, match=rf"LoRA rank must be in \[1, {R}\].*\(got {rank}\)"):
        for_rank(state(0, R), rank)


def bad(kind: str) -> dict[str, torch.Tensor]:
    s = state(5, 2)
    layer = next(iter(LAYERS))
    if kind == "too_high":
        return state(5, R + 1)
    if kind == "mismatched_pair":
        s[b_name(layer)] = torch.zeros(LAYERS[layer][0], 3)
    elif kind == "wrong_fan_in":
        s[a_name(layer)] = torch.zeros(2, 99)
    elif kind == "nan":
        s[b_name(layer)][0, 0] = float("nan")
    elif kind == "head_shape":
        s["head"] = torch.zeros(4)
    elif kind == "names":
        s["extra"] = torch.zeros(1)
    return s


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("too_high", "is not rank r <= 4"),
        ("mismatched_pair", "is not rank r <= 4"),
        ("wrong_fan_in", "(2, 99)"),
        ("nan", "holds NaN or Inf"),
        ("head_shape", "tensor head has shape (4,)"),
        ("names", "tensor names differ"),
    ],
)
@pytest.mark.parametrize("cls", [ZeroPaddingAverage, SvdRedistribution, SparsityWeightedAverage])
def test_bad_updates_are_refused_with_a_reason(cls, kind, reason):
    glob = state(0, R)
    strategy = cls()
    strategy.begin(glob)
    assert strategy.add(ClientUpdate(0, state(1, 2), num_samples=4, train_loss=0.0))
    assert not strategy.add(ClientUpdate(9, bad(kind), num_samples=4, train_loss=0.0))
    assert reason in strategy.rejected[9]
    assert strategy.accepted == [0]


def test_svd_sign_alignment_undoes_sign_flips_and_keeps_every_slice():
    glob = state(0, R)
    states = [state(k + 1, r) for k, r in enumerate(RANKS)]
    raw = run(SvdRedistribution(), glob, states)  # the default: raw SVD factors, as before
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # The clients trained from the same factors with components 1 and 3 of the other sign.
    prev = dict(glob)
    for layer in LAYERS:
        prev[a_name(layer)] = (flip[:, None] * raw[a_name(layer)]).contiguous()
        prev[b_name(layer)] = (raw[b_name(layer)] * flip).contiguous()
    result = run(SvdRedistribution(factor_alignment="sign"), prev, states)  # flips them back
    for layer in LAYERS:
        for name in (a_name(layer), b_name(layer)):
            # Same float64 factors up to the scale c recomputed from float32 A (relative
            # error ~ r * eps): a few float32 eps of the largest entry.
            tol = 8 * torch.finfo(torch.float32).eps * float(prev[name].abs().max())
            torch.testing.assert_close(result[name], prev[name], rtol=0, atol=tol)
        assert (raw[a_name(layer)] - prev[a_name(layer)]).norm() > 1.0  # old code: far
        exact = mean_product(states, layer)
        for rank in (1, 2, 3, 4):  # a sign flip keeps each rank's best approximation
            torch.testing.assert_close(
                product(for_rank(result, rank), layer), best_rank(exact, rank), rtol=0, atol=1e-5
            )


def test_svd_refuses_a_rotation_that_would_mix_the_rank_slices():
    with pytest.raises(ValueError, match=r"factor_alignment must be one of none, sign"):
        SvdRedistribution(factor_alignment="procrustes")
