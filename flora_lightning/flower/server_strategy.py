"""``FloraFedAvg``: Flower's FedAvg with flora's aggregation over the communicated tensors.

Message construction is Flower's (:class:`flwr.serverapp.strategy.FedAvg`). Sampling is
Flower's too, unless ``select_clients`` is given (the ServerApp passes the loop's seeded
``sample_clients``): then the clients (partition ids) it names for the round train, exactly as
in ``flora fit``; each node's partition id is learnt once with a ``query`` message (the
ClientApp answers with its ``partition-id``; :class:`~flora_lightning.flower.nodes.NodeRoster`).

Dead nodes do not stall the run: a round waits at most ``node_wait_seconds`` for the nodes of
its partitions, then trains those connected; a missing partition is recorded in ``rejected``
("node not connected: ..."), a node that dies while training comes back as an error reply.

Aggregation is flora's, the code the in-process loop runs: the YAML's ``trainer.strategy``
(default :class:`flora_lightning.strategy.FedAvg`: ``w = sum_k n_k w_k / sum_k n_k`` in
float64, ``n_k`` the ``num-examples`` metric) over the *accepted* replies. A reply is excluded,
with a logged reason, when its ClientApp raised, when it lacks arrays or ``num-examples``, or
when :meth:`Strategy.rejection_reason` refuses it (NaN/Inf, other names or shapes, no
samples). With fewer than ``min_clients`` accepted the round engine's
:meth:`~flora_lightning.federation.engine.RoundEngine.close_round` applies
``trainer.on_too_few_updates``: ``raise`` (the default, as ``flora fit``) stops the ServerApp
with :class:`~flora_lightning.federation.engine.RoundFailedError`, the last complete round saved;
``skip`` returns no arrays and Flower keeps the previous global state (never modified in place).

Every count goes through the round engine (``begin_round``, ``record_sent``, ``record_update``,
``record_rejected``, ``record_dropped``, ``record_straggler``, ``close_round``), the one writer
of a round's tally; without a loop a bare :class:`~flora_lightning.federation.engine.RoundEngine`
keeps them.

Traffic is what travels: ``bytes_down`` the ``nbytes`` of each train message's ArrayRecord
(with ``trainer.client_ranks``, a client's rank slice), ``bytes_up`` those of each update.
With client-level DP the ServerApp wraps this strategy in Flower's DP wrapper
(:mod:`flora_lightning.flower.dp`), which aggregates only the replies :meth:`screen` keeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from flora_lightning.federation.engine import RoundEngine
from flora_lightning.flower.arrays import array_record_bytes, to_state
from flora_lightning.flower.nodes import NOT_CONNECTED, PARTITION_KEY, NodeRoster
from flora_lightning.flower.reply_checks import layout
from flora_lightning.flower.reply_reader import ReplyReader
from flora_lightning.rundir.round_record import RoundTally
from flora_lightning.strategy import FedAvg, State, Strategy

# imported from here by other modules and tests
__all__ = ["PARTITION_KEY", "FloraFedAvg", "array_record_bytes", "to_state"]

log = logging.getLogger(__name__)


class FloraFedAvg(ReplyReader, FlowerFedAvg):
    """Flower FedAvg whose ``aggregate_train`` is flora's ``trainer.strategy``.

    Replies are read and checked by :class:`~flora_lightning.flower.reply_reader.ReplyReader`
    (:meth:`screen`, :meth:`_decode`) against what this strategy sent in the round.

    Args:
        min_clients: fewest accepted updates for a round to change the global state.
        fraction_train: share of connected nodes sampled each round (flora's ``join_ratio``;
            Flower's sampling only, without ``select_clients``).
        min_train_nodes: fewest nodes sampled per round (Flower's sampling only).
        min_available_nodes: Flower's sampling waits until this many nodes are connected
            (without limit; with ``select_clients`` the wait is ``node_wait_seconds``).
        engine: the round engine (the ServerApp's loop): ``begin_round`` starts each round's
            tally, ``record_update`` sees every decoded reply before it is aggregated and
            ``close_round`` applies ``trainer.on_too_few_updates`` (as in ``flora fit``).
            ``None``: a bare :class:`~flora_lightning.federation.engine.RoundEngine` (policy
            ``raise``) keeps the tallies.
        select_clients: ``round -> partition ids`` that train in that round (the ServerApp
            passes the loop's seeded sampler); ``None`` keeps Flower's random node sampling.
        query_timeout: seconds to wait for the nodes' partition ids.
        average: the flora aggregation, any :class:`~flora_lightning.strategy.Strategy` (the
            YAML's ``trainer.strategy``); ``None``: FedAvg. Its ``min_clients`` is set.
        node_wait_seconds: with ``select_clients``, the longest a round waits for the nodes
            of its partitions; the missing ones are rejected ("node not connected").
        round_offset: rounds already done (a resumed run): Flower's round ``r`` is the run's
            round ``r + round_offset`` (train messages, so the clients' seeds; sampler; tallies).
        node_reports: called with partition -> (samples, label counts) of the nodes that
            shared them (``share-label-counts``) whenever the roster learns new ones.
        known_num_samples: ``partition -> its training samples`` where the server knows them
            (simulated partitions: the datamodule's ``num_samples``): a reply claiming another
            count is refused. ``None``: the claims are trusted up to
            ``trainer.strategy.max_num_samples``.
        partition_nodes: partition -> the only node id that may train it (run config
            ``partition-nodes``); None: the first node to claim a partition keeps it.
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
        node_wait_seconds: float = 60.0,
        round_offset: int = 0,
        node_reports: Callable[[dict[int, tuple[int, list[int]]]], None] | None = None,
        known_num_samples: Callable[[int], int] | None = None,
        partition_nodes: dict[int, int] | None = None,
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
        self.engine = engine if engine is not None else RoundEngine()
        self.select_clients = select_clients
        self.roster = NodeRoster(wait_seconds=node_wait_seconds, query_timeout=query_timeout,
                                 bound=partition_nodes)  # fmt: skip
        self.round_offset = round_offset
        self.node_reports = node_reports
        self.known_num_samples = known_num_samples
        self.grid: Grid | None = None
        """The run's Grid (from the first ``configure_train``): federated evaluation uses it."""
        self.reports: dict[int, RoundTally] = {}
        """Round (of the run) -> its tally (traffic, losses, accepted and rejected clients)."""
        self._global: State = {}
        self._sent: list[Message] = []  # the round's train messages (the Grid sets their ids)
        self._expected: dict[int, dict] = {}  # node -> layout of the arrays it was sent
        self._sent_partition: dict[int, int] = {}  # node -> the partition it was sent
        self.required_metrics: tuple[str, ...] = ()
        """Metrics every reply must carry (client-side adaptive DP: Flower's ``norm_bit``)."""

    @property
    def min_clients(self) -> int:
        return self.average.min_clients

    @property
    def partitions(self) -> dict[int, int]:
        """Node id -> partition id, learnt from the nodes' answers to a query message."""
        return self.roster.partitions

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sampling (Flower's, or ``select_clients``); remembers the global state sent and
        counts the bytes down."""
        round_ = server_round + self.round_offset
        self.grid = grid
        missing: list[int] = []
        if self.select_clients is None:
            messages = list(super().configure_train(round_, arrays, config, grid))
            clients = []  # partition ids are known only from the replies
        else:
            messages, clients, missing = self._configure_selected(round_, arrays, config, grid)
        self._global = to_state(arrays)
        self._sent = messages
        self._expected = {  # what each node was sent: its reply must have this layout
            m.metadata.dst_node_id: layout(m.content.array_records[self.arrayrecord_key])
            for m in messages
        }
        self._sent_partition = {
            m.metadata.dst_node_id: p for m, p in zip(messages, clients, strict=False)
        } if clients else {}  # fmt: skip
        tally = self.engine.begin_round(round_, clients)
        for partition in missing:
            self.engine.record_rejected(
                tally,
                str(partition),
                f"{NOT_CONNECTED}: no connected SuperNode held partition {partition} within "
                f"node-wait-seconds={self.roster.wait_seconds:g}",
            )
        self.engine.record_sent(
            tally,
            sum(
                array_record_bytes(m.content.array_records[self.arrayrecord_key]) for m in messages
            ),
        )
        self.reports[round_] = tally
        return messages

    def _configure_selected(
        self, round_: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> tuple[list[Message], list[int], list[int]]:
        """Train messages to the connected nodes holding the partitions ``select_clients``
        names; the partitions that train and those whose node is missing."""
        wanted = sorted(self.select_clients(round_))
        shared = len(self.roster.shared)
        holder = self.roster.wait_for(grid, wanted, round_)
        if self.node_reports is not None and len(self.roster.shared) != shared:
            self.node_reports(dict(self.roster.shared))
        trained = [p for p in wanted if p in holder]
        missing = [p for p in wanted if p not in holder]
        log.info("configure_train: round %d, partitions %s (seeded, as flora fit)", round_, wanted)
        config["server-round"] = round_
        messages, global_state = [], to_state(arrays)
        for partition in trained:  # each client gets what it trains from (its rank's slice)
            rank = self.engine.client_rank(partition)
            sent = arrays
            if rank is not None:
                sent = ArrayRecord(self.engine.state_for_client(global_state, partition))
            record = RecordDict({self.arrayrecord_key: sent, self.configrecord_key: config})
            messages += self._construct_messages(record, [holder[partition]], MessageType.TRAIN)
        return messages, trained, missing

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Stream the accepted replies into flora's FedAvg; ``(None, metrics)`` when too few
        under ``trainer.on_too_few_updates=skip`` (then Flower keeps the previous global arrays:
        the round changes nothing). A reply is read only through its own guard (:meth:`_decode`),
        the callbacks (``record_update``: the privacy accountant, ...) see only updates that
        passed every check, and an aggregate that is not finite in the global state's dtype
        leaves the round unaggregated (:meth:`Strategy.finish_round`).

        Raises:
            RoundFailedError: too few under ``raise`` (the engine's :meth:`close_round`).
        """
        server_round += self.round_offset
        report = self.reports.setdefault(server_round, RoundTally(round=server_round))
        self.average.begin(self._global)
        seen: set[int] = set()
        for message in replies:
            decoded = self._decode(message, report, seen)
            if decoded is None:
                continue
            update, seconds = decoded
            # the engine runs the callbacks (privacy accountant, ...) for checked updates only
            self.engine.record_update(report, update, seconds)
            self.average.add(update)  # logs and records its own rejections
        self.average.finish_round()  # a non-finite aggregate rejects the round's updates
        aggregated = self.engine.close_round(
            report, self.average.accepted, self.average.rejected, self.min_clients
        )
        losses = [report.train_loss.get(c, float("nan")) for c in report.accepted]
        metrics = MetricRecord(
            {
                "num-accepted": len(report.accepted),
                "num-rejected": len(report.rejected),
                "train-loss": float(np.mean(losses)) if losses else float("nan"),
            }
        )
        if not aggregated:
            return None, metrics
        return ArrayRecord(self.average.result()), metrics

    def summary(self) -> None:
        super().summary()
        log.info("aggregation: flora %s, min_clients=%d", type(self.average).__name__,
                 self.min_clients)  # fmt: skip
