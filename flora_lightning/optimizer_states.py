"""Per-client optimizer states as flat tensors (for safetensors files and Flower records)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    State = dict[str, torch.Tensor]

SHARD_BYTES = 64 * 2**20
"""Tensor bytes per shard of the resume state's optimizer states (one client may exceed it)."""


def flatten_optimizer_states(states: dict[int, dict]) -> State:
    """Per-client ``optimizer.state_dict()['state']`` → flat ``"client.param.key"`` tensors."""
    import torch

    flat = {}
    for client, state in states.items():
        for index, slots in state.items():
            for key, value in slots.items():
                flat[f"{client}.{index}.{key}"] = torch.as_tensor(value)
    return flat


def unflatten_optimizer_states(flat: State) -> dict[int, dict]:
    """Inverse of :func:`flatten_optimizer_states`."""
    states: dict[int, dict] = {}
    for name, value in flat.items():
        client, index, key = name.split(".", 2)
        states.setdefault(int(client), {}).setdefault(int(index), {})[key] = value
    return states


def optimizer_state_shards(
    states: Mapping[int, dict], max_bytes: int | None = None
) -> Iterator[State]:
    """The flat states of consecutive clients in shards of at most ``max_bytes`` (default
    :data:`SHARD_BYTES`) tensor bytes (a larger client is a shard of its own); at least one
    shard, maybe empty.

    Reading ``states`` client by client (a :class:`~flora_lightning.client_states.DiskStates`
    loads one file per client) and writing shard by shard, the resume state costs one shard's
    serialised copy in RAM, not a copy of every client's state.
    """
    max_bytes = SHARD_BYTES if max_bytes is None else max_bytes
    shard: dict = {}
    size = 0
    for client, state in states.items():
        flat = flatten_optimizer_states({client: state})
        nbytes = sum(t.numel() * t.element_size() for t in flat.values())
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard.update(flat)
        size += nbytes
    yield shard
