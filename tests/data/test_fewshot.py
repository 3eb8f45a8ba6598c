"""Tests for the few-shot partitioner on its own (through ``partition_indices``: test_partition)."""

from flora_lightning.data.fewshot import FewShotPartitioner


def test_fewshot_partitioner_on_its_own():
    from datasets import Dataset

    partitioner = FewShotPartitioner(num_partitions=3, shots=2, seed=0)
    partitioner.dataset = Dataset.from_dict({"label": [0, 1] * 10})
    labels = [partitioner.load_partition(i)["label"] for i in range(3)]
    assert [sorted(x) for x in labels] == [[0, 0, 1, 1]] * 3
    assert partitioner.num_partitions == 3
