"""Per-client optimizer states as flat tensors (for safetensors files and Flower records)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    State = dict[str, torch.Tensor]


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
