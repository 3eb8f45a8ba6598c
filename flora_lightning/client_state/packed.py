"""One client's optimizer state packed into one contiguous buffer per dtype.

An optimizer's ``state_dict()["state"]`` is a dict of small tensors: Adam keeps ``step``,
``exp_avg`` and ``exp_avg_sq`` per trainable tensor, 12 tensors per client for FLoRA's default
adapters. Kept for 1,000 clients as they are, that is 12,000 allocations, each with its tensor
and allocator headers, scattered over the heap, which costs more than their payload on a small
model (4.1 KB of payload per client on the tiny CLIP). :class:`PackedState` copies them into one
buffer per dtype (one allocation per client for an all-float32 state) and gives them back as
views into it, so :class:`~flora_lightning.client_state.stores.MemoryStates` keeps what the state
holds and little more.

The views are what the optimizer loads: on the buffer's device and dtype,
``Optimizer.load_state_dict`` keeps them as they are, so a fit updates the buffer in place, as
it updated the unpacked tensors before. The state written after the fit is packed anew.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class PackedState:
    """``{param index: {slot key: tensor or value}}`` with its tensors in one buffer per dtype.

    Non-tensor values (a plain-number ``step`` of some optimizers) are kept as they are.

    Args:
        state: one client's ``optimizer.state_dict()["state"]``; its tensors are copied (to CPU).
        layouts: layouts seen before (``{layout: layout}``); an equal one is shared, not kept
            again (a layout is Python tuples, one per slot, for every client).
    """

    __slots__ = ("buffers", "layout", "values")

    def __init__(self, state: dict[int, dict[str, Any]], layouts: dict | None = None) -> None:
        sizes: dict[torch.dtype, int] = {}
        parts: dict[torch.dtype, list[torch.Tensor]] = {}
        layout, values = [], []
        for index, slots in state.items():
            for key, value in slots.items():
                if torch.is_tensor(value):
                    offset = sizes.get(value.dtype, 0)
                    layout.append((index, key, value.dtype, offset, tuple(value.shape)))
                    sizes[value.dtype] = offset + value.numel()
                    parts.setdefault(value.dtype, []).append(value.detach().reshape(-1).cpu())
                else:
                    values.append((index, key, value))
        # one copy per dtype into a buffer allocated once
        self.buffers = {dtype: torch.cat(parts[dtype]) for dtype in sizes}
        layout = tuple(layout)  # clients of one store mostly share a layout: kept once
        self.layout = layout if layouts is None else layouts.setdefault(layout, layout)
        """``(param index, slot key, dtype, offset in that dtype's buffer, shape)`` per tensor."""
        self.values = tuple(values)
        """``(param index, slot key, value)`` per non-tensor value."""

    @classmethod
    def from_buffers(cls, buffers: dict, layout, values) -> PackedState:
        """A packed state over existing ``buffers`` (not copied), e.g. read from a file."""
        packed = cls.__new__(cls)
        packed.buffers, packed.layout, packed.values = buffers, tuple(layout), tuple(values)
        for _, _, dtype, offset, shape in packed.layout:
            if dtype not in buffers:
                raise ValueError(f"packed optimizer state: no {dtype} buffer for a {dtype} slot")
            if offset + math.prod(shape) > buffers[dtype].numel():
                raise ValueError(
                    f"packed optimizer state: a {tuple(shape)} slot at offset {offset} does "
                    f"not fit its {buffers[dtype].numel()}-element {dtype} buffer"
                )
        return packed

    def unpack(self) -> dict[int, dict[str, Any]]:
        """The state as a fresh dict whose tensors are views into the buffers."""
        state: dict[int, dict[str, Any]] = {}
        for index, key, dtype, offset, shape in self.layout:
            numel = math.prod(shape)
            state.setdefault(index, {})[key] = self.buffers[dtype][offset : offset + numel].view(
                shape
            )
        for index, key, value in self.values:
            state.setdefault(index, {})[key] = value
        return state

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers (the tensors' payload)."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
