"""The aggregation interface: how client states become the next global state."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def state_bytes(state: State) -> int:
    """Bytes of the tensors as sent: ``numel * element_size`` summed."""
    return sum(t.numel() * t.element_size() for t in state.values())


@dataclass
class ClientUpdate:
    """What one client returns after local training."""

    client_id: int
    state: State
    num_samples: int
    train_loss: float


class Strategy(ABC):
    """Streaming aggregation: ``begin`` a round, ``add`` each client update, ``result``.

    Streaming keeps memory at two copies of the communicated state (global + accumulator)
    however many clients join, which matters for FedFFT (600 MB per copy at ViT-B/32).
    The base class checks every update once (tensor names, shapes, sample count, finite
    values): a refused update is logged and recorded in :attr:`rejected` with its reason and
    never reaches the subclass; the global state is untouched. A new strategy implements
    three hooks: :meth:`start_round`, :meth:`accumulate` (accepted updates only) and
    :meth:`aggregate` (called with at least ``min_clients`` accepted).

    Two optional extensions: a strategy that keeps server state across rounds (a server
    optimiser's moments) returns it from :meth:`state_dict` for resume, and a strategy with a
    client-side term (FedProx) sets :attr:`proximal_mu`, which the runtimes pass to the local fit.
    """

    proximal_mu: float = 0.0
    """Weight ``mu`` of the client's proximal term ``mu/2 * ||w - w_global||^2`` (0: none);
    the loop and the ClientApp pass it to :meth:`LocalTrainer.fit
    <flora_lightning.federation.local_trainer.LocalTrainer.fit>`."""

    def __init__(self, min_clients: int = 1) -> None:
        if not min_clients >= 1:  # `not >=`: NaN fails it too
            raise ValueError(f"trainer.strategy.min_clients must be >= 1 (got {min_clients}).")
        self.min_clients = min_clients
        self.global_state: State = {}
        self.accepted: list[int] = []
        """Client ids of this round's accepted updates, in arrival order."""
        self.rejected: dict[int, str] = {}
        """Client id -> why its update was refused this round."""

    def begin(self, global_state: State) -> None:
        """Start a round from the current global state."""
        self.global_state = global_state
        self.accepted, self.rejected = [], {}
        self.start_round(global_state)

    def add(self, update: ClientUpdate) -> bool:
        """Check one client's update and fold it into the round; False when it was refused."""
        reason = self.rejection_reason(update, self.global_state)
        if reason is not None:
            log.warning("client %d excluded from aggregation: %s", update.client_id, reason)
            self.rejected[update.client_id] = reason
            return False
        self.accumulate(update)
        self.accepted.append(update.client_id)
        return True

    def result(self) -> State:
        """The new global state (raises if fewer than ``min_clients`` were accepted)."""
        if len(self.accepted) < self.min_clients:
            raise RuntimeError(
                f"only {len(self.accepted)} client update(s) accepted, fewer than "
                f"trainer.strategy.min_clients={self.min_clients}; rejected: {self.rejected}"
            )
        return self.aggregate()

    def state_dict(self) -> State:
        """Server state kept across rounds, as tensors (for resume); empty for stateless ones."""
        return {}

    def load_state_dict(self, state: State) -> None:
        """Restore :meth:`state_dict`'s output (before the first :meth:`begin` of a resumed run).

        Raises:
            ValueError: ``state`` is not empty (this strategy keeps no state).
        """
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no server state but was given {sorted(state)[:3]}; "
                "the resume state comes from a run with another trainer.strategy."
            )

    @abstractmethod
    def start_round(self, global_state: State) -> None:
        """Reset the accumulators for a round starting from ``global_state``."""

    @abstractmethod
    def accumulate(self, update: ClientUpdate) -> None:
        """Fold one checked update (names, shapes, samples, values are valid) into the round."""

    @abstractmethod
    def aggregate(self) -> State:
        """The new global state from the accepted updates (at least ``min_clients``)."""

    @staticmethod
    def rejection_reason(update: ClientUpdate, global_state: State) -> str | None:
        """Why an update must not be aggregated, or ``None`` when it is fine."""
        if set(update.state) != set(global_state):
            return "its tensor names differ from the global state"
        if update.num_samples <= 0:
            return f"it reports {update.num_samples} samples"
        for name, tensor in update.state.items():
            if tensor.shape != global_state[name].shape:
                return f"tensor {name} has shape {tuple(tensor.shape)}"
            if not torch.isfinite(tensor).all():
                return f"tensor {name} holds NaN or Inf"
        return None
