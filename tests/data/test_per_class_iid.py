"""Tests for the per-class IID partitioner on its own (released split: test_partition)."""

import pytest

from flora_lightning.data.per_class_iid import PerClassIidPartitioner


def test_per_class_iid_partitioner_on_its_own():
    from datasets import Dataset

    partitioner = PerClassIidPartitioner(num_partitions=3)
    # class 0 at rows 0, 2, ..., 12 (7 rows), class 1 at 1, 3, ..., 11 and 13, 14 (8 rows)
    partitioner.dataset = Dataset.from_dict({"label": [0, 1] * 7 + [1], "row": list(range(15))})
    rows = [partitioner.load_partition(i)["row"] for i in range(3)]
    # int(7 / 3) = 2 and int(8 / 3) = 2 consecutive rows of each class; the last takes the rest
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    assert partitioner.num_partitions == 3
    with pytest.raises(ValueError, match="num_partitions must be >= 1"):
        PerClassIidPartitioner(num_partitions=0)
