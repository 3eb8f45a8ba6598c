"""Per-client optimizer-state stores: memory and disk (``trainer.client_state_dir``) agree."""

from __future__ import annotations

import pytest
import torch

from flora_lightning.callbacks import Callback
from flora_lightning.client_state.optimizer_shards import (
    flatten_optimizer_states,
    unflatten_optimizer_states,
)
from flora_lightning.client_state.stores import DiskStates, MemoryStates, client_states
from flora_lightning.federation.local_trainer import LocalTrainer
from flora_lightning.rundir.checkpoint import CorruptCheckpointError, load_state


def adam_state(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        i: {
            "step": torch.tensor(float(seed + i)),
            "exp_avg": torch.randn(3, 2, generator=generator),
            "exp_avg_sq": torch.rand(3, 2, generator=generator),
        }
        for i in range(2)
    }


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_the_mapping_interface(kind, tmp_path):
    store = client_states(None if kind == "memory" else tmp_path / "states")
    assert isinstance(store, MemoryStates if kind == "memory" else DiskStates)
    assert len(store) == 0 and 4 not in store and store.get(4) is None
    store[4], store[1] = adam_state(4), adam_state(1)
    assert sorted(store.keys()) == [1, 4] and len(store) == 2
    for client, state in store.items():
        for index, slots in adam_state(client).items():
            for key, value in slots.items():
                torch.testing.assert_close(state[index][key], value, rtol=0, atol=0)
    assert store.pop(4)[0]["step"].item() == 4.0
    assert list(store) == [1] and store.pop(4, None) is None
    store.replace({7: adam_state(7)})
    assert list(store) == [7]
    assert store.nbytes() > 0
    store.clear()
    assert len(store) == 0


def test_disk_store_keeps_one_file_per_client_and_only_paths_in_memory(tmp_path):
    store = DiskStates(tmp_path / "states")
    store[3], store[10] = adam_state(3), adam_state(10)
    files = sorted(p.name for p in (tmp_path / "states").iterdir())
    assert files == ["client_10.safetensors", "client_3.safetensors"]
    on_disk = load_state(tmp_path / "states" / "client_3.safetensors")
    assert set(on_disk) == {"3.packed.float32", "layout.0"}  # one buffer and its layout
    back = flatten_optimizer_states(unflatten_optimizer_states(on_disk))
    whole = flatten_optimizer_states({3: adam_state(3)})
    assert set(back) == set(whole) and all(torch.equal(back[k], whole[k]) for k in whole)
    assert all(isinstance(path, type(store.path(3))) for path, _ in store.files.values())
    assert not any(torch.is_tensor(v) for v in vars(store).values())
    del store[3]
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == ["client_10.safetensors"]
    # A file changed behind the store's back is refused, not loaded.
    path = tmp_path / "states" / "client_10.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="trainer.client_state_dir"):
        store[10]


def test_disk_store_ignores_files_of_an_earlier_run_and_refuses_a_file(tmp_path):
    DiskStates(tmp_path / "states")[5] = adam_state(5)
    assert len(DiskStates(tmp_path / "states")) == 0
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="trainer.client_state_dir"):
        DiskStates(tmp_path / "file")


def test_assigning_a_dict_replaces_the_trainers_store_contents(tmp_path):
    trainer = LocalTrainer(fabric=None, client_state_dir=str(tmp_path / "s"))
    store = trainer.optimizer_states
    trainer.optimizer_states = {2: adam_state(2)}
    assert trainer.optimizer_states is store and list(store) == [2]
    assert (tmp_path / "s" / "client_2.safetensors").exists()


class Snapshot(Callback):
    """Each round's flat optimizer states and what the disk store holds in RAM after it."""

    def __init__(self) -> None:
        self.flat: dict[int, dict] = {}
        self.in_memory: dict[int, list] = {}

    def on_round_end(self, loop, round, record) -> None:
        store = loop.local_trainer.optimizer_states
        self.flat[round] = {k: v.clone() for k, v in flatten_optimizer_states(store).items()}
        if isinstance(store, DiskStates):
            assert not any(torch.is_tensor(v) for v in vars(store).values())
            kept = {type(x).__name__ for entry in store.files.values() for x in entry}
            self.in_memory[round] = sorted(kept)


