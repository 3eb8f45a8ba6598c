"""``FloraFedAvg``: Flower's FedAvg with flora's aggregation over the communicated tensors.

Message construction is Flower's (:class:`flwr.serverapp.strategy.FedAvg`). Sampling is
Flower's too, unless ``select_clients`` is given (the ServerApp passes the loop's seeded
``sample_clients`` when ``join_ratio < 1``): then the clients (partition ids) it names for the
round train, exactly as in ``flora fit``; each node's partition id is learnt once with a
``query`` message (the ClientApp answers with its ``partition-id``).

Aggregation is flora's, the same code the in-process loop runs: the YAML's
``trainer.strategy``, by default :class:`flora_lightning.strategy.FedAvg`, which with client
``k`` returning ``w_k`` after training on ``n_k`` samples (its ``num-examples`` metric) makes
every communicated tensor

    w_global = sum_k n_k * w_k / sum_k n_k       (accumulated in float64)

over the *accepted* replies only. A reply is excluded, with a logged reason, when its ClientApp
raised (an error reply), when it lacks arrays or ``num-examples``, or when flora's
:meth:`Strategy.rejection_reason` refuses it (NaN/Inf, other tensor names or shapes, no
samples). With at least ``min_clients`` accepted the round completes; with fewer the round
returns no arrays and Flower keeps the previous global state, which is never modified in place.

Traffic is measured on what actually travels: ``bytes_down`` is the global ArrayRecord's
``nbytes`` times the messages sent, ``bytes_up`` the bytes of every update received (its
decoded tensors' ``numel * element_size``, which is the ArrayRecord's ``nbytes``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flora_lightning.records import RoundTally
from flora_lightning.strategy import ClientUpdate, FedAvg, Strategy, state_bytes

log = logging.getLogger(__name__)

PARTITION_KEY = "partition-id"
"""Metric that names a client's partition, in train replies and query answers."""


def array_record_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays as NumPy holds them: the sum of ``ndarray.nbytes``."""
    return sum(array.numpy().nbytes for array in record.values())


def to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord → writable torch tensors (names kept)."""
    return {name: torch.from_numpy(np.array(a.numpy(), copy=True)) for name, a in record.items()}


class RoundEngine(Protocol):
    """The round steps the strategy drives (:class:`flora_lightning.engine.RoundEngine`)."""

    def begin_round(self, round_: int, clients: list[int]) -> RoundTally: ...

    def client_update(self, tally: RoundTally, update: ClientUpdate, seconds: float) -> None: ...


