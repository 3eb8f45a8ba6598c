"""Heterogeneous LoRA ranks: which rank each client trains, and how one model simulates it.

``trainer.client_ranks`` gives every client its own LoRA rank ``r_k``: a list (one rank per
client), or tiers (``[{rank: 8, share: 0.2}, {rank: 2, share: 0.8}]``) that
:func:`assign_ranks` deals out by seed; null trains every client at ``model.lora.rank``. The
global model keeps the largest rank ``R = model.lora.rank``; the aggregation is
:class:`~flora_lightning.strategy.ZeroPaddingAverage` or
:class:`~flora_lightning.strategy.SvdRedistribution` (:mod:`flora_lightning.strategy.hetero_rank`).

**Simulation on the one rank-R model.** Before client ``k`` trains, the model is loaded with
``pad_to_global(for_rank(global, r_k))``: the first ``r_k`` rows of every ``lora_A`` and
columns of every ``lora_B``, zeros beyond. A :class:`RankMask` then zeroes the gradients of
those padded entries during the fit, and only ``for_rank(trained, r_k)`` is sent. This is
exactly a rank-``r_k`` LoRA with the same scaling:

- forward: the layer adds ``s * B_pad A_pad x = s * B_k A_k x`` (the padded products are 0);
- gradients of the first ``r_k`` slots: ``dL/dA[i] = s * B[:, i]^T g x^T`` and
  ``dL/dB[:, i] = s * g (A[i] x)^T`` involve slot ``i`` only, so they equal the rank-``r_k``
  model's; the padded slots' gradients are already 0 (``B[:, j] = 0``, ``A[j] = 0``), and the
  mask keeps them 0 whatever is added (FedProx's ``mu (w - w0)`` is 0 there too);
- Adam is element-wise: a padded entry has ``p = 0`` and gradient 0, so coupled weight decay
  adds ``wd * 0``, both moments stay 0 and the step ``lr * 0 / (0 + eps)`` is exactly 0.

So the padded entries stay exactly 0 and the first ``r_k`` slots follow the rank-``r_k``
trajectory, provided the scaling ``s`` is the same for both ranks. With ``model.lora.alpha:
null`` it is 32 at every rank (the paper's); a fixed alpha gives ``alpha / R`` here but
``alpha / r_k`` on a real rank-``r_k`` client, and the strategies' ``B A`` averaging would mix
differently scaled updates, so that combination is refused.
"""

from __future__ import annotations

import numpy as np
import torch

from flora_lightning.federation.settings import (  # noqa: F401  (re-exported: the old import paths)
    SHARE_TOLERANCE,
    ClientRanks,
    RankTier,
    as_tiers,
    check_client_ranks,
)
from flora_lightning.strategy import ClientUpdate, State, for_rank
from flora_lightning.strategy.hetero_rank import RankPadding, pad_to_global
from flora_lightning.strategy.lora_product import lora_pairs

RANK_STREAM = 102
"""Stream of the seeded tier assignment (``default_rng([seed, RANK_STREAM])``); the
availability draws use 100 and 101, the local fits 0-2."""


