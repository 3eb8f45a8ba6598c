"""FedProx: FedAvg aggregation with a proximal term in each client's fit (Li et al., 2020).

"Federated Optimization in Heterogeneous Networks" (Li et al., MLSys 2020) keeps the server
side of FedAvg and changes the client objective: client ``k`` minimises

    h_k(w) = F_k(w) + mu/2 * ||w - w_t||^2

with ``w_t`` the global state it received, so heterogeneous clients drift less from it. The
gradient of the term is ``mu (w - w_t)``. Here ``w`` are the trainable parameters and ``w_t`` their
values when the client's fit starts (just after the global state was loaded);
:meth:`LocalTrainer.fit <flora_lightning.federation.local_trainer.LocalTrainer.fit>` adds the term to every local
step's loss when the runtime passes it :attr:`Strategy.proximal_mu
<flora_lightning.strategy.Strategy.proximal_mu>`. The reported train loss stays ``F_k`` alone,
comparable across strategies. Unlike Flower's example client, which adds ``||w - w_t||`` (not
squared), this is the paper's squared norm. ``mu = 0`` is FedAvg.
"""

from __future__ import annotations

from flora_lightning.finite_values import check_finite
from flora_lightning.strategy.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg whose clients add ``mu/2 * ||w - w_global||^2`` to their local loss.

    Args:
        mu: proximal weight ``mu`` >= 0 (the paper tries 0.001 to 1; 0: FedAvg).
        min_clients: fewest accepted client updates for a round to count.
        max_num_samples: the most samples an update may claim (None: no bound beyond
            2^53); see :class:`~flora_lightning.strategy.base.Strategy`.
    """

    def __init__(
        self, mu: float = 0.01, min_clients: int = 1, max_num_samples: int | None = None
    ) -> None:
        super().__init__(min_clients=min_clients, max_num_samples=max_num_samples)
        check_finite({"trainer.strategy.mu": mu}, {"trainer.strategy.mu": 0.01})
        if not mu >= 0:
            raise ValueError(
                f"trainer.strategy.mu must be >= 0 (got {mu}); 0 is FedAvg, the paper tries "
                "0.001 to 1."
            )
        self.proximal_mu = float(mu)
