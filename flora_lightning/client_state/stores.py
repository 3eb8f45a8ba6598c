"""Where each client's optimizer state lives between its fits: in memory, or spilled to disk.

:class:`~flora_lightning.federation.local_trainer.LocalTrainer` keeps ``client id -> optimizer.state_dict()
["state"]`` across rounds (the paper's per-client Adam state). With few clients, or small
adapters, RAM is enough (:class:`MemoryStates`, each client's state packed in one buffer per
dtype). With many clients or a large
trainable part (FedFFT keeps ~1.2 GB of Adam moments per client at ViT-B/32) the states no
longer fit; :class:`DiskStates` (``trainer.client_state_dir``) writes one safetensors file per
client and reads it back at that client's next fit, so RAM holds only the training client's.

Both are ``MutableMapping[int, dict]`` with the same contents, so the trainer, the resume state
(:func:`~flora_lightning.client_state.optimizer_shards.optimizer_state_shards` reads every client's back,
packed: :meth:`ClientStates.packed`) and the Flower ClientApp use them alike. :meth:`ClientStates.replace` swaps the whole contents
(what ``trainer.optimizer_states = {...}`` does on resume).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

from flora_lightning.client_state.optimizer_shards import (
    flatten_optimizer_states,
    pack_states,
    packed_clients,
    unflatten_optimizer_states,
)
from flora_lightning.client_state.packed import PackedState
from flora_lightning.rundir.checkpoint import CorruptCheckpointError


class ClientStates(MutableMapping):
    """Client id -> its optimizer's ``state_dict()["state"]``; subclasses choose the storage.

    A write copies the state's tensors (the caller may go on changing its own); a read returns
    a fresh dict.
    """

    def replace(self, states: Mapping[int, dict]) -> None:
        """Hold exactly ``states`` (every earlier client's state is dropped)."""
        self.clear()
        for client, state in states.items():
            self[client] = state

    def packed(self, client: int) -> PackedState:
        """``client``'s state packed into one buffer per dtype (for the resume state's shards)."""
        return PackedState(self[client])

    def nbytes(self) -> int:
        """Bytes of every tensor kept, over all clients (what the store costs, RAM or disk)."""
        return sum(t.numel() * t.element_size() for t in flatten_optimizer_states(self).values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(clients={sorted(self)})"


class MemoryStates(ClientStates):
    """Every client's state in RAM (tensors on CPU), each packed into one buffer per dtype.

    A write copies the state into a :class:`~flora_lightning.client_state.packed.PackedState`; a read
    returns a fresh dict of views into its buffers (an optimizer loading them updates them in
    place during the fit).
    """

    def __init__(self, states: Mapping[int, dict] | None = None) -> None:
        self.states: dict[int, PackedState] = {}
        self.layouts: dict[tuple, tuple] = {}
        """The distinct layouts of the kept states (clients of one method mostly share one)."""
        for client, state in (states or {}).items():
            self[client] = state

    def __getitem__(self, client: int) -> dict:
        return self.states[client].unpack()

    def __setitem__(self, client: int, state: dict) -> None:
        self.states[client] = PackedState(state, self.layouts)

    def packed(self, client: int) -> PackedState:
        return self.states[client]  # as kept: the shards serialise its buffers, no copy

    def __delitem__(self, client: int) -> None:
        del self.states[client]

    def __iter__(self) -> Iterator[int]:
        return iter(self.states)

    def __len__(self) -> int:
        return len(self.states)

    def nbytes(self) -> int:
        return sum(packed.nbytes for packed in self.states.values())

    def buffers(self) -> int:
        """How many buffers (allocations) hold the tensors, over all clients."""
        return sum(len(packed.buffers) for packed in self.states.values())


class DiskStates(ClientStates):
    """One ``client_<id>.safetensors`` file per client under ``folder``; RAM keeps only paths.

    A file holds the client's state packed (:func:`~flora_lightning.client_state.optimizer_shards.
    pack_states`: one buffer per dtype and its layout), like a resume shard of one client.

    A read loads the file (checked against the sha256 written with it) and returns a fresh
    state; a write replaces the file atomically (temporary file, then rename) but is not
    fsynced, unlike checkpoints (:func:`~flora_lightning.rundir.checkpoint.save_state`): the files are
    scratch space, rebuilt from the resume state after a crash, and an fsync per client fit
    costs milliseconds per client. The store starts empty and knows only the files
    it wrote: files of an earlier run in the folder are never read (a resumed run gets its
    clients' states from the resume state, as with :class:`MemoryStates`) and are overwritten
    when their client trains. Two runs at once must not share one ``trainer.client_state_dir``.

    Raises:
        ValueError: ``folder`` exists and is not a directory (names ``trainer.client_state_dir``).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(
                f"trainer.client_state_dir={str(folder)!r} is a file; give a folder (it is "
                "created when missing) or null to keep the clients' optimizer states in memory."
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[int, tuple[Path, str]] = {}
        """Client id -> (its file, the file's sha256): all this store keeps in memory."""

    def path(self, client: int) -> Path:
        """The file of ``client``'s state."""
        return self.folder / f"client_{int(client)}.safetensors"

    def __getitem__(self, client: int) -> dict:
        return unflatten_optimizer_states(self._read(client)).get(int(client), {})

    def packed(self, client: int) -> PackedState:
        return packed_clients(self._read(client))[int(client)]  # the file's buffer, no copy

    def _read(self, client: int) -> dict:
        """The flat tensors of ``client``'s file, checked against its sha256."""
        from safetensors.torch import load

        path, sha256 = self.files[client]
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptCheckpointError(
                f"{path}: client {client}'s optimizer state changed on disk since it was written "
                "(another run using the same trainer.client_state_dir?); give each run its own "
                "folder."
            )
        return load(data)

    def __setitem__(self, client: int, state: dict) -> None:
        from safetensors.torch import save

        # Packed: one buffer and its layout, not a tensor per slot (safetensors' cost is per
        # tensor: 72 slots of a ViT-B/32 FLoRA client took ~1 ms to serialise)
        data = save(pack_states({client: PackedState(state)}))
        path = self.path(client)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        # created anew, never through a symlink planted at its name (O_EXCL | O_NOFOLLOW)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with open(os.open(tmp, flags, 0o666), "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
        self.files[int(client)] = (path, hashlib.sha256(data).hexdigest())

    def __delitem__(self, client: int) -> None:
        path, _ = self.files.pop(client)
        path.unlink(missing_ok=True)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, client: object) -> bool:
        return client in self.files

    def nbytes(self) -> int:
        """Bytes on disk over all clients' files (headers included)."""
        return sum(path.stat().st_size for path, _ in self.files.values())


def client_states(folder: str | Path | None) -> ClientStates:
    """The store ``trainer.client_state_dir`` asks for: on disk under ``folder``, or in memory
    when None."""
    return MemoryStates() if folder is None else DiskStates(folder)
