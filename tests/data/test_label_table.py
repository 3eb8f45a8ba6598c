"""Tests for the plain-text per-client label table."""

import numpy as np

from flora_lightning.data.label_table import format_label_table


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
