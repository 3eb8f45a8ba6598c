"""``flora_lightning.bench.client_memory``: the byte counts the clients scan states."""

from __future__ import annotations

import sys

import numpy as np
import torch

from flora_lightning.bench.client_memory import python_bytes, tensor_bytes


def test_python_bytes_adds_up_what_containers_hold():
    entries = {"3": 0.25, "7": 1.5}
    expected = sys.getsizeof(entries) + sum(
        sys.getsizeof(k) + sys.getsizeof(v) for k, v in entries.items()
    )
    assert python_bytes(entries) == expected
    assert python_bytes([entries, 3]) == sys.getsizeof([entries, 3]) + expected + sys.getsizeof(3)


def test_tensor_bytes_is_the_payload():
    assert tensor_bytes(torch.zeros(2, 64)) == 2 * 64 * 4
    assert tensor_bytes(torch.zeros(2, dtype=torch.long)) == 16
    assert tensor_bytes(np.zeros((5, 10), dtype=np.int64)) == 400
