"""``NodeRoster``: which connected SuperNode holds which partition, and a bounded wait for them.

Flower's own sampling (``sample_nodes``) waits, without limit, until ``min_available_nodes``
are connected: one dead SuperNode then stalls the whole federation. The roster instead waits
at most ``wait_seconds`` for the nodes holding the partitions a round wants, then lets the
round go on with those that are connected; the strategy records the others as missing (a
reason starting with :data:`NOT_CONNECTED`).

A node's partition is learnt once, from its answer to a ``query`` message (the ClientApp
answers with its ``node_config["partition-id"]``, or its ``client-id`` with node-local data,
and, only where the node's operator set ``share-label-counts=true``, its sample and label
counts: :attr:`NodeRoster.shared`). A restarted SuperNode comes back with a new node id: it is
asked, and trains its partition again from the next round on.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flora_lightning.finite_values import check_finite
from flora_lightning.flower.reply_checks import BadReply, bounded, count

log = logging.getLogger(__name__)

PARTITION_KEY = "partition-id"
"""Metric that names a client's partition, in train replies and query answers."""
DROPPED_KEY = "dropped"
"""Config key of the reply of a client that dropped out (``trainer.availability``): why."""
NUM_EXAMPLES_KEY = "num-examples"
"""Metric of a node's training samples (train replies; query answers with
``share-label-counts``) and of its test rows (evaluate replies)."""
LABEL_COUNTS_KEY = "label-counts"
"""Metric of a query answer: the node's training label counts, class by class (only with the
node's ``share-label-counts=true``)."""
STRAGGLER_KEY = "straggler-steps"
"""Metric of a straggler's reply: the local steps it completed."""

SENT_BY_NODES: dict[str, dict[str, str]] = {
    "train": {
        NUM_EXAMPLES_KEY: "always: its training samples (FedAvg weighs by it)",
        "train-seconds": "always: its fit time",
        PARTITION_KEY: "always: the client it plays",
        "train-loss": "unless privacy is on without privacy.log_client_stats (then the loss stays on the node)",
        STRAGGLER_KEY: "only a straggler of trainer.availability: the local steps it ran",
    },
    "dropped": {PARTITION_KEY: "always (with the config key 'dropped': the simulated reason)"},
    "query": {
        PARTITION_KEY: "always: the client it plays",
        NUM_EXAMPLES_KEY: "only with the node's share-label-counts=true",
        LABEL_COUNTS_KEY: "only with the node's share-label-counts=true",
    },
    "evaluate": {
        "eval-acc": "FederatedEvaluation: accuracy on its own test set",
        "eval-loss": "FederatedEvaluation: loss on its own test set",
        NUM_EXAMPLES_KEY: "FederatedEvaluation: its test rows",
        PARTITION_KEY: "FederatedEvaluation: the client it plays",
    },
}
"""Reply kind -> every metric a node sends the server in it, and when: besides the adapter
update (train replies' ``arrays``), nothing else about a node's data leaves it. docs/flower.md
("What the server sees") lists the same keys; tests/flower/test_server_view.py checks the
ClientApp's replies and the docs against it."""

NOT_CONNECTED = "node not connected"
"""Start of the rejection reason of a partition whose node did not connect in time."""


