"""Aggregation across clients of different LoRA ranks: zero-padding and SVD redistribution.

The server keeps the global LoRA pairs at the largest rank ``R``; client ``k`` trains rank
``r_k <= R`` and receives :func:`for_rank` of the global state: the first ``r_k`` rows of every
``lora_A`` ``[R, in]`` and the first ``r_k`` columns of every ``lora_B`` ``[out, R]`` (other
tensors whole). Its update comes back at rank ``r_k`` and is zero-padded to ``R`` (rows of ``A``,
columns of ``B``), which leaves its product unchanged: ``B_pad A_pad = B_k A_k``. Then

- :class:`ZeroPaddingAverage`: the sample-weighted mean of the padded factors,
  ``A = sum_k n_k A_k,pad / sum_k n_k`` and the same for ``B``; a rank slot ``i`` is averaged
  over every client, so slots only high-rank clients train are diluted by the others' zeros.
  With equal ranks this is :class:`~flora_lightning.strategy.FedAvg`. HetLoRA (Cho et al.,
  2024) pads and truncates the same way but weights clients by ``||B_k A_k||_F`` instead of
  ``n_k``: that is :class:`~flora_lightning.strategy.SparsityWeightedAverage`.
- :class:`SvdRedistribution` (FlexLoRA-style, Bai et al. 2024): the sample-weighted mean of the
  clients' products ``P = sum_k n_k B_k A_k / sum_k n_k`` per adapted layer (exact, float64),
  stored as its SVD factors at rank ``R``: ``P = U S V^T``, ``A = c V_R^T``, ``B = U_R S_R / c``
  (as :class:`~flora_lightning.strategy.LoraProductAverage` with ``factor_alignment: none``,
  which it is with equal ranks).
  Components are ordered by singular value, so the slice :func:`for_rank` hands a rank-``r``
  client is ``B_r A_r = U_r S_r V_r^T``: the best rank-``r`` approximation of ``P``
  (Eckart-Young), exact whenever ``P`` has rank <= ``r``. FlexLoRA splits ``sqrt(S)`` onto both
  factors; the products are the same, but with that split a direction whose singular value is 0
  gets a zero row of ``A`` *and* a zero column of ``B``, whose gradients are then both zero, so
  a rank lost once (say a round where only low-rank clients trained) never comes back. Keeping
  ``A``'s rows at the global ``A``'s RMS norm ``c`` (B carries ``S``) leaves every direction
  trainable. ``factor_alignment: sign`` then flips each component to the sign nearest the
  factors the clients trained from (they keep Adam moments for those; a flip keeps every rank's
  slice, :mod:`~flora_lightning.strategy.factor_alignment`); the default ``none`` sends the raw
  SVD factors, which measured better with mixed ranks on the quickstart
  (docs/results/2026-12-04-svd-factor-alignment.md).

Both average ``B_k A_k`` as sent: that is the mean of the clients' weight updates only when the
LoRA scaling ``alpha / r`` is the same at every rank (``model.lora.alpha: null`` gives 32 at every
rank); with a fixed ``alpha`` a rank-``r`` client's update is ``alpha / r * B_k A_k``. Pairs are
found by :func:`~flora_lightning.strategy.lora_product.lora_pairs`
(``<prefix>lora_A.<adapter>.weight`` ``[r, in]`` with ``<prefix>lora_B.<adapter>.weight``
``[out, r]``).
"""

from __future__ import annotations

import torch.nn.functional as F

from flora_lightning.strategy.base import ClientUpdate, State, Strategy
from flora_lightning.strategy.factor_alignment import FactorAlignment
from flora_lightning.strategy.fedavg import FedAvg
from flora_lightning.strategy.lora_product import LoraProductAverage, lora_pairs


def global_rank(global_state: State) -> int:
    """The largest LoRA rank in ``global_state`` (ValueError when it has no LoRA pair)."""
    pairs = lora_pairs(global_state)
    if not pairs:
        raise ValueError("the global state has no lora_A/lora_B pair to take a rank of.")
    return max(global_state[a].shape[0] for a in pairs)


