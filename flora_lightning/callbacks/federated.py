"""``FederatedEvaluation``: the global model evaluated where the data is, on the clients' own test sets.

A federation whose server holds no data (Flower run config ``node-data``) can still measure
the global model: after a round (every ``every`` rounds), the clients sampled for that round
evaluate it on their local test sets (``data.local_test_fraction`` or each node's
``test-path`` / ``data.partition.client_test_dirs``) and the results are aggregated weighted
by their test rows (Flower's evaluate round)::

    federated_test_acc  = sum_c n_c acc_c  / sum_c n_c   (= correct / rows over all of them)
    federated_test_loss = sum_c n_c loss_c / sum_c n_c

``flora fit`` computes each client's numbers in process; the Flower ServerApp sets
:attr:`FederatedEvaluation.evaluator` to ask the nodes instead
(:class:`~flora_lightning.flower.node_evaluation.NodeEvaluation`), so both runtimes record
the same fields: ``federated_test_acc``, ``federated_test_loss``, ``federated_test_samples``
and ``federated_test_clients`` in the round records (summary.json), ``federated/test_acc``
and ``federated/test_loss`` in TensorBoard, and the last evaluated round's in the summary,
beside the server-side ``test_acc`` when the server has a test set. Round 0 (no client
sampled yet) is not evaluated. Turn it on with::

    trainer:
      callbacks:
        - class_path: flora_lightning.callbacks.FederatedEvaluation
          init_args: {every: 1}
"""

from __future__ import annotations

import math
from collections.abc import Callable

from flora_lightning.callbacks.base import Callback
from flora_lightning.federation.evaluation import evaluate_loader

ClientResults = dict[int, tuple[float, float, int]]
"""Client -> (accuracy, mean loss, test rows) of the global model on its local test set."""


def evaluate_in_process(loop, round_: int, clients: list[int]) -> ClientResults:
    """Each client's numbers, computed here (``flora fit``: the loop holds every client's data)."""
    data = loop.datamodule
    source = loop.feature_cache or data
    results = {}
    for client in clients:
        metrics = evaluate_loader(loop.fabric, loop.model, source.client_test_dataloader(client),
                                  len(data.class_names))  # fmt: skip
        rows = len(data.client_test_indices[client])
        results[client] = (metrics["test_acc"], metrics["test_loss"], rows)
    return results


def aggregate(results: ClientResults) -> dict:
    """The test-row-weighted accuracy and loss of ``results`` (NaN when no row)."""
    rows = sum(n for _, _, n in results.values())
    if rows == 0:
        return {"federated_test_acc": math.nan, "federated_test_loss": math.nan,
                "federated_test_samples": 0, "federated_test_clients": []}  # fmt: skip
    return {
        "federated_test_acc": sum(n * acc for acc, _, n in results.values()) / rows,
        "federated_test_loss": sum(n * loss for _, loss, n in results.values()) / rows,
        "federated_test_samples": rows,
        "federated_test_clients": sorted(results),
    }


class FederatedEvaluation(Callback):
    """The global model on the round's sampled clients' local test sets (module docstring).

    Args:
        every: evaluate every n rounds (rounds n, 2n, ...), n >= 1.
    """

    def __init__(self, every: int = 1) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"FederatedEvaluation.every must be an integer >= 1 (got {every}).")
        self.every = every
        self.evaluator: Callable[..., ClientResults] | None = None
        """Who computes the clients' numbers: None in ``flora fit`` (in process); the Flower
        ServerApp sets it to ask the nodes."""
        self.last: dict = {}

    def on_fit_start(self, loop, model) -> None:
        if self.evaluator is None and not loop.datamodule.has_local_test:
            raise ValueError(
                "FederatedEvaluation needs the clients' local test sets: set "
                "data.local_test_fraction (e.g. 0.2) or data.partition.client_test_dirs."
            )

    def round_fields(self, loop, record) -> dict:
        if record.round == 0 or record.round % self.every:
            return {}
        clients = sorted(loop.round_clients(record.round))
        evaluator = self.evaluator or evaluate_in_process
        fields = aggregate(evaluator(loop, record.round, clients))
        loop.fabric.log_dict(
            {"federated/test_acc": fields["federated_test_acc"],
             "federated/test_loss": fields["federated_test_loss"]},
            step=record.round,
        )  # fmt: skip
        self.last = {k: v for k, v in fields.items() if k != "federated_test_clients"}
        return fields

    def summary_fields(self, loop, summary: dict) -> dict:
        return dict(self.last)