class NodeRoster:
    """Node id → partition id of the connected SuperNodes, learnt by asking each node once.

    Args:
        wait_seconds: how long a round waits, at most, for the nodes holding the partitions
            it wants to be connected (0: not at all). Polls every ``poll_seconds``.
        query_timeout: seconds to wait for the nodes' answers to the partition query.
        poll_seconds: pause between two looks at the connected nodes while waiting.
    """

    def __init__(
        self,
        wait_seconds: float = 60.0,
        query_timeout: float = 600.0,
        poll_seconds: float = 1.0,
        bound: dict[int, int] | None = None,
    ) -> None:
        # a NaN wait never ends (its deadline is never reached), an infinite one neither
        check_finite({"node-wait-seconds": wait_seconds}, {"node-wait-seconds": 60.0})
        if not wait_seconds >= 0:
            raise ValueError(
                f"node-wait-seconds must be >= 0 (got {wait_seconds}); 0 does not wait."
            )
        for key, value in (("query_timeout", query_timeout), ("poll_seconds", poll_seconds)):
            check_finite({f"NodeRoster {key}": value})
            if not value >= 0:
                raise ValueError(f"NodeRoster {key} must be >= 0 seconds (got {value}).")
        self.bound = dict(bound or {})
        """Partition -> the only node id that may hold it (run config ``partition-nodes``:
        with SuperNode authentication a node's id is fixed by its registered key)."""
        self.wait_seconds = wait_seconds
        self.query_timeout = query_timeout
        self.poll_seconds = poll_seconds
        self.shared: dict[int, tuple[int, list[int]]] = {}
        """Partition -> (samples, label counts) of the nodes that shared them."""
        self.partitions: dict[int, int] = {}
        """Node id -> partition id (nodes that have left stay listed; only the connected
        ones are looked up)."""
        self._warned: set[tuple[int, int]] = set()

    def holders(self, grid: Grid) -> dict[int, int]:
        """Partition id -> the connected node that trains it (asking new nodes first).

        With :attr:`bound` (run config ``partition-nodes``) a partition is held only by the
        node id bound to it; every other claim is refused with a warning. Otherwise the node
        that claimed a partition *first* keeps it while it is connected: a second
        node claiming the same partition (an impostor, or a copy started by mistake) is
        refused with a warning, whatever its node id (a later, lower node id must not push
        the honest node out)."""
        nodes = sorted(grid.get_node_ids())
        unknown = [node for node in nodes if node not in self.partitions]
        if unknown:
            self.partitions.update(self._ask(grid, unknown))
        connected = set(nodes)
        holder: dict[int, int] = {}
        for node, partition in self.partitions.items():  # in the order the claims came
            if node not in connected:
                continue
            if self.bound and self.bound.get(partition) != node:
                if (-1, node) not in self._warned:
                    self._warned.add((-1, node))
                    log.warning(
                        "node %d claims partition %d, which partition-nodes binds to node %s; "
                        "it is refused.", node, partition, self.bound.get(partition, "none"),
                    )  # fmt: skip
                continue
            if partition in holder:
                if (holder[partition], node) not in self._warned:
                    self._warned.add((holder[partition], node))
                    log.warning(
                        "nodes %d and %d both hold partition %d; node %d claimed it first and "
                        "trains it, node %d is refused.",
                        holder[partition],
                        node,
                        partition,
                        holder[partition],
                        node,
                    )
                continue
            holder[partition] = node
        return holder

    def wait_for(self, grid: Grid, wanted: list[int], round_: int) -> dict[int, int]:
        """Partition -> node for the ``wanted`` partitions whose node is connected, after
        waiting at most :attr:`wait_seconds` for the missing ones."""
        deadline = time.monotonic() + self.wait_seconds
        while True:
            holder = self.holders(grid)
            missing = [p for p in wanted if p not in holder]
            if not missing or time.monotonic() >= deadline:
                break
            log.info(
                "round %d: waiting up to %.0fs for the nodes of partition(s) %s to connect.",
                round_,
                max(0.0, deadline - time.monotonic()),
                missing,
            )
            time.sleep(self.poll_seconds)
        if missing:
            log.warning(
                "round %d: no connected node holds partition(s) %s after waiting %.0fs; the "
                "round goes on without them.",
                round_,
                missing,
                self.wait_seconds,
            )
        return {p: holder[p] for p in wanted if p in holder}

    def _ask(self, grid: Grid, nodes: list[int]) -> dict[int, int]:
        """Each node's ``partition-id``, from its answer to a query message."""
        record = RecordDict({"config": ConfigRecord({"ask": PARTITION_KEY})})
        messages = [
            Message(content=record, message_type=MessageType.QUERY, dst_node_id=node)
            for node in nodes
        ]
        found = {}
        for answer in grid.send_and_receive(messages, timeout=self.query_timeout):
            node = answer.metadata.src_node_id
            try:  # an answer is another machine's: read each field through a check
                partition, shared = self._read_answer(answer)
            except BadReply as err:
                log.warning("node %d did not tell its partition (%s); it is not sampled.",
                            node, err)  # fmt: skip
                continue
            # a second claimant's counts never replace those of the node that claimed first
            claimed = partition in self.partitions.values() or partition in found.values()
            found[node] = partition
            if shared is not None and not claimed:
                self.shared[partition] = shared
        return found

    @staticmethod
    def _read_answer(answer: Message) -> tuple[int, tuple[int, list[int]] | None]:
        """A query answer's partition and, where shared, (samples, label counts).

        Raises:
            BadReply: an error answer, or a field missing or malformed (the reason).
        """
        if answer.has_error():
            raise BadReply(bounded(answer.error.reason))
        try:
            metrics = answer.content.metric_records.get("metrics")
        except Exception as err:  # noqa: BLE001 - a malformed answer is refused
            raise BadReply(bounded(f"{type(err).__name__}: {err}")) from None
        if metrics is None or PARTITION_KEY not in metrics:
            raise BadReply("no partition-id")
        partition = count(metrics[PARTITION_KEY], PARTITION_KEY)
        if LABEL_COUNTS_KEY not in metrics or NUM_EXAMPLES_KEY not in metrics:
            return partition, None
        labels = metrics[LABEL_COUNTS_KEY]
        if not isinstance(labels, list):
            raise BadReply(f"its {LABEL_COUNTS_KEY!r} is not a list")
        counts = [count(c, LABEL_COUNTS_KEY) for c in labels]
        return partition, (count(metrics[NUM_EXAMPLES_KEY], NUM_EXAMPLES_KEY), counts)
