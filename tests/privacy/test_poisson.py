"""Poisson sampling of DP-SGD batches: inclusion rate, varying sizes, seeds, empty batches."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import TensorDataset

from flora_lightning.privacy.poisson import PoissonBatchSampler, poisson_loader, sample_rate


def draws(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return list(PoissonBatchSampler(n, batch_size, steps, generator))


def test_every_example_joins_each_step_with_probability_q():
    n, batch_size, steps = 40, 8, 3000
    q = batch_size / n
    batches = draws(n, batch_size, steps, seed=0)
    assert len(batches) == steps
    counts = torch.zeros(n)
    for batch in batches:
        assert batch == sorted(set(batch)) and all(0 <= i < n for i in batch)
        counts[batch] += 1
    # Each count is Binomial(steps, q): mean 600, std sqrt(steps q (1-q)) = 21.9. Five std:
    # a two-sided tail of 5.7e-7 per example, 2.3e-5 for any of the 40.
    std = math.sqrt(steps * q * (1 - q))
    assert (counts - steps * q).abs().max().item() < 5 * std
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    # The total is Binomial(n steps, q): the mean size is q n = 8 within 5 std of the mean.
    assert abs(sizes.mean().item() - batch_size) < 5 * math.sqrt(n * q * (1 - q) / steps)
    # Sizes vary as Binomial(n, q) (variance n q (1-q) = 6.4), not a fixed batch of 8; the
    # sample variance of 3000 draws is within 20% of it (its relative std is about 3%).
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.2)


def test_the_draw_is_opacus_uniform_with_replacement_sampler():
    """The released code's sampler (Opacus), given the same generator seed, rate and steps."""
    n, batch_size, steps = 57, 10, 25
    ours = draws(n, batch_size, steps, seed=3)
    generator = torch.Generator().manual_seed(3)
    theirs = UniformWithReplacementSampler(
        num_samples=n, sample_rate=batch_size / n, generator=generator, steps=steps
    )
    assert ours == list(theirs)


def test_draws_are_reproducible_by_seed_and_epochs_continue_the_stream():
    assert draws(30, 5, 12, seed=1) == draws(30, 5, 12, seed=1)
    assert draws(30, 5, 12, seed=1) != draws(30, 5, 12, seed=2)
    sampler = PoissonBatchSampler(30, 5, 6, torch.Generator().manual_seed(1))
    first, second = list(sampler), list(sampler)
    assert first + second == draws(30, 5, 12, seed=1)  # two epochs = one stream of 12 steps


def test_sample_rate_and_expected_batch_size():
    assert sample_rate(100, 32) == 0.32
    assert sample_rate(20, 32) == 1.0  # capped: every example every step
    sampler = PoissonBatchSampler(20, 32, 3, torch.Generator())
    assert sampler.expected_batch_size == 20
    assert all(batch == list(range(20)) for batch in sampler)  # rand < 1 always
    assert PoissonBatchSampler(100, 32, 3, torch.Generator()).expected_batch_size == 32
    with pytest.raises(ValueError, match="data.batch_size"):
        sample_rate(0, 32)
    with pytest.raises(ValueError, match="steps >= 1"):
        PoissonBatchSampler(10, 2, 0, torch.Generator())


def test_the_loader_yields_empty_batches_with_the_right_shapes():
    x = torch.randn(6, 4, 3)
    y = torch.arange(6)
    sampler = PoissonBatchSampler(6, 1, 40, torch.Generator().manual_seed(0))
    expected = list(PoissonBatchSampler(6, 1, 40, torch.Generator().manual_seed(0)))
    assert any(not b for b in expected) and any(b for b in expected)  # q = 1/6: both occur
    batches = list(poisson_loader(TensorDataset(x, y), sampler))
    assert len(batches) == 40
    for (features, labels), indices in zip(batches, expected, strict=True):
        assert features.shape == (len(indices), 4, 3) and features.dtype == x.dtype
        assert labels.shape == (len(indices),) and labels.dtype == y.dtype
        torch.testing.assert_close(features, x[indices], rtol=0, atol=0)
        assert labels.tolist() == indices
