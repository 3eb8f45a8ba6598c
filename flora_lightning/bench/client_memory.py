"""The per-client state a finished :class:`~flora_lightning.federation.loop.FederatedLoop` keeps, by structure.

``flora bench --clients`` compares the peak RSS growth per client with these bytes, each read
from the structure itself (not from a formula):

- ``optimizer_state``: the clients' kept Adam states in RAM (the bytes of their packed
  buffers, one per client and dtype; 0 when they are spilled to disk with
  ``trainer.client_state_dir``);
- ``partition_indices``: each client's index array(s) into the training set;
- ``label_counts``: the per-client label-count table(s);
- ``cached_features``: each client's cached image features and labels (the test set's excluded:
  it does not grow with clients);
- ``round_records``: the per-client entries of every round's record (train loss, accepted
  clients, bytes up, ...), as Python objects (:func:`python_bytes`): they grow with rounds too.

Payload bytes only: each tensor, array or Python object also costs the allocator and the
interpreter a header, which RSS counts and these totals do not (``objects`` says how many:
buffers for the optimizer states, tensors, arrays or Python objects for the rest; a client's
cached features are two views into the one tensor all clients' features were encoded into).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

PER_CLIENT_RECORD_FIELDS = (
    "client_train_loss",
    "accepted_clients",
    "rejected_clients",
    "dropped_clients",
    "straggler_clients",
)
"""The :class:`~flora_lightning.rundir.round_record.RoundRecord` fields with one entry per client."""
PER_CLIENT_RECORD_EXTRA = ("client_bytes_up",)
"""Callback fields of a round record with one entry per client (``CommunicationLogger``)."""


def python_bytes(obj: Any) -> int:
    """``sys.getsizeof`` of ``obj`` and, for dicts, lists and tuples, of what they hold."""
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(python_bytes(k) + python_bytes(v) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        size += sum(python_bytes(v) for v in obj)
    return size


def tensor_bytes(tensor: torch.Tensor | np.ndarray) -> int:
    """Payload bytes of a tensor or array."""
    if isinstance(tensor, np.ndarray):
        return tensor.nbytes
    return tensor.numel() * tensor.element_size()


def kept_state(loop, data) -> dict[str, dict[str, int]]:
    """Bytes (and objects) of per-client state ``loop`` and ``data`` keep, by structure.

    Returns ``{structure: {"bytes": total over all clients, "objects": how many}}``, plus
    ``total``: their sum.
    """
    store = loop.local_trainer.state_store
    from flora_lightning.client_state.stores import MemoryStates

    inner = getattr(store, "inner", store)
    in_ram = isinstance(inner, MemoryStates)
    indices = list(data.client_indices) + list(data.client_test_indices)
    counts = [data.counts] + ([data.test_counts] if data.has_local_test else [])
    cache = loop.feature_cache.features if loop.feature_cache is not None else {}
    features = [t for key, pair in cache.items() if key != "test" for t in pair]
    records = [getattr(r, f) for r in loop.history for f in PER_CLIENT_RECORD_FIELDS]
    records += [r.extra[f] for r in loop.history for f in PER_CLIENT_RECORD_EXTRA if f in r.extra]
    parts = {
        "optimizer_state": {  # packed: one buffer per client and dtype
            "bytes": inner.nbytes() if in_ram else 0,
            "objects": inner.buffers() if in_ram else 0,
        },
        "partition_indices": {
            "bytes": sum(tensor_bytes(i) for i in indices),
            "objects": len(indices),
        },
        "label_counts": {"bytes": sum(tensor_bytes(c) for c in counts), "objects": len(counts)},
        "cached_features": {
            "bytes": sum(tensor_bytes(t) for t in features),
            "objects": len(features),
        },
        "round_records": {
            "bytes": sum(python_bytes(r) for r in records),
            "objects": len(records),
        },
    }
    parts["total"] = {key: sum(p[key] for p in parts.values()) for key in ("bytes", "objects")}
    return parts
