"""``NodeEvaluation``: federated evaluation on a Flower Grid, asked of the nodes.

Plugged into :class:`~flora_lightning.callbacks.FederatedEvaluation` by the ServerApp: for a
round's sampled clients, the connected nodes holding them receive the global state in an
``evaluate`` message and answer with their accuracy, loss and test rows on their own local
test sets (:func:`~flora_lightning.flower.client_app.evaluate_message`). A client is the one
the message was sent to (from the roster), never what a reply claims; a node that fails, is
not connected, or answers with values that are not finite numbers is left out (logged).
"""

from __future__ import annotations

import logging
import math

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from flora_lightning.flower.nodes import NUM_EXAMPLES_KEY

log = logging.getLogger(__name__)


def _number(metrics, key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


class NodeEvaluation:
    """Ask the nodes of ``clients`` to evaluate the global model (see the module docstring).

    Args:
        strategy: the ServerApp's :class:`~flora_lightning.flower.server_strategy.FloraFedAvg`
            (its roster maps clients to nodes; its grid is the run's).
        timeout: seconds to wait for the answers.
    """

    def __init__(self, strategy, timeout: float = 600.0) -> None:
        self.strategy = strategy
        self.timeout = timeout

    def __call__(self, loop, round_: int, clients: list[int]) -> dict:
        grid = self.strategy.grid
        holder = self.strategy.roster.holders(grid)
        arrays = ArrayRecord(loop.model.communicated_state())
        messages, node_client = [], {}
        for client in clients:
            if client not in holder:
                log.warning("federated evaluation, round %d: client %d's node is not "
                            "connected; left out.", round_, client)  # fmt: skip
                continue
            node = holder[client]
            node_client[node] = client
            content = RecordDict(
                {"arrays": arrays, "config": ConfigRecord({"server-round": round_})}
            )
            messages.append(
                Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node)
            )
        results = {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            client = node_client.get(node)
            if client is None:
                continue
            if reply.has_error():
                log.warning("federated evaluation, round %d: client %d failed: %s", round_,
                            client, reply.error.reason[:500])  # fmt: skip
                continue
            metrics = reply.content.metric_records.get("metrics", {})
            acc, loss = _number(metrics, "eval-acc"), _number(metrics, "eval-loss")
            rows = _number(metrics, NUM_EXAMPLES_KEY)
            if acc is None or loss is None or rows is None or rows < 0 or rows != int(rows):
                log.warning("federated evaluation, round %d: client %d's answer is not "
                            "usable; left out.", round_, client)  # fmt: skip
                continue
            results[client] = (acc, loss, int(rows))
        return results