def tier_counts(tiers: list[RankTier], num_clients: int) -> list[int]:
    """Clients per tier: ``floor(share * N)``, the rest one each to the largest remainders
    (ties to the earlier tier); the counts sum to ``N``."""
    exact = [t.share * num_clients for t in tiers]
    counts = [int(np.floor(x + 1e-9)) for x in exact]
    order = sorted(range(len(tiers)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: num_clients - sum(counts)]:
        counts[i] += 1
    return counts


def assign_ranks(client_ranks: ClientRanks, num_clients: int, seed: int) -> list[int] | None:
    """Each client's rank: the list as given, or the tiers' ranks (:func:`tier_counts`) shuffled
    by ``default_rng([seed, RANK_STREAM])``; None when ``client_ranks`` is None.

    Raises:
        ValueError: the checks of :func:`check_client_ranks`, or a list of ranks whose length is
            not ``num_clients``.
    """
    check_client_ranks(client_ranks)
    if client_ranks is None:
        return None
    tiers = as_tiers(client_ranks)
    if tiers is None:
        if len(client_ranks) != num_clients:
            raise ValueError(
                f"trainer.client_ranks lists {len(client_ranks)} rank(s) for "
                f"data.partition.num_clients={num_clients} clients; give one per client or tiers."
            )
        return [int(r) for r in client_ranks]
    counts = tier_counts(tiers, num_clients)
    ranks = [t.rank for t, n in zip(tiers, counts, strict=True) for _ in range(n)]
    rng = np.random.default_rng([seed, RANK_STREAM])
    return [int(r) for r in rng.permutation(ranks)]


def check_rank_run(ranks: list[int], model, strategy, privacy_enabled: bool = False) -> None:
    """Refuse a method, LoRA setting, strategy or privacy level that cannot train ``ranks``.

    Raises:
        ValueError: naming the field to change.
    """
    lora = getattr(model, "lora", None)
    if lora is None or not hasattr(lora, "rank"):
        raise ValueError(
            f"trainer.client_ranks needs a LoRA method (FLoRA); {type(model).__name__} has no "
            "LoRA rank. Set trainer.client_ranks to null."
        )
    high = [r for r in ranks if r > lora.rank]
    if high:
        raise ValueError(
            f"trainer.client_ranks: rank {high[0]} exceeds model.lora.rank={lora.rank}; the global "
            f"model's rank must be the largest: set model.lora.rank to {max(ranks)} or more."
        )
    if all(r == lora.rank for r in ranks):
        return  # every client at the global rank: a plain run
    if lora.alpha is not None:
        raise ValueError(
            f"trainer.client_ranks with different ranks needs model.lora.alpha: null (scaling 32 "
            f"at every rank); model.lora.alpha={lora.alpha} scales each rank's update by "
            "alpha / r, so averaging the clients' B A would mix differently scaled updates."
        )
    if getattr(lora, "freeze_a", False):
        raise ValueError(
            "trainer.client_ranks with different ranks needs both LoRA factors to travel; set "
            "model.lora.freeze_a to false."
        )
    if not isinstance(strategy, RankPadding):
        raise ValueError(
            f"trainer.client_ranks mixes ranks {sorted(set(ranks))}, which "
            f"trainer.strategy={type(strategy).__name__} cannot aggregate; use "
            "ZeroPaddingAverage, SparsityWeightedAverage or SvdRedistribution."
        )
    if privacy_enabled:
        raise ValueError(
            "trainer.client_ranks with different ranks does not support privacy yet (DP-SGD "
            "sets gradients itself, so padded slots would get noise); set privacy.level to none "
            "or trainer.client_ranks to null."
        )


class RankMask:
    """Keeps a model's LoRA slots beyond ``rank`` at zero gradient while installed.

    Tensor hooks on every ``lora_A`` (rows ``>= rank``) and ``lora_B`` (columns ``>= rank``)
    parameter return the gradient with those entries zeroed; :meth:`remove` takes them off.
    """

    def __init__(self, named_parameters: dict[str, torch.nn.Parameter], rank: int) -> None:
        self.rank = rank
        self.handles = []
        for a, b in lora_pairs(named_parameters).items():
            self.handles.append(named_parameters[a].register_hook(self._zero_rows))
            self.handles.append(named_parameters[b].register_hook(self._zero_columns))

    def _zero_rows(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[self.rank :] = 0
        return grad

    def _zero_columns(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:, self.rank :] = 0
        return grad

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def padded_state(state: State, rank: int, reference: State) -> State:
    """``state`` as a rank-``rank`` client holds it on the global-rank model: its first ``rank``
    slots, zero-padded to ``reference``'s rank. ``state`` may be the global state or already
    a rank-``rank`` slice."""
    return pad_to_global(for_rank(state, rank), reference, lora_pairs(reference))


def sliced_update(update: ClientUpdate, rank: int) -> ClientUpdate:
    """``update`` with its LoRA pairs cut to ``rank`` (contiguous tensors), as it is sent."""
    state = {k: v.contiguous() for k, v in for_rank(update.state, rank).items()}
    return ClientUpdate(update.client_id, state, update.num_samples, update.train_loss)
