"""SparsityWeightedAverage: HetLoRA's zero-padded factors weighted by ||B_k A_k||_F."""

from __future__ import annotations

import math

import torch

from flora_lightning.strategy import (
    ClientUpdate,
    FedAvg,
    SparsityWeightedAverage,
    ZeroPaddingAverage,
)
from flora_lightning.strategy.sparsity_weighted import product_norm

LAYERS = {"text.q_proj": (12, 10), "text.out_proj": (9, 14)}  # name -> (out, in)
R = 4
RANKS = [4, 2, 1]
WEIGHTS = [10, 3, 25]
SCALES = [1.0, 5.0, 0.2]  # B's scale per client: update sizes far from the sample weights
# float32 factors summed in float64 and cast back to float32: one float32 rounding of the
# result (relative 2^-24) plus float64 noise; rtol 1e-6 is a few float32 ulps.
RTOL, ATOL = 1e-6, 1e-7


def a_name(layer: str) -> str:
    return f"{layer}.lora_A.default.weight"


def b_name(layer: str) -> str:
    return f"{layer}.lora_B.default.weight"


def state(seed: int, rank: int, b_scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {"head": torch.randn(3, generator=gen)}
    for layer, (fan_out, fan_in) in LAYERS.items():
        out[a_name(layer)] = torch.randn(rank, fan_in, generator=gen) / math.sqrt(rank)
        out[b_name(layer)] = b_scale * torch.randn(fan_out, rank, generator=gen)
    return out


def run(strategy, global_state, states, weights=WEIGHTS):
    strategy.begin(global_state)
    for k, (s, n) in enumerate(zip(states, weights, strict=True)):
        assert strategy.add(ClientUpdate(k, s, num_samples=n, train_loss=0.0)), strategy.rejected
    return strategy.result()


def padded(tensor: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``tensor`` in the top-left corner of a float64 zero matrix of ``shape``."""
    out = torch.zeros(shape, dtype=torch.float64)
    out[: tensor.shape[0], : tensor.shape[1]] = tensor.double()
    return out


def test_factors_are_weighted_by_the_norm_of_each_clients_product():
    glob = state(0, R)
    states = [
        state(k + 1, r, b_scale=s) for k, (r, s) in enumerate(zip(RANKS, SCALES, strict=True))
    ]
    result = run(SparsityWeightedAverage(), glob, states)
    for layer, (fan_out, fan_in) in LAYERS.items():
        norms = [
            torch.linalg.matrix_norm(s[b_name(layer)].double() @ s[a_name(layer)].double())
            for s in states
        ]
        total = sum(norms)
        a = sum(
            n * padded(s[a_name(layer)], (R, fan_in)) for n, s in zip(norms, states, strict=True)
        )
        b = sum(
            n * padded(s[b_name(layer)], (fan_out, R)) for n, s in zip(norms, states, strict=True)
        )
        torch.testing.assert_close(result[a_name(layer)].double(), a / total, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(result[b_name(layer)].double(), b / total, rtol=RTOL, atol=ATOL)
    # Not LoRA factors: the sample-weighted mean, as FedAvg.
    expected_head = sum(n * s["head"].double() for n, s in zip(WEIGHTS, states, strict=True)) / sum(
        WEIGHTS
    )
    torch.testing.assert_close(result["head"].double(), expected_head, rtol=RTOL, atol=ATOL)
    # Sample weights would give another result (ZeroPaddingAverage).
    zero_padding = run(ZeroPaddingAverage(), glob, states)
    layer = next(iter(LAYERS))
    assert (result[a_name(layer)] - zero_padding[a_name(layer)]).norm() > 0.1


def test_a_client_with_a_zero_update_does_not_count():
    glob = state(0, R)
    states = [state(1, 4), state(2, 2)]
    silent = state(3, 1)
    for layer in LAYERS:  # B = 0: it applies no update, whatever its (large) A and data size
        silent[b_name(layer)] = torch.zeros_like(silent[b_name(layer)])
        silent[a_name(layer)] = 1e3 * silent[a_name(layer)]
    with_silent = run(SparsityWeightedAverage(), glob, [*states, silent], [10, 3, 1000])
    without = run(SparsityWeightedAverage(), glob, states, [10, 3])
    for layer in LAYERS:
        for name in (a_name(layer), b_name(layer)):
            torch.testing.assert_close(with_silent[name], without[name], rtol=RTOL, atol=ATOL)


def test_all_zero_updates_fall_back_to_the_sample_weighted_mean():
    glob = state(0, R)
    states = [state(k + 1, R, b_scale=0.0) for k in range(3)]
    result, fedavg = run(SparsityWeightedAverage(), glob, states), run(FedAvg(), glob, states)
    for name in glob:
        assert torch.equal(result[name], fedavg[name])


def test_product_norm_is_the_frobenius_norm_of_the_product():
    gen = torch.Generator().manual_seed(9)
    b, a = torch.randn(20, 3, generator=gen), torch.randn(3, 15, generator=gen)
    expected = torch.linalg.matrix_norm(b.double() @ a.double())
    torch.testing.assert_close(product_norm(b, a), expected, rtol=1e-12, atol=0)
    assert product_norm(torch.zeros(20, 3), a) == 0
