"""Per-client label counts of a partition and their plain-text table (printed and logged).

The counts are flwr-datasets' own (``flwr_datasets.metrics.compute_counts``), read from the
final per-client index arrays: those are what the clients train on, after few-shot selection or
a class-block mapping, so the partitioner that drew them is not asked again.

Cost: ``compute_counts`` reads each partition's label column into a ``pandas.Series``, which
with ``datasets`` 4 iterates the column row by row (about 50 us a label: 2-3 s for CIFAR-10's
50,000 labels on this project's busy 2-core machine, 0.2 s for the offline digits), once per
fit, where a ``numpy.bincount`` would take a millisecond; small next to loading the data.
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
    """[num_clients, num_classes] count matrix, from ``flwr_datasets.metrics.compute_counts``.

    Args:
        labels: Class index of every training sample.
        partitions: Per-client index arrays, as from
            :func:`flora_lightning.data.partition.partition_indices`.
        num_classes: Number of classes (columns).

    Returns:
        Integer matrix whose entry ``[i, c]`` counts client ``i``'s samples of class ``c``
        (zero for classes a client lacks).
    """
    import datasets
    from flwr_datasets.metrics import compute_counts

    if not partitions:
        return np.zeros((0, num_classes), dtype=np.int64)
    table = datasets.Dataset.from_dict(
        {"label": np.asarray(labels, dtype=np.int64)},
        features=datasets.Features({"label": datasets.ClassLabel(num_classes=num_classes)}),
    )
    frame = compute_counts(GivenPartitions(table, partitions), "label")
    return frame.to_numpy(dtype=np.int64)


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