def for_rank(global_state: State, rank: int) -> State:
    """The global state as a rank-``rank`` client receives it (views, not copies).

    Every ``lora_A`` ``[R, in]`` keeps its first ``rank`` rows, every ``lora_B`` ``[out, R]`` its
    first ``rank`` columns; other tensors are passed whole.

    Raises:
        ValueError: ``rank`` is not in ``[1, R]`` for some pair.
    """
    pairs = lora_pairs(global_state)
    state = dict(global_state)
    for a, b in pairs.items():
        full = global_state[a].shape[0]
        if not 1 <= rank <= full:
            raise ValueError(f"a client's LoRA rank must be in [1, {full}] for {a} (got {rank}).")
        state[a] = global_state[a][:rank]
        state[b] = global_state[b][:, :rank]
    return state


def pad_to_global(state: State, global_state: State, pairs: dict[str, str]) -> State:
    """``state``'s LoRA pairs zero-padded to the global rank (``A`` rows, ``B`` columns)."""
    padded = dict(state)
    for a, b in pairs.items():
        missing = global_state[a].shape[0] - state[a].shape[0]
        if missing:
            padded[a] = F.pad(state[a], (0, 0, 0, missing))
            padded[b] = F.pad(state[b], (0, missing))
    return padded


class RankPadding(Strategy):
    """Accepts LoRA pairs of rank <= the global rank and hands the next class them zero-padded.

    Put it first in the bases (``class X(RankPadding, FedAvg)``): its :meth:`accumulate` pads the
    update and passes it on, so the aggregation after it only sees global-rank tensors.
    """

    def start_round(self, global_state: State) -> None:
        super().start_round(global_state)
        self._rank_pairs = lora_pairs(global_state)

    def accumulate(self, update: ClientUpdate) -> None:
        padded = pad_to_global(update.state, self.global_state, self._rank_pairs)
        super().accumulate(
            ClientUpdate(update.client_id, padded, update.num_samples, update.train_loss)
        )

    def rejection_reason(self, update: ClientUpdate, global_state: State) -> str | None:
        """The base checks on the padded state, after checking each pair's rank fits."""
        if set(update.state) != set(global_state):
            return "its tensor names differ from the global state"
        for a, b in self._rank_pairs.items():
            (rank, fan_in), fan_out = global_state[a].shape, global_state[b].shape[0]
            got_a, got_b = tuple(update.state[a].shape), tuple(update.state[b].shape)
            r = got_a[0] if got_a else 0
            if not (1 <= r <= rank and got_a == (r, fan_in) and got_b == (fan_out, r)):
                return (
                    f"LoRA pair {a} {got_a} / {b} {got_b} is not rank r <= {rank} of "
                    f"[r, {fan_in}] / [{fan_out}, r]"
                )
        padded = pad_to_global(update.state, global_state, self._rank_pairs)
        return Strategy.rejection_reason(
            ClientUpdate(update.client_id, padded, update.num_samples, update.train_loss),
            global_state,
        )


class ZeroPaddingAverage(RankPadding, FedAvg):
    """Sample-weighted mean of the clients' LoRA factors zero-padded to the largest rank.

    Args:
        min_clients: fewest accepted client updates for a round to count; with fewer, the
            round raises and the global state stays as it was.
        max_num_samples: the most samples an update may claim (None: no bound beyond
            2^53); see :class:`~flora_lightning.strategy.base.Strategy`.
    """


class SvdRedistribution(RankPadding, LoraProductAverage):
    """Sample-weighted mean of the clients' ``B_k A_k`` as rank-ordered SVD factors.

    A client of rank ``r`` takes ``for_rank(global_state, r)``: the best rank-``r`` factors of
    the mean product.

    Args:
        min_clients: fewest accepted client updates for a round to count; with fewer, the
            round raises and the global state stays as it was.
        max_num_samples: the most samples an update may claim (None: no bound beyond
            2^53); see :class:`~flora_lightning.strategy.base.Strategy`.
        factor_alignment: ``none`` sends the raw SVD factors (see docs/strategies.md for the
            measured comparison), ``sign`` flips each SVD component to the sign nearest the previous factors.
            A rotation (``procrustes``) would mix components and change the slices lower-rank
            clients get, so it is refused.
    """

    allowed_alignments = ("none", "sign")

    def __init__(
        self,
        min_clients: int = 1,
        max_num_samples: int | None = None,
        factor_alignment: FactorAlignment = "none",
    ) -> None:
        super().__init__(
            min_clients=min_clients,
            max_num_samples=max_num_samples,
            factor_alignment=factor_alignment,
        )
