"""Server optimisers: FedAvgM, FedAdam, FedYogi, FedAdagrad (Reddi et al., 2021).

"Adaptive Federated Optimization" (Reddi et al., ICLR 2021, Algorithm 2) treats the mean client
change as a pseudo-gradient and steps the global model with a server optimiser. With client
``k`` holding ``n_k`` samples and returning ``w_k`` from the round's global ``w_t``,

    Delta_t = sum_k n_k (w_k - w_t) / sum_k n_k              (FedAvg's float64 mean, minus w_t)

then, per tensor and element-wise, with server learning rate ``eta = server_lr``:

    FedAvgM    m_t = momentum * m_{t-1} + Delta_t             w_{t+1} = w_t + eta * m_t
    adaptive   m_t = beta_1 * m_{t-1} + (1 - beta_1) Delta_t
               FedAdagrad  v_t = v_{t-1} + Delta_t^2
               FedYogi     v_t = v_{t-1} - (1 - beta_2) Delta_t^2 sign(v_{t-1} - Delta_t^2)
               FedAdam     v_t = beta_2 v_{t-1} + (1 - beta_2) Delta_t^2
               w_{t+1} = w_t + eta * m_t / (sqrt(v_t) + tau)

with ``m_{-1} = 0`` and ``v_{-1} = tau^2``. This follows the paper: Flower's ``FedAdam`` /
``FedYogi`` / ``FedAdagrad`` (``flwr/serverapp/strategy/fed*.py``, flwr 1.42) start from
``v_{-1} = 0`` and its ``FedAdam`` also applies Adam's bias correction to ``eta``; neither is in
Algorithm 2. FedAvgM is Hsu et al. (2019)'s heavy-ball server momentum, the same update as
Flower's ``FedAvgM``; with ``server_lr = 1`` and ``momentum = 0`` it is FedAvg.

The moments ``m`` and ``v`` (float64, one per communicated tensor) persist across rounds in the
strategy; :meth:`ServerOptimizer.state_dict` returns them for a resumed run to restore. Client
weighting is by samples as in :class:`~flora_lightning.strategy.FedAvg` (the paper's Delta is
the unweighted mean over the sampled clients; they agree when clients hold equal shares).
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from flora_lightning.finite_values import check_finite
from flora_lightning.strategy.base import State
from flora_lightning.strategy.fedavg import FedAvg


def _check_lr(server_lr: float) -> None:
    check_finite({"trainer.strategy.server_lr": server_lr})
    if not server_lr > 0:
        raise ValueError(f"trainer.strategy.server_lr must be > 0 (got {server_lr}).")


def _check_beta(field: str, value: float) -> None:
    check_finite({f"trainer.strategy.{field}": value})
    if not 0 <= value < 1:
        raise ValueError(
            f"trainer.strategy.{field} must be in [0, 1) (got {value}); 0 disables it."
        )


class ServerOptimizer(FedAvg):
    """FedAvg's weighted mean as a pseudo-gradient, stepped by a server optimiser.

    A subclass names its moment slots in :attr:`slots` and implements :meth:`step`.

    Args:
        server_lr: server learning rate ``eta``.
        min_clients: fewest accepted client updates for a round to count.
        max_num_samples: the most samples an update may claim (None: no bound beyond
            2^53); see :class:`~flora_lightning.strategy.base.Strategy`.
    """

    slots: tuple[str, ...] = ("m",)
    """Names of the per-tensor moments kept across rounds."""

    def __init__(
        self, server_lr: float = 1.0, min_clients: int = 1, max_num_samples: int | None = None
    ) -> None:
        super().__init__(min_clients=min_clients, max_num_samples=max_num_samples)
        _check_lr(server_lr)
        self.server_lr = server_lr
        self.moments: dict[str, State] = {slot: {} for slot in self.slots}
        """Slot name -> tensor name -> float64 moment (empty before the first aggregation)."""

    def start_round(self, global_state: State) -> None:
        super().start_round(global_state)
        for slot, moment in self.moments.items():
            if moment and set(moment) != set(global_state):
                raise ValueError(
                    f"{type(self).__name__}: the server moments '{slot}' are for tensors "
                    f"{sorted(set(moment) ^ set(global_state))[:3]} that the global state does "
                    "not match; resume with the trainer.strategy and model of the saved run."
                )
            for name, tensor in moment.items():
                moment[name] = tensor.to(global_state[name].device, torch.float64)

    def aggregate(self) -> State:
        new_state = {}
        for name, total in self._sum.items():
            current = self.global_state[name].to(total.device, torch.float64)
            delta = total / self._weight - current
            new_state[name] = (current + self.step(name, delta)).to(self.global_state[name].dtype)
        return new_state

    @abstractmethod
    def step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """Update tensor ``name``'s moments from ``Delta_t`` and return ``w_{t+1} - w_t``."""

    def moment(self, slot: str, name: str, delta: torch.Tensor, initial: float) -> torch.Tensor:
        """Moment ``slot`` of tensor ``name`` from the last round, or ``initial`` in the first."""
        previous = self.moments[slot].get(name)
        return torch.full_like(delta, initial) if previous is None else previous

    def state_dict(self) -> State:
        """The moments as ``{"<slot>.<tensor name>": float64 tensor on CPU}``."""
        return {
            f"{slot}.{name}": tensor.detach().to("cpu", copy=True)
            for slot, moment in self.moments.items()
            for name, tensor in moment.items()
        }

    def load_state_dict(self, state: State) -> None:
        """Restore :meth:`state_dict`'s output (checked against the global state next round).

        Raises:
            ValueError: a key whose slot this optimiser does not keep.
        """
        moments: dict[str, State] = {slot: {} for slot in self.slots}
        for key, tensor in state.items():
            slot, _, name = key.partition(".")
            if slot not in moments or not name:
                raise ValueError(
                    f"{type(self).__name__} keeps moments {list(self.slots)}, not '{key}'; "
                    "the resume state comes from a run with another trainer.strategy."
                )
            moments[slot][name] = tensor.detach().to(torch.float64, copy=True)
        self.moments = moments


