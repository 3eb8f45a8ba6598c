"""Tests for the local test split: no local test row is another client's training row."""

from __future__ import annotations

import numpy as np
import pytest

from flora_lightning.data.partition import PartitionConfig, partition_indices
from flora_lightning.data.splits import split_local_tests

# 10 classes x 100 rows; 5 clients draw 8 shots of each class independently (the released
# IID few-shot split): a row is another client's with probability 1 - 0.92^4 = 0.28.
LABELS = np.repeat(np.arange(10), 100)
OVERLAP = PartitionConfig(kind="fewshot", num_clients=5, shots=8, shots_overlap=True, seed=3)


def own_rows(partitions: list[np.ndarray], client: int) -> set[int]:
    """The client's rows held by no other client (plain Python sets)."""
    others = set()
    for other, rows in enumerate(partitions):
        if other != client:
            others |= set(rows.tolist())
    return set(partitions[client].tolist()) - others


def test_local_test_rows_are_no_other_clients_training_rows():
    partitions = partition_indices(LABELS, 10, OVERLAP)
    shared = [set(partitions[c].tolist()) - own_rows(partitions, c) for c in range(5)]
    assert all(len(s) > 5 for s in shared)  # the partitions do overlap
    train, test = split_local_tests(partitions, 0.25, seed=3)
    for client in range(5):
        others_train = set().union(*(set(train[d].tolist()) for d in range(5) if d != client))
        assert not set(test[client].tolist()) & others_train
        # nor in any other partition at all, and the client still covers its partition
        assert set(test[client].tolist()) <= own_rows(partitions, client)
        assert not set(train[client].tolist()) & set(test[client].tolist())
        together = np.sort(np.concatenate([train[client], test[client]]))
        assert np.array_equal(together, partitions[client])
        # int(f * m) of its m own rows; shared rows all stay training rows
        assert len(test[client]) == int(0.25 * len(own_rows(partitions, client)))
        assert shared[client] <= set(train[client].tolist())


def test_disjoint_partitions_get_a_plain_seeded_draw():
    partitions = partition_indices(LABELS, 10, PartitionConfig(kind="dirichlet", num_clients=4))
    train, test = split_local_tests(partitions, 0.3, seed=42)
    for client, rows in enumerate(partitions):
        rng = np.random.default_rng([42, client, 7])
        positions = np.sort(rng.choice(len(rows), size=int(0.3 * len(rows)), replace=False))
        assert np.array_equal(test[client], rows[positions])
        assert np.array_equal(train[client], np.delete(rows, positions))


def test_a_client_with_only_shared_rows_is_named():
    partitions = [np.array([0, 1, 2]), np.array([0, 1, 2, 3, 4, 5])]
    with pytest.raises(ValueError) as err:
        split_local_tests(partitions, 0.5, seed=0)
    message = str(err.value)
    assert message.startswith(
        "data.local_test_fraction=0.5 leaves client 0 with no local test sample: only 0 of "
        "its 3 samples are held by no other client"
    )
    assert "set data.partition.shots_overlap=false (disjoint shots)" in message
    assert "1/0" not in message


def test_a_client_with_too_few_own_rows_is_told_the_fraction_needed():
    partitions = [np.arange(6), np.array([0, 1, 2, 6, 7])]  # client 0 alone holds 3, 4, 5
    with pytest.raises(
        ValueError,
        match=r"only 3 of its 6 samples .*; raise data\.local_test_fraction to >= 1/3, ",
    ):
        split_local_tests(partitions, 0.3, seed=0)
