"""Align re-factorised LoRA factors with the ones the clients trained from.

Strategies that rebuild ``B`` and ``A`` from the mean product by SVD
(:class:`~flora_lightning.strategy.LoraProductAverage`,
:class:`~flora_lightning.strategy.SvdRedistribution`) may return any of the factorisations
``(B' R, R^T A')`` of the same product, ``R`` orthogonal: the SVD fixes singular vectors only up
to sign (and up to a rotation among equal singular values). The clients keep their Adam moments
across rounds, and those moments are per entry of the factors they trained from, the previous
global ``(B_prev, A_prev)``: a new factor whose column came back with its sign flipped (or
rotated) meets moments of the opposite sign.

Alignment picks, among the factorisations of the same product, the one nearest the previous
factors:

    min_R  ||B' R - B_prev||_F^2 + ||R^T A' - A_prev||_F^2

Expanding the norms (``||B' R||`` and ``||R^T A'||`` do not depend on orthogonal ``R``) this is
``max_R tr(R^T M)`` with ``M = B'^T B_prev + A' A_prev^T`` (``r x r``):

- ``procrustes``: over all orthogonal ``R`` (orthogonal Procrustes): ``R = U V^T`` for the SVD
  ``M = U S V^T``;
- ``sign``: over diagonal ``R = diag(d)``, ``d_i = +-1``: ``d_i = sign(M_ii)`` (``+1`` at 0).
  Flipping a component's sign keeps every leading slice ``B[:, :k] A[:k]`` (the slice a
  rank-``k`` client receives), which a general rotation does not.

Both return ``B = B' R`` and ``A = R^T A'``, whose product is ``B' A'`` up to rounding, and whose
distance to the previous factors is never larger than that of ``(B', A')`` (``R = I`` is a
candidate in both sets). ``none`` returns ``(B', A')`` as they are.
"""

from __future__ import annotations

from typing import Literal

import torch

FactorAlignment = Literal["none", "sign", "procrustes"]
"""How re-factorised LoRA factors are aligned with the previous ones (see the module doc)."""

ALIGNMENTS = ("none", "sign", "procrustes")


def check_alignment(value: str, allowed: tuple[str, ...] = ALIGNMENTS) -> str:
    """``value`` when it is one of ``allowed``, else a ValueError naming the config field."""
    if value not in allowed:
        raise ValueError(
            f"trainer.strategy.factor_alignment must be one of {', '.join(allowed)} "
            f"(got {value!r})."
        )
    return value


def alignment_rotation(
    b_new: torch.Tensor,
    a_new: torch.Tensor,
    b_prev: torch.Tensor,
    a_prev: torch.Tensor,
    how: FactorAlignment,
) -> torch.Tensor:
    """The ``r x r`` orthogonal ``R`` (float64) that brings ``(B' R, R^T A')`` nearest to
    ``(B_prev, A_prev)`` within ``how``'s set (identity for ``none``)."""
    rank = a_new.shape[0]
    if how == "none":
        return torch.eye(rank, dtype=torch.float64, device=a_new.device)
    m = b_new.double().T @ b_prev.double() + a_new.double() @ a_prev.double().T
    if how == "sign":
        return torch.diag(torch.where(m.diagonal() < 0, -1.0, 1.0).double())
    u, _, vh = torch.linalg.svd(m)
    return u @ vh


def align_factors(
    b_new: torch.Tensor,
    a_new: torch.Tensor,
    b_prev: torch.Tensor,
    a_prev: torch.Tensor,
    how: FactorAlignment,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B' R, R^T A')`` in float64 with ``R`` from :func:`alignment_rotation`."""
    rotation = alignment_rotation(b_new, a_new, b_prev, a_prev, how)
    return b_new.double() @ rotation, rotation.T @ a_new.double()


def factor_distance(
    b: torch.Tensor, a: torch.Tensor, b_prev: torch.Tensor, a_prev: torch.Tensor
) -> float:
    """``sqrt(||B - B_prev||^2 + ||A - A_prev||^2)`` in float64: the alignment's objective."""
    return float(
        (
            (b.double() - b_prev.double()).square().sum()
            + (a.double() - a_prev.double()).square().sum()
        ).sqrt()
    )
