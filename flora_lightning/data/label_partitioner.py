"""A flwr-datasets ``Partitioner`` that cuts every partition from the label column at once."""

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import Partitioner


class LabelPartitioner(Partitioner):
    """Base of partitioners whose rule reads only the labels: :meth:`split` returns every
    partition's row indices, computed on the first :meth:`load_partition` and kept.

    Args:
        num_partitions: Number of partitions (clients).
        partition_by: Name of the label column.
    """

    def __init__(self, num_partitions: int, partition_by: str = "label") -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1 (got {num_partitions})")
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._partition_id_to_indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        """Total number of partitions."""
        return self._num_partitions

    def load_partition(self, partition_id: int) -> Dataset:
        """Load the partition ``partition_id`` (all partitions are cut on the first call)."""
        if self._partition_id_to_indices is None:
            labels = np.asarray(self.dataset[self._partition_by][:])
            self._partition_id_to_indices = self.split(labels)
        return self.dataset.select(self._partition_id_to_indices[partition_id])

    def split(self, labels: np.ndarray) -> list[np.ndarray]:
        """Every partition's sorted row indices, given the label of every row."""
        raise NotImplementedError