class FloraFedAvg(FlowerFedAvg):
    """Flower FedAvg whose ``aggregate_train`` is flora's sample-weighted FedAvg.

    Args:
        min_clients: fewest accepted updates for a round to change the global state.
        fraction_train: share of connected nodes sampled each round (flora's ``join_ratio``).
        min_train_nodes: fewest nodes sampled per round.
        min_available_nodes: wait until this many nodes are connected before sampling.
        engine: the round engine (the ServerApp's loop): its ``begin_round`` starts each
            round's tally when the train messages are configured, before any client trains,
            and its ``client_update`` sees every decoded reply before it is aggregated (so
            callbacks, traffic and losses are counted as in ``flora fit``). ``None``: the
            strategy keeps plain tallies itself.
        select_clients: ``round -> partition ids`` that train in that round; ``None`` keeps
            Flower's random node sampling.
        average: the flora aggregation to run, any :class:`~flora_lightning.strategy.Strategy`
            (the YAML's ``trainer.strategy``, e.g.
            :class:`~flora_lightning.strategy.LoraProductAverage`); ``None``: flora's FedAvg.
            Its ``min_clients`` is set to ``min_clients``.
        query_timeout: seconds to wait for the nodes' partition ids.
    """

    def __init__(
        self,
        min_clients: int = 1,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        engine: RoundEngine | None = None,
        select_clients: Callable[[int], list[int]] | None = None,
        query_timeout: float = 600.0,
        average: Strategy | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,  # evaluation is central, on the global test set
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=0,
            min_available_nodes=min_available_nodes,
        )
        self.average = average if average is not None else FedAvg()
        self.average.min_clients = min_clients
        self.engine = engine
        self.select_clients = select_clients
        self.query_timeout = query_timeout
        self.partitions: dict[int, int] = {}
        """Node id -> partition id, learnt from the nodes' answers to a query message."""
        self.reports: dict[int, RoundTally] = {}
        """Round -> its tally (traffic, losses, accepted and rejected clients)."""
        self._global: dict[str, torch.Tensor] = {}

    @property
    def min_clients(self) -> int:
        return self.average.min_clients

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sampling (Flower's, or ``select_clients``); remembers the global state sent and
        counts the bytes down."""
        if self.select_clients is None:
            messages = list(super().configure_train(server_round, arrays, config, grid))
            clients = []  # partition ids are known only from the replies
        else:
            messages, clients = self._configure_selected(server_round, arrays, config, grid)
        self._global = to_state(arrays)
        if self.engine is not None:
            tally = self.engine.begin_round(server_round, clients)
        else:
            tally = RoundTally(round=server_round, clients=clients)
        tally.bytes_down = array_record_bytes(arrays) * len(messages)
        self.reports[server_round] = tally
        return messages

    def _configure_selected(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> tuple[list[Message], list[int]]:
        """Train messages to the nodes holding the partitions ``select_clients`` names, and
        the partitions that train."""
        # Waits until min_available_nodes are connected; every connected node is a candidate.
        _, nodes = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        unknown = [node for node in nodes if node not in self.partitions]
        if unknown:
            self.partitions.update(self._ask_partitions(grid, unknown))
        holder: dict[int, int] = {}  # partition -> the node that trains it (lowest id)
        for node in sorted(nodes):
            partition = self.partitions.get(node)
            if partition is None:
                continue
            if partition in holder:
                log.warning(
                    "nodes %d and %d both hold partition %d; only node %d trains it.",
                    holder[partition],
                    node,
                    partition,
                    holder[partition],
                )
                continue
            holder[partition] = node
        wanted = sorted(self.select_clients(server_round))
        chosen = [holder[p] for p in wanted if p in holder]
        missing = [p for p in wanted if p not in holder]
        if missing:
            log.warning(
                "round %d: no connected node holds partition(s) %s; they do not train.",
                server_round,
                missing,
            )
        log.info("configure_train: partitions %s (seeded, as flora fit)", wanted)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        trained = [p for p in wanted if p in holder]
        return list(self._construct_messages(record, chosen, MessageType.TRAIN)), trained

    def _ask_partitions(self, grid: Grid, nodes: list[int]) -> dict[int, int]:
        """Each node's ``partition-id``, from its answer to a query message."""
        record = RecordDict({self.configrecord_key: ConfigRecord({"ask": PARTITION_KEY})})
        messages = self._construct_messages(record, nodes, MessageType.QUERY)
        found = {}
        for answer in grid.send_and_receive(messages, timeout=self.query_timeout):
            node = answer.metadata.src_node_id
            metrics = None if answer.has_error() else answer.content.metric_records.get("metrics")
            if metrics is None or PARTITION_KEY not in metrics:
                reason = answer.error.reason if answer.has_error() else "no partition-id"
                log.warning(
                    "node %d did not tell its partition (%s); it is not sampled.", node, reason
                )
                continue
            found[node] = int(metrics[PARTITION_KEY])
        return found

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Stream the accepted replies into flora's FedAvg; ``(None, metrics)`` when too few."""
        report = self.reports.setdefault(server_round, RoundTally(round=server_round))
        self.average.begin(self._global)
        for message in replies:
            decoded = self._decode(message, report)
            if decoded is None:
                continue
            update, seconds = decoded
            if self.engine is not None:
                self.engine.client_update(report, update, seconds)
            else:
                self._count(report, update, seconds)
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

    def _decode(self, message: Message, report: RoundTally) -> tuple[ClientUpdate, float] | None:
        """A reply as ``(ClientUpdate, train seconds)``, or ``None`` (logged, recorded) when it
        cannot be one."""
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
        update = ClientUpdate(
            client_id=int(metrics.get(PARTITION_KEY, node)),
            state=to_state(record),
            num_samples=int(metrics[self.weighted_by_key]),
            train_loss=float(metrics.get("train-loss", float("nan"))),
        )
        return update, float(metrics.get("train-seconds", 0.0))

    @staticmethod
    def _count(report: RoundTally, update: ClientUpdate, seconds: float) -> None:
        """Traffic and loss of an update, when no engine counts them."""
        sent = state_bytes(update.state)
        report.bytes_up += sent
        report.client_bytes_up[update.client_id] = sent
        report.train_loss[update.client_id] = update.train_loss
        report.train_seconds += seconds

    @staticmethod
    def _reject(report: RoundTally, who: str, reason: str) -> None:
        log.warning("%s excluded from aggregation: %s", who, reason)
        report.rejected[who] = reason
        return None

    def _mean_loss(self, report: RoundTally) -> float:
        losses = {c: report.train_loss[c] for c in report.accepted}
        return float(np.mean(list(losses.values()))) if losses else float("nan")

    def summary(self) -> None:
        super().summary()
        log.info(
            "aggregation: flora FedAvg (sample-weighted, float64), min_clients=%d", self.min_clients
        )
