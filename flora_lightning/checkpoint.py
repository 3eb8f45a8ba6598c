"""Run-directory files written atomically: safetensors states, JSON, folders.

Everything is written to a temporary name in the same folder, flushed, then renamed over the
target, so an interrupted run never leaves a half-written checkpoint behind. Weights are loaded
with safetensors only (no pickle).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

State = dict[str, torch.Tensor]


def _replace(tmp: Path, target: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)


def save_state(state: State, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata=metadata
        )
        _replace(tmp, path)
    finally:  # a failed write (disk full, ...) leaves neither a torn file nor a stray .tmp
        tmp.unlink(missing_ok=True)


class CorruptCheckpointError(ValueError):
    """A checkpoint file exists but cannot be read as safetensors (truncated, corrupted)."""


def load_state(path: str | Path) -> State:
    """Load a safetensors file (never unpickles)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors checkpoints are loaded (no pickle files).")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return load_file(path)
    except SafetensorError as err:
        hint = (
            f"use another round's checkpoint from {path.parent}/"
            if path.parent.name == "checkpoints"
            else "restore it from a copy, or start the run again in a new directory"
        )
        raise CorruptCheckpointError(
            f"{path}: not a readable safetensors file ({err}); it is truncated or corrupted "
            f"(an interrupted copy, a full disk?): {hint}."
        ) from err


def write_json(data: dict, path: Path) -> None:
    """Write JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` holds ``source``'s bytes: a hard link (nothing written twice), or a copy on
    filesystems without links. Later removing ``source`` leaves ``target`` intact."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_folder(target: Path, fill: Callable[[Path], None]) -> None:
    """Create ``target`` by ``fill(tmp_dir)`` then swap it in, replacing any older version."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def flatten_optimizer_states(states: dict[int, dict]) -> State:
    """Per-client ``optimizer.state_dict()['state']`` → flat ``"client.param.key"`` tensors."""
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
