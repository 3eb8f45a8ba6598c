"""The aggregation interface: how client states become the next global state."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]

SAMPLE_COUNT_LIMIT = 2**53
"""Largest sample count any update may claim, whatever ``max_num_samples`` says: float64 (the
aggregation weights) holds every whole number up to it exactly, and no int overflows."""

MAX_REASON_CHARS = 300
"""Longest rejection reason recorded or logged (an update's own text is cut to fit)."""


def bounded(reason: str, limit: int = MAX_REASON_CHARS) -> str:
    """``reason`` cut to ``limit`` characters (the cut marked with ``...``)."""
    reason = str(reason)
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def non_finite_reason(state: State, global_state: State) -> str | None:
    """Why ``state`` cannot become the global state: a tensor that holds NaN or Inf *in the
    global state's dtype* (a float64 1e39 is finite, and Inf once stored as float32)."""
    for name, tensor in state.items():
        dtype = global_state[name].dtype if name in global_state else tensor.dtype
        if not torch.isfinite(tensor.to(dtype)).all():
            return f"the aggregate's tensor {name} holds NaN or Inf in {dtype}"
    return None


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

    max_num_samples: int | None = None
    """Largest sample count an update may claim (None: unbounded). FedAvg weighs each update by
    the count its client reports: one claiming 10^18 samples would replace the global state."""
    known_num_samples: Callable[[int], int | None] | None = None
    """``client -> its training samples`` where the server knows them (simulated partitions),
    else None; an update claiming another count is refused. None: counts are trusted."""

    _result: State | None = None  # finish_round's aggregate, until result() hands it out

    def __init__(self, min_clients: int = 1, max_num_samples: int | None = None) -> None:
        if not min_clients >= 1:  # `not >=`: NaN fails it too
            raise ValueError(f"trainer.strategy.min_clients must be >= 1 (got {min_clients}).")
        if max_num_samples is not None and (
            isinstance(max_num_samples, bool)
            or not isinstance(max_num_samples, int)
            or max_num_samples < 1
        ):
            raise ValueError(
                "trainer.strategy.max_num_samples must be a whole number >= 1, or null for no "
                f"bound (got {max_num_samples!r})."
            )
        self.min_clients = min_clients
        if max_num_samples is not None:
            self.max_num_samples = max_num_samples
        self._result: State | None = None
        self.global_state: State = {}
        self.accepted: list[int] = []
        """Client ids of this round's accepted updates, in arrival order."""
        self.rejected: dict[int, str] = {}
        """Client id -> why its update was refused this round."""

    def begin(self, global_state: State) -> None:
        """Start a round from the current global state."""
        self.global_state = global_state
        self.accepted, self.rejected = [], {}
        self._result = None
        self.start_round(global_state)

    def check(self, update: ClientUpdate) -> str | None:
        """Why ``update`` would be refused this round (bounded text), or None; never raises."""
        try:
            reason = self._field_reason(update) or self.rejection_reason(update, self.global_state)
        except Exception as err:  # noqa: BLE001 - a malformed update is refused, not raised
            reason = f"its update could not be checked: {type(err).__name__}: {err}"
        return None if reason is None else bounded(reason)

    def add(self, update: ClientUpdate) -> bool:
        """Check one client's update and fold it into the round; False when it was refused
        (logged and recorded in :attr:`rejected`; never raises for a malformed update)."""
        reason = self.check(update)
        if reason is not None:
            who = update.client_id if isinstance(update.client_id, int) else repr(update.client_id)
            log.warning("client %s excluded from aggregation: %s", bounded(str(who), 40), reason)
            self.rejected[who] = reason
            return False
        self.accumulate(update)
        self.accepted.append(update.client_id)
        return True

    def finish_round(self) -> State | None:
        """Aggregate now (with at least ``min_clients`` accepted) and keep the result for
        :meth:`result`; None when too few were accepted or the aggregate is not finite in the
        global state's dtype: then every accepted update moves to :attr:`rejected` with the
        reason, so the round closes as one with too few updates (``trainer.on_too_few_updates``)
        and the global state stays as it was. Both runtimes call it before closing a round."""
        if len(self.accepted) < self.min_clients:
            return None
        state = self.aggregate()
        reason = non_finite_reason(state, self.global_state)
        if reason is not None:
            log.error("round not aggregated: %s; the global state stays as it was.", reason)
            for client in self.accepted:
                self.rejected[client] = reason
            self.accepted = []
            return None
        self._result = state
        return state

    def result(self) -> State:
        """The new global state: :meth:`finish_round`'s, else aggregated now.

        Raises:
            RuntimeError: fewer than ``min_clients`` accepted, or the aggregate is not finite.
        """
        if self._result is not None:
            state, self._result = self._result, None
            return state
        if len(self.accepted) < self.min_clients:
            raise RuntimeError(
                f"only {len(self.accepted)} client update(s) accepted, fewer than "
                f"trainer.strategy.min_clients={self.min_clients}; rejected: {self.rejected}"
            )
        state = self.aggregate()
        reason = non_finite_reason(state, self.global_state)
        if reason is not None:
            raise RuntimeError(f"{reason}; the global state must stay as it was.")
        return state

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

    def _field_reason(self, update: ClientUpdate) -> str | None:
        """The update's fields: types, the sample count's bounds, the tensors' dtype."""
        client = update.client_id
        if isinstance(client, bool) or not isinstance(client, (int, np.integer)) or client < 0:
            return f"its client id {client!r} is not a whole number >= 0"
        if client in self.accepted:
            return f"client {client} already sent an update this round"
        n = update.num_samples
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            return f"its sample count {n!r} is not a whole number"
        if n > SAMPLE_COUNT_LIMIT:
            return f"it reports {n} samples, more than any update may ({SAMPLE_COUNT_LIMIT})"
        if self.max_num_samples is not None and n > self.max_num_samples:
            return (
                f"it reports {n} samples, more than trainer.strategy.max_num_samples="
                f"{self.max_num_samples}"
            )
        known = None if self.known_num_samples is None else self.known_num_samples(int(client))
        if known is not None and n != known:
            return f"it reports {n} samples; its partition holds {known}"
        loss = update.train_loss
        if isinstance(loss, bool) or not isinstance(loss, (int, float, np.integer, np.floating)):
            return f"its train loss {loss!r} is not a number"
        if not math.isnan(loss) and not math.isfinite(loss):
            return f"its train loss is {loss}"
        if not isinstance(update.state, dict):
            return f"its state is a {type(update.state).__name__}, not a dict of tensors"
        for name, tensor in update.state.items():
            if not isinstance(tensor, torch.Tensor):
                return f"tensor {name!r} is a {type(tensor).__name__}"
            expected = self.global_state.get(name)
            if expected is not None and tensor.dtype != expected.dtype:
                return f"tensor {name} has dtype {tensor.dtype}, not {expected.dtype}"
        return None

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
