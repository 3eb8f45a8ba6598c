"""SparsityWeightedAverage: HetLoRA's server aggregation of zero-padded LoRA factors.

HetLoRA (Cho et al., 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models") zero-pads each client's rank-``r_k`` factors to the largest rank ``R``
(rows of ``A``, columns of ``B``; the product is unchanged, see
:mod:`~flora_lightning.strategy.hetero_rank`) and averages them with *sparsity-aware* weights
instead of sample counts: per adapted layer, client ``k``'s weight is the Frobenius norm of the
update it applies,

    s_k = ||B_k A_k||_F,        p_k = s_k / sum_j s_j,
    A = sum_k p_k A_k,pad,      B = sum_k p_k B_k,pad,

so a client whose update is near zero (a "sparse" one, e.g. an oversized rank it barely used)
counts little, whatever its data size. ``s_k`` is computed from the ``r x r`` Gram matrices,
``||B A||_F^2 = sum((B^T B) * (A A^T))`` (float64), so no ``out x in`` product is formed.
The weights are per LoRA pair (the paper computes them from a LoRA module's ``B_k A_k``);
tensors that are not LoRA factors, and a pair whose every client sent ``B_k A_k = 0`` (no norm
to weight by), get the sample-weighted mean of :class:`~flora_lightning.strategy.FedAvg`.

Not implemented: HetLoRA's client-side rank self-pruning (a regulariser on the norm of the last
rank slots during local training, and dropping them when it is small). It changes the local fit
and each client's rank between rounds, and its exact rule and defaults were not checked against
the paper here, so it is left out rather than guessed. :class:`ZeroPaddingAverage
<flora_lightning.strategy.ZeroPaddingAverage>` is the same padding with sample weights.
"""

from __future__ import annotations

import torch

from flora_lightning.strategy.base import ClientUpdate, State
from flora_lightning.strategy.fedavg import FedAvg
from flora_lightning.strategy.hetero_rank import RankPadding
from flora_lightning.strategy.lora_product import lora_pairs


def product_norm(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``||B A||_F`` in float64 from the ``r x r`` Gram matrices (no ``out x in`` product)."""
    b, a = b.double(), a.double()
    squared = ((b.T @ b) * (a @ a.T)).sum()
    return squared.clamp(min=0).sqrt()  # rounding can leave a tiny negative for B A ~ 0


class _SparsityWeighting(FedAvg):
    """The weighting on global-rank updates (:class:`SparsityWeightedAverage` pads first)."""

    def __init__(self, min_clients: int = 1, max_num_samples: int | None = None) -> None:
        super().__init__(min_clients=min_clients, max_num_samples=max_num_samples)
        self._pairs: dict[str, str] = {}
        self._weighted: State = {}
        self._norms: dict[str, torch.Tensor] = {}

    def start_round(self, global_state: State) -> None:
        super().start_round(global_state)
        self._pairs = lora_pairs(global_state)
        self._weighted = {
            name: torch.zeros_like(global_state[name], dtype=torch.float64)
            for pair in self._pairs.items()
            for name in pair
        }
        self._norms = {
            a: torch.zeros((), dtype=torch.float64, device=global_state[a].device)
            for a in self._pairs
        }

    def accumulate(self, update: ClientUpdate) -> None:
        super().accumulate(update)  # sample-weighted sums of every tensor (FedAvg)
        for a, b in self._pairs.items():
            norm = product_norm(update.state[b], update.state[a]).to(self._norms[a].device)
            self._norms[a] += norm
            for name in (a, b):
                target = self._weighted[name]
                target.add_(update.state[name].to(target.device, torch.float64) * norm)

    def aggregate(self) -> State:
        state = super().aggregate()
        for a, b in self._pairs.items():
            total = self._norms[a]
            if total > 0:
                for name in (a, b):
                    state[name] = (self._weighted[name] / total).to(self.global_state[name].dtype)
        return state


class SparsityWeightedAverage(RankPadding, _SparsityWeighting):
    """HetLoRA's aggregation: zero-padded factors averaged with weights ``||B_k A_k||_F``.

    Args:
        min_clients: fewest accepted client updates for a round to count; with fewer, the
            round raises and the global state stays as it was.
        max_num_samples: the most samples an update may claim (None: no bound beyond
            2^53); see :class:`~flora_lightning.strategy.base.Strategy`.
    """
