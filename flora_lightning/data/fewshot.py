"""Few-shot partitioning: every client gets ``shots`` samples of every class."""

import numpy as np

from flora_lightning.data.label_partitioner import LabelPartitioner


class FewShotPartitioner(LabelPartitioner):
    """IID few-shot partitioner: every partition gets ``shots`` samples of every class.

    With ``overlap`` (the released code's split) each partition draws its ``shots`` rows
    of each class independently from all rows of that class, so two partitions may share
    rows and a class needs only ``shots`` rows. Without it the rows of each class are
    shuffled once and dealt out in consecutive blocks of ``shots``: partitions are disjoint
    and a class needs ``num_partitions * shots`` rows. Rows not drawn stay unused.

    Args:
        num_partitions: Number of partitions (clients).
        shots: Samples of each class per partition.
        partition_by: Name of the label column.
        seed: Seed of the shuffle.
        overlap: Draw each partition's shots independently (partitions may share rows).
    """

    def __init__(
        self,
        num_partitions: int,
        shots: int,
        partition_by: str = "label",
        seed: int | None = 42,
        overlap: bool = False,
    ) -> None:
        if num_partitions < 1 or shots < 1:
            raise ValueError(
                f"num_partitions and shots must be >= 1 (got {num_partitions}, {shots})"
            )
        super().__init__(num_partitions, partition_by)
        self._shots = shots
        self._seed = seed
        self._overlap = overlap

    def split(self, labels: np.ndarray) -> list[np.ndarray]:
        rng = np.random.default_rng(self._seed)
        needed = self._shots if self._overlap else self._num_partitions * self._shots
        by_class = [np.flatnonzero(labels == label) for label in np.unique(labels)]
        for label, rows in zip(np.unique(labels), by_class, strict=True):
            if rows.size < needed:
                raise ValueError(f"class {label!r} has {rows.size} samples but {needed} are needed")
        if self._overlap:  # partition by partition, each class drawn afresh (released order)
            return [
                np.sort(np.concatenate([rng.permutation(rows)[: self._shots] for rows in by_class]))
                for _ in range(self._num_partitions)
            ]
        blocks: list[list[np.ndarray]] = [[] for _ in range(self._num_partitions)]
        for rows in by_class:
            rows = rng.permutation(rows)
            for pid, block in enumerate(np.split(rows[:needed], self._num_partitions)):
                blocks[pid].append(block)
        return [np.sort(np.concatenate(b)) for b in blocks]
