"""Tests for the per-client label counts and their plain-text table."""

from collections import Counter

import numpy as np

from flora_lightning.data.label_table import GivenPartitions, format_label_table, label_counts


def test_label_counts_equal_an_independent_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=300).tolist()  # class 6 of 7 never occurs
    partitions = [
        rng.choice(300, size=80, replace=False),
        rng.choice(300, size=50, replace=False),  # may overlap the first (few-shot overlap)
        np.array([], dtype=np.int64),  # an empty client
        np.arange(300),
    ]
    counts = label_counts(labels, partitions, num_classes=7)
    expected = [[Counter(labels[i] for i in idx)[c] for c in range(7)] for idx in partitions]
    assert counts.dtype == np.int64 and counts.shape == (4, 7)
    assert counts.tolist() == expected
    assert counts[2].sum() == 0 and counts[:, 6].sum() == 0 and counts[3].sum() == 300
    assert label_counts(labels, [], num_classes=7).shape == (0, 7)


def test_label_counts_are_flwr_datasets_counts():
    # label_counts counts with numpy; flwr-datasets' compute_counts over the same index arrays
    # (GivenPartitions) is the reference it must equal
    import datasets
    from flwr_datasets.metrics import compute_counts

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=200)
    partitions = [rng.choice(200, size=n, replace=False) for n in (30, 70, 1)]
    table = datasets.Dataset.from_dict(
        {"label": labels},
        features=datasets.Features({"label": datasets.ClassLabel(num_classes=5)}),
    )
    reference = compute_counts(GivenPartitions(table, partitions), "label")
    assert label_counts(labels, partitions, 5).tolist() == reference.to_numpy().tolist()


def test_format_label_table_rows_and_totals():
    counts = np.array([[3, 0, 1], [0, 5, 2]])
    table = format_label_table(counts, ["cat", "dog", "eel"])
    lines = table.splitlines()
    assert lines[0].split() == ["client", "total", "cat", "dog", "eel"]
    assert lines[1].split() == ["0", "4", "3", "0", "1"]
    assert lines[2].split() == ["1", "7", "0", "5", "2"]
    assert lines[3].split() == ["all", "11", "3", "5", "3"]


def test_format_label_table_summarises_many_classes():
    counts = np.zeros((2, 30), dtype=int)
    counts[0, [4, 7]] = [9, 2]
    counts[1, 20:30] = 1
    lines = format_label_table(counts, max_classes=20).splitlines()
    assert lines[0].split() == ["client", "total", "classes", "top", "classes"]
    assert lines[1].split() == ["0", "11", "2", "4:9", "7:2"]
    assert lines[2].split()[:3] == ["1", "10", "10"]
    assert lines[3].split()[:3] == ["all", "21", "12"]
