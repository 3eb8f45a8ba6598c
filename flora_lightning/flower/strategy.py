"""``FloraFedAvg``: Flower's FedAvg with flora's aggregation over the communicated tensors.

Sampling and message construction are Flower's (:class:`flwr.serverapp.strategy.FedAvg`);
aggregation is :class:`flora_lightning.strategy.FedAvg`, the same code the in-process loop
runs. With client ``k`` returning ``w_k`` after training on ``n_k`` samples (its
``num-examples`` metric), every communicated tensor becomes

    w_global = sum_k n_k * w_k / sum_k n_k       (accumulated in float64)

over the *accepted* replies only. A reply is excluded, with a logged reason, when its ClientApp
raised (an error reply), when it lacks arrays or ``num-examples``, or when flora's
:meth:`Strategy.rejection_reason` refuses it (NaN/Inf, other tensor names or shapes, no
samples). With at least ``min_clients`` accepted the round completes; with fewer the round
returns no arrays and Flower keeps the previous global state, which is never modified in place.

Traffic is measured on what actually travels: ``bytes_down`` is the global ArrayRecord's
``nbytes`` times the messages sent, ``bytes_up`` the ``nbytes`` of every ArrayRecord received.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from flora_lightning.strategy import ClientUpdate
from flora_lightning.strategy import FedAvg as FloraAverage

log = logging.getLogger(__name__)


def array_record_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays as NumPy holds them: the sum of ``ndarray.nbytes``."""
    return sum(array.numpy().nbytes for array in record.values())


def to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord → writable torch tensors (names kept)."""
    return {name: torch.from_numpy(np.array(a.numpy(), copy=True)) for name, a in record.items()}


@dataclass
class RoundReport:
    """What one training round saw: traffic, losses, who was aggregated and who was not."""

    bytes_down: int = 0
    bytes_up: int = 0
    client_bytes_up: dict[int, int] = field(default_factory=dict)
    train_loss: dict[int, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    accepted: list[int] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    aggregated: bool = False


class FloraFedAvg(FlowerFedAvg):
    """Flower FedAvg whose ``aggregate_train`` is flora's sample-weighted FedAvg.

    Args:
        min_clients: fewest accepted updates for a round to change the global state.
        fraction_train: share of connected nodes sampled each round (flora's ``join_ratio``).
        min_train_nodes: fewest nodes sampled per round.
        min_available_nodes: wait until this many nodes are connected before sampling.
        on_client_update: called with ``(round, update)`` for every decoded reply, before
            it is aggregated (the server app feeds its callbacks with it).
    """

    def __init__(
        self,
        min_clients: int = 1,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        on_client_update: Callable[[int, ClientUpdate], None] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,  # evaluation is central, on the global test set
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=0,
            min_available_nodes=min_available_nodes,
        )
        self.average = FloraAverage(min_clients=min_clients)
        self.on_client_update = on_client_update
        self.reports: dict[int, RoundReport] = {}
        self._global: dict[str, torch.Tensor] = {}

    @property
    def min_clients(self) -> int:
        return self.average.min_clients

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling; remembers the global state sent and counts the bytes down."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._global = to_state(arrays)
        self.reports[server_round] = RoundReport(
            bytes_down=array_record_bytes(arrays) * len(messages)
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Stream the accepted replies into flora's FedAvg; ``(None, metrics)`` when too few."""
        report = self.reports.setdefault(server_round, RoundReport())
        self.average.begin(self._global)
        for message in replies:
            update = self._decode(message, report)
            if update is None:
                continue
            if self.on_client_update is not None:
                self.on_client_update(server_round, update)
            self.average.add(update)  # logs and records its own rejections
        report.accepted = sorted(self.average.accepted)  # arrival order varies
        report.rejected.update({str(c): r for c, r in self.average.rejected.items()})
        metrics = MetricRecord(
            {
                "num-accepted": len(report.accepted),
                "num-rejected": len(report.rejected),
                "train-loss": self._mean_loss(report),
            }
        )
        if len(report.accepted) < self.min_clients:
            log.error(
                "round %d not aggregated: %d update(s) accepted, fewer than min_clients=%d; "
                "the global state stays as it was. Rejected: %s",
                server_round,
                len(report.accepted),
                self.min_clients,
                report.rejected,
            )
            return None, metrics
        report.aggregated = True
        return ArrayRecord(self.average.result()), metrics

    def _decode(self, message: Message, report: RoundReport) -> ClientUpdate | None:
        """A reply as a ClientUpdate, or ``None`` (logged, recorded) when it cannot be one."""
        node = message.metadata.src_node_id
        if message.has_error():
            return self._reject(
                report, f"node {node}", f"its ClientApp failed: {message.error.reason}"
            )
        content = message.content
        if self.arrayrecord_key not in content.array_records:
            return self._reject(report, f"node {node}", "its reply carries no arrays")
        metrics = content.metric_records.get("metrics")
        if metrics is None or self.weighted_by_key not in metrics:
            return self._reject(
                report, f"node {node}", f"its reply has no {self.weighted_by_key!r}"
            )
        record = content.array_records[self.arrayrecord_key]
        sent = array_record_bytes(record)
        client = int(metrics.get("partition-id", node))
        report.bytes_up += sent
        report.client_bytes_up[client] = sent
        loss = float(metrics.get("train-loss", float("nan")))
        report.train_loss[client] = loss
        report.train_seconds += float(metrics.get("train-seconds", 0.0))
        return ClientUpdate(
            client_id=client,
            state=to_state(record),
            num_samples=int(metrics[self.weighted_by_key]),
            train_loss=loss,
        )

    @staticmethod
    def _reject(report: RoundReport, who: str, reason: str) -> None:
        log.warning("%s excluded from aggregation: %s", who, reason)
        report.rejected[who] = reason
        return None

    def _mean_loss(self, report: RoundReport) -> float:
        losses = {c: report.train_loss[c] for c in report.accepted}
        return float(np.mean(list(losses.values()))) if losses else float("nan")

    def summary(self) -> None:
        super().summary()
        log.info(
            "aggregation: flora FedAvg (sample-weighted, float64), min_clients=%d", self.min_clients
        )
