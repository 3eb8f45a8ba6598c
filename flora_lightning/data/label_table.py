"""Per-client label counts of a partition and their plain-text table (printed and logged).

The counts are read from the final per-client index arrays: those are what the clients train
on, after few-shot selection or a class-block mapping, so the partitioner that drew them is not
asked again. They are flwr-datasets' counts (``flwr_datasets.metrics.compute_counts`` over
:class:`GivenPartitions`, which the tests check them against), computed with ``numpy.bincount``:
``compute_counts`` selects each partition out of a ``datasets.Dataset`` and counts it with
pandas, milliseconds per client and paid again by every Flower node's set-up, where one
``bincount`` counts all clients at once.
"""

from collections.abc import Sequence

import numpy as np
from flwr_datasets.partitioner import Partitioner


class GivenPartitions(Partitioner):
    """A flwr-datasets ``Partitioner`` serving fixed per-client index arrays of ``dataset``.

    Args:
        dataset: The (training) ``datasets.Dataset`` the indices point into.
        partitions: Per-client index arrays (may overlap, may be empty).
    """

    def __init__(self, dataset, partitions: list[np.ndarray]) -> None:
        super().__init__()
        self.dataset = dataset
        self._partitions = [np.asarray(idx, dtype=np.int64) for idx in partitions]

    @property
    def num_partitions(self) -> int:
        return len(self._partitions)

    def load_partition(self, partition_id: int):
        return self.dataset.select(self._partitions[partition_id])


def label_counts(
    labels: Sequence[int], partitions: list[np.ndarray], num_classes: int
) -> np.ndarray:
    """[num_clients, num_classes] count matrix (``flwr_datasets.metrics.compute_counts``'s).

    Args:
        labels: Class index of every training sample.
        partitions: Per-client index arrays, as from
            :func:`flora_lightning.data.partition.partition_indices`.
        num_classes: Number of classes (columns).

    Returns:
        Integer matrix whose entry ``[i, c]`` counts client ``i``'s samples of class ``c``
        (zero for classes a client lacks).
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.zeros((len(partitions), num_classes), dtype=np.int64)
    for client, idx in enumerate(partitions):
        counts[client] = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=num_classes)
    return counts


def format_label_table(
    counts: np.ndarray, class_names: Sequence[str] | None = None, max_classes: int = 20
) -> str:
    """Plain-text table of per-client label counts, for printing and logging.

    One row per client (client id, total, per-class counts); more than ``max_classes``
    classes are summarised as the number of classes present and the top classes.

    Args:
        counts: ``[num_clients, num_classes]`` matrix from :func:`label_counts`.
        class_names: Column names; class indices when ``None``.
        max_classes: Beyond this many classes, rows show the number of classes present
            and the three largest classes instead of every count.

    Returns:
        The table, rows separated by newlines, ending with an ``all`` row of totals.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if class_names is None:
        class_names = range(counts.shape[1])
    names = [str(name) for name in class_names]
    rows = np.vstack([counts, counts.sum(axis=0, keepdims=True)])
    ids = [str(i) for i in range(counts.shape[0])] + ["all"]
    if len(names) <= max_classes:
        header = ["client", "total", *names]
        body = [[cid, str(r.sum()), *map(str, r)] for cid, r in zip(ids, rows, strict=True)]
        left = {0}
    else:
        header = ["client", "total", "classes", "top classes"]
        body = []
        for cid, r in zip(ids, rows, strict=True):
            top = [f"{names[c]}:{r[c]}" for c in np.argsort(-r, kind="stable")[:3] if r[c]]
            body.append([cid, str(r.sum()), str(np.count_nonzero(r)), " ".join(top)])
        left = {0, 3}
    table = [header, *body]
    widths = [max(len(line[j]) for line in table) for j in range(len(header))]
    lines = []
    for line in table:
        cells = [
            cell.ljust(w) if j in left else cell.rjust(w)
            for j, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
