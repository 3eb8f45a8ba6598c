"""Per-client optimizer states as flat tensors (for safetensors files and Flower records).

Two layouts, both read by :func:`unflatten_optimizer_states`:

- one tensor per slot, ``"<client>.<param index>.<slot key>"`` (:func:`flatten_optimizer_states`:
  Flower records; resume folders written before packing);
- packed (:func:`pack_states`: the resume state's shards, :func:`optimizer_state_shards`, and
  each :class:`~flora_lightning.client_state.stores.DiskStates` file): one buffer per client and
  dtype, ``"<client>.packed.<dtype>"``, and per shard ``"layout.<shard>"``, a uint8 tensor
  holding the JSON of where each slot lies in its client's buffers. 1,000 clients are then
  about 1,000 tensors to serialise, not one per slot (each small tensor serialised costs the
  allocator transient objects, which add up in a resume write's peak memory).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from flora_lightning.client_state.packed import PackedState

if TYPE_CHECKING:
    import torch

    State = dict[str, torch.Tensor]

SHARD_BYTES = 16 * 2**20
"""Tensor bytes per shard of the resume state's optimizer states (one client may exceed it).
A resume write holds about one shard's serialised copy at a time (and, with the disk store, the
shard's states read back): 16 MB keeps that transient small against a ViT-B/32 process
(~1.5 GB) while 1,000 ViT-B/32 FLoRA clients (197 KB each) still make only 12 files."""


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
    """Inverse of :func:`flatten_optimizer_states` and of the merged shards of
    :func:`optimizer_state_shards` (a packed client's tensors are views into its buffers)."""
    states: dict[int, dict] = {c: p.unpack() for c, p in packed_clients(flat).items()}
    for name, value in flat.items():
        client, _, rest = name.partition(".")
        index, _, key = rest.partition(".")
        if client != "layout" and index != "packed":
            states.setdefault(int(client), {}).setdefault(int(index), {})[key] = value
    return states


def packed_clients(flat: State) -> dict[int, PackedState]:
    """The packed clients of ``flat`` (every ``"layout.<n>"`` it holds), over its buffers
    (not copied)."""
    import torch

    packed = {}
    for name in (n for n in flat if n.startswith("layout.")):
        for client, entry in json.loads(bytes(flat[name].numpy())).items():
            dtypes = {dtype for _, _, dtype, _, _ in entry["tensors"]}
            packed[int(client)] = PackedState.from_buffers(
                {getattr(torch, d): flat[f"{client}.packed.{d}"] for d in dtypes},
                [(i, k, getattr(torch, d), o, tuple(s)) for i, k, d, o, s in entry["tensors"]],
                [tuple(v) for v in entry["values"]],
            )
    return packed


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _packed_entry(client: int, packed: PackedState) -> tuple[State, dict]:
    """One client's buffers (named) and its layout entry (JSON-able)."""
    tensors = {f"{client}.packed.{_dtype_name(d)}": b for d, b in packed.buffers.items()}
    entry = {
        "tensors": [[i, k, _dtype_name(d), o, list(s)] for i, k, d, o, s in packed.layout],
        "values": [list(v) for v in packed.values],
    }
    return tensors, entry


def pack_states(packed: Mapping[int, PackedState], number: int = 0) -> State:
    """Flat tensors of packed clients: their buffers and ``"layout.<number>"`` (a resume
    shard, or one client's :class:`~flora_lightning.client_state.stores.DiskStates` file)."""
    import torch

    flat, layout = {}, {}
    for client, state in packed.items():
        tensors, layout[str(client)] = _packed_entry(client, state)
        flat.update(tensors)
    text = bytearray(json.dumps(layout).encode())
    return {**flat, f"layout.{number}": torch.frombuffer(text, dtype=torch.uint8)}


def optimizer_state_shards(
    states: Mapping[int, dict], max_bytes: int | None = None
) -> Iterator[State]:
    """The packed states of consecutive clients in shards of at most ``max_bytes`` (default
    :data:`SHARD_BYTES`) tensor bytes (a larger client is a shard of its own); at least one
    shard, maybe empty. Shard ``n`` holds its clients' buffers and ``"layout.<n>"``.

    Reading ``states`` client by client (``ClientStates.packed``: a
    :class:`~flora_lightning.client_state.stores.MemoryStates` gives the buffers it keeps, a
    :class:`~flora_lightning.client_state.stores.DiskStates` the buffer it reads a file into) and
    writing shard by shard, the resume state costs one shard's serialised copy in RAM (and,
    from disk, the shard read back), not a copy of every client's state.
    """
    max_bytes = SHARD_BYTES if max_bytes is None else max_bytes
    packed_of = getattr(states, "packed", None)  # a ClientStates: its own packing, no copy
    shard, size, number = {}, 0, 0
    for client in states:
        packed = packed_of(client) if packed_of else PackedState(states[client])
        if shard and size + packed.nbytes > max_bytes:
            yield pack_states(shard, number)
            shard, size, number = {}, 0, number + 1
        shard[client] = packed
        size += packed.nbytes
    yield pack_states(shard, number) if shard else {}