def test_disk_store_run_equals_memory_run_and_resumes(
    make_flora, make_datamodule, make_loop, tmp_path
):
    snaps = {"memory": Snapshot(), "disk": Snapshot()}
    state_dir = tmp_path / "client_states"
    memory = make_loop(rounds=2, run="memory", callbacks=[snaps["memory"]])
    memory.fit(make_flora(), make_datamodule())
    disk = make_loop(rounds=2, run="disk", client_state_dir=str(state_dir),
                     callbacks=[snaps["disk"]])  # fmt: skip
    disk.fit(make_flora(), make_datamodule())

    assert sorted(p.name for p in state_dir.iterdir()) == [
        f"client_{c}.safetensors" for c in range(3)
    ]
    # After a fit the store keeps (path, sha256) per client in RAM, never tensors.
    assert snaps["disk"].in_memory == {0: [], 1: ["PosixPath", "str"], 2: ["PosixPath", "str"]}
    for round_ in (1, 2):
        a, b = snaps["memory"].flat[round_], snaps["disk"].flat[round_]
        assert set(a) == set(b) and len(a) > 0
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    final = "checkpoints/round_002.safetensors"
    a, b = load_state(memory.run_dir / final), load_state(disk.run_dir / final)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    # The resume state holds every client's state, read back from the files.
    resume = flatten_optimizer_states(unflatten_optimizer_states(
        load_state(disk.run_dir / "resume" / "optimizers.safetensors")
    ))  # fmt: skip
    assert set(resume) == set(snaps["memory"].flat[2])
    for key in resume:
        torch.testing.assert_close(resume[key], snaps["memory"].flat[2][key], rtol=0, atol=0)

    # 1 round, then resumed to 2 with the disk store: equals the uninterrupted run.
    first = make_loop(rounds=1, run="resumed", client_state_dir=str(tmp_path / "other"))
    first.fit(make_flora(), make_datamodule())
    resumed = make_loop(rounds=2, run="resumed", resume=True,
                        client_state_dir=str(tmp_path / "other"))  # fmt: skip
    resumed.fit(make_flora(seed=99), make_datamodule())
    c = load_state(resumed.run_dir / final)
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=0, atol=1e-6)
    opt = flatten_optimizer_states(unflatten_optimizer_states(
        load_state(resumed.run_dir / "resume" / "optimizers.safetensors")
    ))  # fmt: skip
    assert set(opt) == set(resume)
    for key in resume:
        torch.testing.assert_close(opt[key], resume[key], rtol=0, atol=1e-6)


def test_optimizer_state_shards_bound_their_bytes_and_keep_every_client():
    from flora_lightning.client_state.optimizer_shards import optimizer_state_shards

    states = {c: {0: {"exp_avg": torch.full((c + 1, 4), float(c))}} for c in range(5)}
    whole = flatten_optimizer_states(states)
    for max_bytes, sizes in ((10**9, [5]), (48, [2, 1, 1, 1]), (1, [1, 1, 1, 1, 1])):
        for source in (states, MemoryStates(states)):  # a plain mapping, or packed as kept
            shards = list(optimizer_state_shards(source, max_bytes))
            # Shard n: one buffer per client (a client's bytes: 16 (c + 1)) and layout.n.
            assert [len(s) - 1 for s in shards] == sizes
            assert [f"layout.{n}" in s for n, s in enumerate(shards)] == [True] * len(sizes)
            buffers = [[t for k, t in s.items() if ".packed." in k] for s in shards]
            assert all(len(b) == 1 or sum(t.numel() * 4 for t in b) <= max_bytes
                       for b in buffers)  # fmt: skip
            merged = {k: v for s in shards for k, v in s.items()}
            back = flatten_optimizer_states(unflatten_optimizer_states(merged))
            assert list(back) == list(whole)
            assert all(torch.equal(back[k], whole[k]) for k in whole)
    assert list(optimizer_state_shards({})) == [{}]  # no client yet: one empty shard


