"""Reading a node's train reply into a :class:`ClientUpdate`, and naming who sent it.

The server trusts no reply. :class:`ReplyReader` is the part of
:class:`~flora_lightning.flower.server_strategy.FloraFedAvg` that turns each reply into
``(ClientUpdate, train seconds)`` or a rejection with a bounded reason, never an exception:

- an error reply (the ClientApp raised, or the SuperLink wrote that the node died) is refused
  with the remote exception's line (:func:`~flora_lightning.flower.reply_checks.remote_error`);
- a reply from a node not sent a train message this round, or a second reply from one, is
  refused; a reply marked ``dropped`` (``trainer.availability``) is recorded as dropped;
- every field is read through :mod:`~flora_lightning.flower.reply_checks`: arrays of the
  names, dtypes and shapes the node was sent, ``num-examples`` in ``[1, max_num_samples]``
  (and equal to the partition's known count where the server knows it), finite reals;
- the client a reply counts for is the partition its node was sent, never what it claims.

:meth:`ReplyReader.screen` is what Flower's DP wrapper (:mod:`flora_lightning.flower.dp`)
asks before clipping: the replies whose update is valid and finite.

A mixin: the strategy that inherits it holds the round's state it reads (the attributes
annotated on the class), and its round engine records every rejection, drop and straggler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, Message

from flora_lightning.federation.engine import RoundEngine
from flora_lightning.flower.nodes import DROPPED_KEY, PARTITION_KEY, STRAGGLER_KEY
from flora_lightning.flower.reply_checks import (
    BadReply,
    bounded,
    count,
    layout,
    real,
    remote_error,
    text,
    to_checked_state,
)
from flora_lightning.rundir.round_record import RoundTally
from flora_lightning.strategy import ClientUpdate, State, Strategy
from flora_lightning.strategy.base import SAMPLE_COUNT_LIMIT

log = logging.getLogger(__name__)


class ReplyReader:
    """Reads and checks train replies for the strategy that inherits it (``FloraFedAvg``).

    The inheriting strategy sets, each round, what a reply is checked against.
    """

    engine: RoundEngine
    """Records rejections, drops and stragglers in the round's tally."""
    average: Strategy
    """flora's aggregation: its ``max_num_samples`` bounds ``num-examples``."""
    select_clients: Callable[[int], list[int]] | None
    """Set when the server chooses the partitions (then every reply must match one sent)."""
    known_num_samples: Callable[[int], int] | None
    """``partition -> its training samples`` where the server knows them."""
    required_metrics: tuple[str, ...]
    """Metrics every reply must carry (client-side adaptive DP: Flower's ``norm_bit``)."""
    round_offset: int
    """Rounds already done (a resumed run): Flower's round ``r`` is the run's ``r + offset``."""
    reports: dict[int, RoundTally]
    """Round (of the run) -> its tally, where rejections are recorded."""
    arrayrecord_key: str
    """Flower's key of the arrays in a message."""
    weighted_by_key: str
    """Flower's key of the sample count (``num-examples``) in a reply's metrics."""
    partitions: dict[int, int]
    """Node id -> partition id, learnt from the nodes' answers to a query message."""
    _global: State
    """The global state of the round (the layout expected when a node's is not known)."""
    _sent: list[Message]
    """The round's train messages (the Grid sets their ids)."""
    _expected: dict[int, dict]
    """Node -> layout of the arrays it was sent."""
    _sent_partition: dict[int, int]
    """Node -> the partition it was sent."""

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies that carry a valid update (names, dtypes and shapes those sent, fields
        that parse, finite values): what Flower's DP wrapper may clip. The others (error
        replies, dropped clients, malformed replies) are decoded into the round's tally now,
        each inside its own guard."""
        round_ = server_round + self.round_offset
        report = self.reports.setdefault(round_, RoundTally(round=round_))
        usable, seen = [], set()
        for message in replies:
            decoded = self._decode(message, report, seen)
            if decoded is None:
                continue
            update, _ = decoded
            for name, tensor in update.state.items():
                if not torch.isfinite(tensor).all():  # clipping would spread it
                    who = self._who(message)
                    self._reject(report, who, f"tensor {name} holds NaN or Inf")
                    break
            else:
                usable.append(message)
        return usable

    def _decode(
        self, message: Message, report: RoundTally, seen: set[int] | None = None
    ) -> tuple[ClientUpdate, float] | None:
        """A reply as ``(ClientUpdate, train seconds)``, or ``None`` (logged, recorded) when it
        cannot be one. Never raises: whatever the reply holds, a failure to read it is a
        rejection with a bounded reason."""
        try:
            return self._read(message, report, set() if seen is None else seen)
        except BadReply as err:
            reason = str(err)
        except Exception as err:  # noqa: BLE001 - a malformed reply must not end the run
            reason = bounded(f"its reply could not be read: {type(err).__name__}: {err}")
        try:
            who = self._who(message)
        except Exception:  # noqa: BLE001 - even its metadata may be broken
            who = "unknown node"
        self._reject(report, who, reason)
        return None

    def _who(self, message: Message) -> str:
        """How the tally names a reply's sender: its partition where known, else its node."""
        node = self._addressee(message)
        partition = self._sent_partition.get(node, self.partitions.get(node))
        if partition is None and self.select_clients is None and not message.has_error():
            try:  # Flower's sampling: the client id is the one the reply names, if it parses
                metrics = message.content.metric_records.get("metrics")
                if metrics is not None and PARTITION_KEY in metrics:
                    partition = count(metrics[PARTITION_KEY], PARTITION_KEY)
            except Exception:  # noqa: BLE001 - then the node names it
                partition = None
        return f"node {node}" if partition is None else str(partition)

    def _read(
        self, message: Message, report: RoundTally, seen: set[int]
    ) -> tuple[ClientUpdate, float] | None:
        """:meth:`_decode`'s reading; raises :class:`BadReply` (the reason) on a bad reply."""
        node = self._addressee(message)
        if message.has_error():  # keyed by the node's partition where it is known
            partition = self._sent_partition.get(node, self.partitions.get(node))
            where = "" if partition is None else f" (node {node})"
            cause = remote_error(message.error.reason)
            raise BadReply(bounded(f"its ClientApp failed{where}: {cause}"))
        if self._expected and node not in self._expected:
            raise BadReply(f"node {node} was not sent a train message this round")
        if node in seen:
            raise BadReply(f"node {node} already replied this round")
        seen.add(node)
        content = message.content
        config = content.config_records.get("config")
        metrics = content.metric_records.get("metrics")
        if config is not None and DROPPED_KEY in config:  # trainer.availability: sent nothing
            reason = text(config[DROPPED_KEY], DROPPED_KEY)
            self.engine.record_dropped(report, self._client_id(node, metrics), reason)
            return None
        if self.arrayrecord_key not in content.array_records:
            raise BadReply("its reply carries no arrays")
        if set(content.array_records) != {self.arrayrecord_key}:  # a DP wrapper clips them all
            raise BadReply(f"its reply carries array records other than {self.arrayrecord_key!r}")
        if metrics is None or self.weighted_by_key not in metrics:
            raise BadReply(f"its reply has no {self.weighted_by_key!r}")
        for key in self.required_metrics:  # what the DP wrapper reads from every record
            if any(key not in record for record in content.metric_records.values()):
                raise BadReply(f"its reply has no {key!r}")
        client = self._client_id(node, metrics)
        bound = self.average.max_num_samples
        bound = SAMPLE_COUNT_LIMIT if bound is None else min(bound, SAMPLE_COUNT_LIMIT)
        num_samples = count(metrics[self.weighted_by_key], self.weighted_by_key, minimum=1,
                            maximum=bound)  # fmt: skip
        known = self._known_samples(client)
        if known is not None and num_samples != known:
            raise BadReply(f"it reports {num_samples} samples; partition {client} holds {known}")
        loss = float("nan")  # absent under DP: the loss stays on the node
        if "train-loss" in metrics:
            loss = real(metrics["train-loss"], "train-loss")
        seconds = real(metrics.get("train-seconds", 0.0), "train-seconds", minimum=0.0)
        steps = None
        if STRAGGLER_KEY in metrics:
            steps = count(metrics[STRAGGLER_KEY], STRAGGLER_KEY)
        expected = self._expected.get(node) or layout(ArrayRecord(self._global))
        state = to_checked_state(content.array_records[self.arrayrecord_key], expected)
        if steps is not None:  # recorded once every field has been read
            self.engine.record_straggler(report, client, steps)
        update = ClientUpdate(client, state, num_samples, loss)
        return update, seconds

    def _known_samples(self, client: int) -> int | None:
        """``known_num_samples(client)``, or None where the server does not know it."""
        if self.known_num_samples is None:
            return None
        try:
            return int(self.known_num_samples(client))
        except Exception:  # noqa: BLE001 - a client the server has no rows of
            return None

    def _client_id(self, node: int, metrics) -> int:
        """The client (partition) a reply counts for: the one its node was sent, never what the
        reply claims (a claim that differs is refused). Without ``select_clients`` (Flower's
        sampling: the server knows no partitions) the reply's ``partition-id``, else the node."""
        partition = self._sent_partition.get(node)
        claimed = None
        if metrics is not None and PARTITION_KEY in metrics:
            claimed = count(metrics[PARTITION_KEY], PARTITION_KEY)
        if partition is not None:
            if claimed is not None and claimed != partition:
                raise BadReply(f"it claims partition {claimed}; node {node} was sent partition "
                               f"{partition}")  # fmt: skip
            return partition
        if self.select_clients is not None:
            raise BadReply(f"node {node} holds no partition sent this round")
        return node if claimed is None else claimed

    def _addressee(self, reply: Message) -> int:
        """The node a reply answers for: its sender, or, for an error the SuperLink wrote
        itself (a node that stopped sending heartbeats), the node the message went to."""
        for sent in self._sent:
            if sent.metadata.message_id and (
                sent.metadata.message_id == reply.metadata.reply_to_message_id
            ):
                return sent.metadata.dst_node_id
        return reply.metadata.src_node_id

    def _reject(self, report: RoundTally, who: str, reason: str) -> None:
        """Log and record (in the round's tally) that ``who``'s reply is excluded."""
        reason = bounded(reason)
        log.warning("%s excluded from aggregation: %s", who, reason)
        self.engine.record_rejected(report, who, reason)
