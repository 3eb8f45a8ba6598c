"""The aggregation interface: how client states become the next global state."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

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
    Updates with non-finite values are refused with a reason; the global state is untouched.
    """

    def __init__(self, min_clients: int = 1) -> None:
        if min_clients < 1:
            raise ValueError(f"trainer.strategy.min_clients must be >= 1 (got {min_clients}).")
        self.min_clients = min_clients

    @abstractmethod
    def begin(self, global_state: State) -> None:
        """Start a round from the current global state."""

    @abstractmethod
    def add(self, update: ClientUpdate) -> None:
        """Fold one client's update into the round."""

    @abstractmethod
    def result(self) -> State:
        """The new global state (raises if fewer than ``min_clients`` were accepted)."""

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
