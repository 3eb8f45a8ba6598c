"""Alignment of re-factorised LoRA factors with the previous ones (sign flips, Procrustes)."""

from __future__ import annotations

import math

import pytest
import torch

from flora_lightning.strategy.factor_alignment import (
    align_factors,
    alignment_rotation,
    check_alignment,
    factor_distance,
)

OUT, IN, R = 9, 7, 3
# float64 throughout: the only error is rounding in a few r x r products and an r x r SVD,
# a few units of 2^-52 relative to the factors' size; 1e-12 leaves a wide margin over that.
TOL = 1e-12


def factors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(OUT, R, generator=gen, dtype=torch.float64),
        torch.randn(R, IN, generator=gen, dtype=torch.float64),
    )


def random_orthogonal(seed: int, size: int = R) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def test_sign_alignment_undoes_sign_flips():
    b, a = factors(0)
    flips = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    b_prev, a_prev = b * flips, flips[:, None] * a  # same product, two components flipped
    new_b, new_a = align_factors(b, a, b_prev, a_prev, "sign")
    torch.testing.assert_close(new_b, b_prev, rtol=0, atol=TOL)
    torch.testing.assert_close(new_a, a_prev, rtol=0, atol=TOL)
    assert factor_distance(b, a, b_prev, a_prev) > 1.0  # the raw factors were far


def test_procrustes_alignment_undoes_a_rotation():
    b, a = factors(1)
    q = random_orthogonal(2)
    b_prev, a_prev = b @ q, q.T @ a
    new_b, new_a = align_factors(b, a, b_prev, a_prev, "procrustes")
    torch.testing.assert_close(new_b, b_prev, rtol=0, atol=TOL)
    torch.testing.assert_close(new_a, a_prev, rtol=0, atol=TOL)
    # Signs alone cannot undo a general rotation.
    sign_b, sign_a = align_factors(b, a, b_prev, a_prev, "sign")
    assert factor_distance(sign_b, sign_a, b_prev, a_prev) > 0.1


def test_procrustes_is_nearest_over_rotations_and_keeps_the_product():
    b, a = factors(3)
    b_prev, a_prev = factors(4)  # unrelated previous factors
    distances = {
        how: factor_distance(*align_factors(b, a, b_prev, a_prev, how), b_prev, a_prev)
        for how in ("none", "sign", "procrustes")
    }
    assert distances["procrustes"] <= distances["sign"] <= distances["none"]
    # No random rotation (nor its sign-flipped versions) comes nearer than the Procrustes one.
    for seed in range(200):
        q = random_orthogonal(100 + seed)
        assert distances["procrustes"] <= factor_distance(b @ q, q.T @ a, b_prev, a_prev) + TOL
    for how in ("sign", "procrustes"):
        rotation = alignment_rotation(b, a, b_prev, a_prev, how)
        torch.testing.assert_close(rotation.T @ rotation, torch.eye(R, dtype=torch.float64))
        new_b, new_a = align_factors(b, a, b_prev, a_prev, how)
        scale = (b.abs() @ a.abs()).max()  # |sum_i b_i a_i| <= sum_i |b_i||a_i|
        torch.testing.assert_close(new_b @ new_a, b @ a, rtol=0, atol=TOL * float(scale))


def test_none_leaves_the_factors_as_they_are():
    b, a = factors(5)
    b_prev, a_prev = factors(6)
    new_b, new_a = align_factors(b, a, b_prev, a_prev, "none")
    assert torch.equal(new_b, b) and torch.equal(new_a, a)


def test_sign_keeps_every_leading_slice():
    b, a = factors(7)
    b_prev, a_prev = factors(8)
    new_b, new_a = align_factors(b, a, b_prev, a_prev, "sign")
    for k in range(1, R + 1):
        torch.testing.assert_close(
            new_b[:, :k] @ new_a[:k], b[:, :k] @ a[:k], rtol=0, atol=TOL * math.sqrt(k)
        )


def test_unknown_alignment_names_the_field():
    with pytest.raises(ValueError, match=r"trainer\.strategy\.factor_alignment must be one of"):
        check_alignment("rotate")
    with pytest.raises(ValueError, match=r"one of none, sign \(got 'procrustes'\)"):
        check_alignment("procrustes", ("none", "sign"))
