"""The released code's IID split: every class cut into equal consecutive chunks, one per client."""

import numpy as np

from flora_lightning.data.label_partitioner import LabelPartitioner


class PerClassIidPartitioner(LabelPartitioner):
    """IID partitioner that gives every partition an equal share of every class.

    The released code's ``separate_data`` with ``niid=False, balance=True`` (what its README
    runs for IID): for each class, the class's rows in dataset order (no shuffle) are cut into
    ``num_partitions`` consecutive chunks of ``n_c // num_partitions`` rows; the last partition
    takes the remainder, ``n_c - (num_partitions - 1) * (n_c // num_partitions)``. No randomness:
    the split depends only on the order of the rows. A class with fewer rows than partitions
    goes wholly to the last partition.

    Args:
        num_partitions: Number of partitions (clients).
        partition_by: Name of the label column.
    """

    def split(self, labels: np.ndarray) -> list[np.ndarray]:
        k = self._num_partitions
        blocks: list[list[np.ndarray]] = [[] for _ in range(k)]
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)  # in dataset order
            chunk = rows.size // k
            for pid, block in enumerate(np.split(rows, chunk * np.arange(1, k))):
                blocks[pid].append(block)
        return [np.sort(np.concatenate(b)) for b in blocks]
