"""Flower ArrayRecords and flora's torch states, and what they weigh on the wire."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord


def array_record_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays as NumPy holds them: the sum of ``ndarray.nbytes``."""
    return sum(array.numpy().nbytes for array in record.values())


def to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord → writable torch tensors (names kept)."""
    return {name: torch.from_numpy(np.array(a.numpy(), copy=True)) for name, a in record.items()}
