"""FedAvg: the sample-weighted mean of client states (McMahan et al., 2017).

With client ``k`` holding ``n_k`` training samples and returning parameters ``w_k``,

    w_global = sum_k n_k * w_k / sum_k n_k

applied to every communicated tensor independently. For LoRA this averages ``A`` and ``B``
separately (as the paper's code): note that ``mean(B_k A_k) != mean(B_k) mean(A_k)``.
Accumulation is in float64 so the order clients arrive in does not change the result.
"""

from __future__ import annotations

import torch

from flora_lightning.strategy.base import ClientUpdate, State, Strategy


class FedAvg(Strategy):
    """Sample-weighted federated averaging over exactly the communicated tensors.

    Args:
        min_clients: fewest accepted client updates for a round to count; with fewer, the
            round raises and the global state stays as it was.
        max_num_samples: largest sample count an update may claim (None: unbounded); FedAvg
            trusts the counts it weighs by (docs/strategies.md, "Trusting sample counts").
    """

    def __init__(self, min_clients: int = 1, max_num_samples: int | None = None) -> None:
        super().__init__(min_clients=min_clients, max_num_samples=max_num_samples)
        self._sum: State = {}
        self._weight = 0.0

    def start_round(self, global_state: State) -> None:
        self._sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        self._weight = 0.0

    def accumulate(self, update: ClientUpdate) -> None:
        for name, tensor in update.state.items():
            self._sum[name].add_(
                tensor.to(self._sum[name].device, torch.float64), alpha=update.num_samples
            )
        self._weight += update.num_samples

    def aggregate(self) -> State:
        return {
            name: (total / self._weight).to(self.global_state[name].dtype)
            for name, total in self._sum.items()
        }
