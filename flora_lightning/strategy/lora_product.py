"""LoraProductAverage: FedAvg of the LoRA *products*, re-factorised to rank r by SVD.

FedAvg of the factors (the paper's aggregation) sets ``B = mean(B_k)``, ``A = mean(A_k)``, whose
product is not the mean of the clients' updates: ``mean(B_k A_k) != mean(B_k) mean(A_k)``. This
strategy averages what the clients actually apply to each frozen weight,

    P = sum_k n_k B_k A_k / sum_k n_k                      (exact, float64)

and returns the rank-r factors of its best rank-r approximation (Eckart-Young: no rank-r
``B A`` is closer to ``P`` in Frobenius norm, so it is never further from ``P`` than
``mean(B) mean(A)``):

    P = U S V^T,   A = c V_r^T,   B = U_r S_r / c,   so  B A = U_r S_r V_r^T

with ``c`` the root-mean-square row norm of the global ``A`` sent this round: A keeps the scale
of the LoRA initialisation (A is never shrunk towards zero, which would stall both factors'
gradients) and B carries the update's magnitude. When ``P`` has rank <= r (e.g. all clients
share A, as with ``lora.freeze_a``) the result is exact: ``B A = P``. Other communicated tensors
(not LoRA pairs) are averaged as by :class:`FedAvg`.

The SVD fixes ``U``, ``V`` only up to the sign of each component (and a rotation among equal
singular values), while the clients keep Adam moments per entry of the factors they trained
from. ``factor_alignment`` picks, among the factorisations ``(B R, R^T A)`` of the same product
(``R`` orthogonal), the one nearest the factors sent this round
(:mod:`~flora_lightning.strategy.factor_alignment`): ``procrustes`` (any rotation), ``sign``
(flip components only) or ``none`` (the raw SVD factors, as before).

A LoRA pair is ``<prefix>lora_A.<adapter>.weight`` ``[r, in]`` with
``<prefix>lora_B.<adapter>.weight`` ``[out, r]``. Memory: one ``out x in`` float64 accumulator
per adapted layer (12 x 512 x 512 at ViT-B/32: 25 MB).
"""

from __future__ import annotations

import re

import torch

from flora_lightning.strategy.base import ClientUpdate, State
from flora_lightning.strategy.factor_alignment import (
    ALIGNMENTS,
    FactorAlignment,
    align_factors,
    check_alignment,
)
from flora_lightning.strategy.fedavg import FedAvg

_A = re.compile(r"^(?P<prefix>.*)lora_A(?P<suffix>\..+)$")


def lora_pairs(state: State) -> dict[str, str]:
    """``lora_A`` name -> its ``lora_B`` name, for every LoRA pair in ``state``.

    Raises:
        ValueError: a ``lora_A`` without its ``lora_B`` (or the reverse), or shapes that do not
            make a product ``B @ A``.
    """
    pairs = {}
    for name in state:
        match = _A.match(name)
        if match is None:
            continue
        partner = f"{match['prefix']}lora_B{match['suffix']}"
        if partner not in state:
            raise ValueError(f"LoraProductAverage: {name} has no {partner} in the state.")
        a, b = state[name], state[partner]
        if (
            a.dim() != 2
            or b.dim() != 2
            or not b.shape[1] == a.shape[0] <= min(b.shape[0], a.shape[1])
        ):
            raise ValueError(
                f"LoraProductAverage: {partner} {tuple(b.shape)} @ {name} {tuple(a.shape)} is "
                "not a low-rank product."
            )
        pairs[name] = partner
    unpaired = [n for n in state if "lora_B" in n and n not in pairs.values()]
    if unpaired:
        raise ValueError(
            f"LoraProductAverage: {unpaired[0]} has no lora_A partner in the state (with "
            "model.lora.freeze_a only B travels and FedAvg is already exact: use FedAvg)."
        )
    return pairs


class LoraProductAverage(FedAvg):
    """Sample-weighted mean of the clients' ``B_k A_k``, returned as its best rank-r factors.

    Args:
        min_clients: fewest accepted client updates for a round to count; with fewer, the
            round raises and the global state stays as it was.
        max_num_samples: the most samples an update may claim (None: no bound beyond
            2^53); see :class:`~flora_lightning.strategy.base.Strategy`.
        factor_alignment: which of the factorisations of the new product is sent:
            ``procrustes`` the one nearest the previous factors over all rotations, ``sign``
            over sign flips of the SVD components, ``none`` the raw SVD factors.
    """

    allowed_alignments: tuple[str, ...] = ALIGNMENTS
    """The ``factor_alignment`` values this strategy accepts."""

    def __init__(
        self,
        min_clients: int = 1,
        max_num_samples: int | None = None,
        factor_alignment: FactorAlignment = "procrustes",
    ) -> None:
        super().__init__(min_clients=min_clients, max_num_samples=max_num_samples)
        self.factor_alignment = check_alignment(factor_alignment, self.allowed_alignments)
        """How the new factors are aligned (:mod:`~flora_lightning.strategy.factor_alignment`)."""
        self._pairs: dict[str, str] = {}
        self._products: dict[str, torch.Tensor] = {}

    def start_round(self, global_state: State) -> None:
        super().start_round(global_state)
        self._pairs = lora_pairs(global_state)
        self._products = {
            a: torch.zeros(
                global_state[b].shape[0],
                global_state[a].shape[1],
                dtype=torch.float64,
                device=global_state[a].device,
            )
            for a, b in self._pairs.items()
        }

    def accumulate(self, update: ClientUpdate) -> None:
        super().accumulate(update)  # averages every tensor as FedAvg
        for a, b in self._pairs.items():
            product = update.state[b].double() @ update.state[a].double()
            self._products[a].add_(product.to(self._products[a].device), alpha=update.num_samples)

    def aggregate(self) -> State:
        state = super().aggregate()
        for a, b in self._pairs.items():
            prev_a, prev_b = self.global_state[a], self.global_state[b]
            rank = prev_a.shape[0]
            u, s, vh = torch.linalg.svd(self._products[a] / self._weight, full_matrices=False)
            scale = prev_a.double().norm() / rank**0.5
            scale = scale if scale > 0 else torch.ones((), dtype=torch.float64)
            new_b, new_a = align_factors(
                u[:, :rank] * s[:rank] / scale,
                scale * vh[:rank],
                prev_b.to(u.device),
                prev_a.to(u.device),
                self.factor_alignment,
            )
            state[a] = new_a.to(prev_a.dtype)
            state[b] = new_b.to(prev_b.dtype)
        return state