def test_packed_state_keeps_every_slot_in_one_buffer_per_dtype():
    from flora_lightning.client_state.packed import PackedState

    state = {
        0: {
            "step": torch.tensor(3.0),
            "exp_avg": torch.randn(4, 3),
            "exp_avg_sq": torch.rand(4, 3),
        },
        2: {"step": 5, "momentum": torch.randn(7, dtype=torch.float64)},
    }
    packed = PackedState(state)
    assert set(packed.buffers) == {torch.float32, torch.float64}
    assert packed.nbytes == (1 + 12 + 12) * 4 + 7 * 8
    out = packed.unpack()
    assert out[2]["step"] == 5
    for index, slots in state.items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                assert torch.equal(out[index][key], value) and out[index][key].shape == value.shape
                assert out[index][key].untyped_storage().data_ptr() == (
                    packed.buffers[value.dtype].untyped_storage().data_ptr()
                )  # a view into the buffer, not a copy
    state[0]["exp_avg"].add_(1)  # the packed state is a copy: the caller's tensors are its own
    assert not torch.equal(packed.unpack()[0]["exp_avg"], state[0]["exp_avg"])


def test_memory_store_loads_into_adam_and_continues_identically():
    """Adam loaded from the packed views (updated in place) steps exactly as the original."""
    torch.manual_seed(0)
    params_a = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_a = torch.optim.Adam(params_a, lr=0.1)
    for _ in range(2):
        sum((p**2).sum() for p in params_a).backward()
        opt_a.step()
    for a, b in zip(params_a, params_b, strict=True):
        b.data.copy_(a.data)
    store = MemoryStates()
    store[0] = opt_a.state_dict()["state"]
    opt_b = torch.optim.Adam(params_b, lr=0.1)
    saved = opt_b.state_dict()
    saved["state"] = store[0]
    opt_b.load_state_dict(saved)
    for params, opt in ((params_a, opt_a), (params_b, opt_b)):
        opt.zero_grad()
        sum((p**2).sum() for p in params).backward()
        opt.step()
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)
    assert store.buffers() == 1 and float(store[0][0]["step"]) == 3.0  # updated in place


def test_a_packed_layout_that_does_not_fit_its_buffer_is_refused():
    from flora_lightning.client_state.optimizer_shards import optimizer_state_shards

    (shard,) = optimizer_state_shards({3: {0: {"exp_avg": torch.ones(2, 4)}}})
    shard["3.packed.float32"] = torch.ones(5)  # a damaged file: 5 of the 8 elements
    with pytest.raises(ValueError, match="does not fit its 5-element"):
        unflatten_optimizer_states(shard)


def test_both_stores_hand_the_shards_their_packed_state(tmp_path):
    """The resume shards take each client's packed state as the store holds it (memory: the
    kept buffer; disk: the buffer the file was read into), without repacking."""
    whole = flatten_optimizer_states({2: adam_state(2)})
    for store in (MemoryStates(), DiskStates(tmp_path / "s")):
        store[2] = adam_state(2)
        packed = store.packed(2)
        assert len(packed.buffers) == 1  # all of Adam's fp32 slots in one buffer
        back = flatten_optimizer_states({2: packed.unpack()})
        assert set(back) == set(whole) and all(torch.equal(back[k], whole[k]) for k in whole)
    assert store.packed(2) is not store.packed(2)  # disk: read afresh each time
    memory = MemoryStates({2: adam_state(2)})
    assert memory.packed(2) is memory.packed(2)  # memory: the kept one


def test_disk_store_never_writes_through_a_symlink(tmp_path):
    """A symlink planted at a client's file (or its temporary name) is replaced, not followed."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious")
    folder = tmp_path / "states"
    store = DiskStates(folder)
    (folder / "client_4.safetensors").symlink_to(outside)
    (folder / ".client_4.safetensors.tmp").symlink_to(tmp_path / "planted")
    store[4] = adam_state(4)
    assert outside.read_bytes() == b"precious" and not (tmp_path / "planted").exists()
    assert not store.path(4).is_symlink()
    back = flatten_optimizer_states({4: store[4]})
    whole = flatten_optimizer_states({4: adam_state(4)})
    assert all(torch.equal(back[k], whole[k]) for k in whole)