class FedAvgM(ServerOptimizer):
    """Server momentum: ``m_t = momentum * m_{t-1} + Delta_t``, ``w_{t+1} = w_t + eta m_t``.

    Args:
        server_lr: server learning rate ``eta`` (1: FedAvg's step length).
        momentum: heavy-ball momentum ``beta`` in [0, 1). Default 0.9, Hsu et al. (2019)'s
            value; Flower's FedAvgM defaults to 0, which with server_lr 1 is plain FedAvg (pass
            0 to compare with a Flower run that kept its default).
        min_clients: fewest accepted client updates for a round to count.
        max_num_samples: the most samples an update may claim (None: no bound beyond
            2^53); see :class:`~flora_lightning.strategy.base.Strategy`.
    """

    def __init__(
        self,
        server_lr: float = 1.0,
        momentum: float = 0.9,
        min_clients: int = 1,
        max_num_samples: int | None = None,
    ) -> None:
        super().__init__(
            server_lr=server_lr, min_clients=min_clients, max_num_samples=max_num_samples
        )
        _check_beta("momentum", momentum)
        self.momentum = momentum

    def step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        m = self.momentum * self.moment("m", name, delta, 0.0) + delta
        self.moments["m"][name] = m
        return self.server_lr * m


class AdaptiveServerOptimizer(ServerOptimizer):
    """Reddi et al.'s adaptive update ``w_{t+1} = w_t + eta m_t / (sqrt(v_t) + tau)``.

    ``m_t = beta_1 m_{t-1} + (1 - beta_1) Delta_t`` from ``m_{-1} = 0``; a subclass gives
    ``v_t`` from ``v_{t-1}`` (``v_{-1} = tau^2``) in :meth:`second_moment`.

    Args:
        server_lr: server learning rate ``eta``.
        beta_1: first-moment decay in [0, 1).
        tau: adaptivity ``tau`` > 0 (larger: closer to server SGD with momentum).
        min_clients: fewest accepted client updates for a round to count.
        max_num_samples: the most samples an update may claim (None: no bound beyond
            2^53); see :class:`~flora_lightning.strategy.base.Strategy`.
    """

    slots = ("m", "v")

    def __init__(
        self,
        server_lr: float,
        beta_1: float,
        tau: float = 1e-3,
        min_clients: int = 1,
        max_num_samples: int | None = None,
    ) -> None:
        super().__init__(
            server_lr=server_lr, min_clients=min_clients, max_num_samples=max_num_samples
        )
        _check_beta("beta_1", beta_1)
        check_finite({"trainer.strategy.tau": tau}, {"trainer.strategy.tau": 1e-3})
        if not tau > 0:
            raise ValueError(f"trainer.strategy.tau must be > 0 (got {tau}); the paper uses 1e-3.")
        self.beta_1 = beta_1
        self.tau = tau

    def step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        m = self.beta_1 * self.moment("m", name, delta, 0.0) + (1 - self.beta_1) * delta
        v = self.second_moment(self.moment("v", name, delta, self.tau**2), delta)
        self.moments["m"][name], self.moments["v"][name] = m, v
        return self.server_lr * m / (v.sqrt() + self.tau)

    @abstractmethod
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``v_t`` from ``v_{t-1}`` and ``Delta_t``."""


class FedAdagrad(AdaptiveServerOptimizer):
    """Server Adagrad: ``v_t = v_{t-1} + Delta_t^2``.

    Args:
        server_lr: server learning rate ``eta`` (Flower's default 0.1).
        beta_1: first-moment decay in [0, 1) (0, as Flower: no momentum).
        tau: adaptivity ``tau`` > 0.
        min_clients: fewest accepted client updates for a round to count.
        max_num_samples: the most samples an update may claim (None: no bound beyond
            2^53); see :class:`~flora_lightning.strategy.base.Strategy`.
    """

    def __init__(
        self,
        server_lr: float = 0.1,
        beta_1: float = 0.0,
        tau: float = 1e-3,
        min_clients: int = 1,
        max_num_samples: int | None = None,
    ) -> None:
        super().__init__(
            server_lr=server_lr,
            beta_1=beta_1,
            tau=tau,
            min_clients=min_clients,
            max_num_samples=max_num_samples,
        )

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v + delta**2


class FedYogi(AdaptiveServerOptimizer):
    """Server Yogi: ``v_t = v_{t-1} - (1 - beta_2) Delta_t^2 sign(v_{t-1} - Delta_t^2)``.

    Args:
        server_lr: server learning rate ``eta`` (Flower's default 0.01).
        beta_1: first-moment decay in [0, 1).
        beta_2: second-moment decay in [0, 1).
        tau: adaptivity ``tau`` > 0.
        min_clients: fewest accepted client updates for a round to count.
        max_num_samples: the most samples an update may claim (None: no bound beyond
            2^53); see :class:`~flora_lightning.strategy.base.Strategy`.
    """

    def __init__(
        self,
        server_lr: float = 0.01,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        min_clients: int = 1,
        max_num_samples: int | None = None,
    ) -> None:
        super().__init__(
            server_lr=server_lr,
            beta_1=beta_1,
            tau=tau,
            min_clients=min_clients,
            max_num_samples=max_num_samples,
        )
        _check_beta("beta_2", beta_2)
        self.beta_2 = beta_2

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        squared = delta**2
        return v - (1 - self.beta_2) * squared * torch.sign(v - squared)


class FedAdam(AdaptiveServerOptimizer):
    """Server Adam (no bias correction, as Algorithm 2): ``v_t = beta_2 v_{t-1} +
    (1 - beta_2) Delta_t^2``.

    Args:
        server_lr: server learning rate ``eta`` (Flower's default 0.1).
        beta_1: first-moment decay in [0, 1).
        beta_2: second-moment decay in [0, 1).
        tau: adaptivity ``tau`` > 0.
        min_clients: fewest accepted client updates for a round to count.
        max_num_samples: the most samples an update may claim (None: no bound beyond
            2^53); see :class:`~flora_lightning.strategy.base.Strategy`.
    """

    def __init__(
        self,
        server_lr: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        min_clients: int = 1,
        max_num_samples: int | None = None,
    ) -> None:
        super().__init__(
            server_lr=server_lr,
            beta_1=beta_1,
            tau=tau,
            min_clients=min_clients,
            max_num_samples=max_num_samples,
        )
        _check_beta("beta_2", beta_2)
        self.beta_2 = beta_2

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.beta_2 * v + (1 - self.beta_2) * delta**2
