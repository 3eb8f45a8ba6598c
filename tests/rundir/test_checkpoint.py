"""Run-directory files: safetensors states, JSON and folders, written atomically."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from flora_lightning.rundir import checkpoint
from flora_lightning.rundir.checkpoint import (
    flatten_optimizer_states,
    load_state,
    save_state,
    unflatten_optimizer_states,
    write_folder,
    write_json,
)


def sample_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "clip.text.lora_A.weight": torch.randn(2, 64, generator=gen),
        "clip.text.lora_B.weight": torch.randn(64, 2, generator=gen),
        "half": torch.randn(5, generator=gen).to(torch.bfloat16),
        "steps": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "scalar": torch.tensor(3.5),
    }


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_save_load_roundtrip_is_exact(tmp_path):
    state = sample_state()
    # Non-contiguous input (a transposed view) is saved as its values.
    state["transposed"] = torch.randn(3, 4).T
    path = tmp_path / "sub" / "round_001.safetensors"
    save_state(state, path, metadata={"round": "1", "method": "FLoRA"})
    loaded = load_state(path)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype
        assert loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"round": "1", "method": "FLoRA"}
    assert leftovers(path.parent) == []


def test_save_does_not_alias_live_tensors(tmp_path):
    state = {"w": torch.zeros(3)}
    path = tmp_path / "w.safetensors"
    save_state(state, path)
    state["w"].add_(1.0)
    assert torch.equal(load_state(path)["w"], torch.zeros(3))


def test_overwrite_replaces_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "state.safetensors"
    for seed in range(3):
        save_state(sample_state(seed), path)
    assert torch.equal(
        load_state(path)["clip.text.lora_A.weight"], sample_state(2)["clip.text.lora_A.weight"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]


def test_failing_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "round_002.safetensors"
    save_state(sample_state(0), path)
    before = path.read_bytes()

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:  # a partial file, then the disk "fills up"
            handle.write(b"\x00" * 17)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(OSError, match="No space left"):
        save_state(sample_state(1), path)
    assert path.read_bytes() == before
    assert torch.equal(load_state(path)["half"], sample_state(0)["half"])
    assert leftovers(tmp_path) == []


def test_failing_json_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json({"round": 1}, path)

    def crash(handle):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    with pytest.raises(OSError, match="I/O error"):
        write_json({"round": 2}, path)
    assert json.loads(path.read_text()) == {"round": 1}
    assert leftovers(tmp_path) == []


def test_write_folder_swaps_and_failure_keeps_old(tmp_path):
    target = tmp_path / "final"

    def fill(text):
        def write(folder):
            (folder / "a.txt").write_text(text)

        return write

    write_folder(target, fill("one"))
    write_folder(target, fill("two"))
    assert (target / "a.txt").read_text() == "two"
    assert leftovers(tmp_path) == []

    def broken(folder):
        (folder / "a.txt").write_text("three")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        write_folder(target, broken)
    assert (target / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.mark.parametrize("name", ["model.pt", "model.bin", "model.ckpt", "model"])
def test_load_refuses_non_safetensors(tmp_path, name):
    path = tmp_path / name
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"only \.safetensors checkpoints are loaded"):
        load_state(path)


def test_load_missing_file_names_it(tmp_path):
    path = tmp_path / "round_404.safetensors"
    with pytest.raises(FileNotFoundError, match="round_404.safetensors"):
        load_state(path)


def adam_after_steps(params, steps: int) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(params, lr=0.1, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    for step in range(steps):
        loss = sum(((p - step) ** 2).sum() for p in params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_optimizer_state_flatten_roundtrip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    live = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    states = {
        0: adam_after_steps(live, 3).state_dict()["state"],
        7: adam_after_steps([torch.nn.Parameter(torch.ones(2))], 1).state_dict()["state"],
    }
    flat = flatten_optimizer_states(states)
    assert set(flat) == {
        f"{c}.{i}.{k}"
        for c, i in ((0, 0), (0, 1), (7, 0))
        for k in ("step", "exp_avg", "exp_avg_sq")
    }
    save_state(flat, tmp_path / "optimizers.safetensors")
    restored = unflatten_optimizer_states(load_state(tmp_path / "optimizers.safetensors"))
    assert set(restored) == {0, 7}
    assert set(restored[0]) == {0, 1}
    for client, state in states.items():
        for index, slots in state.items():
            assert set(restored[client][index]) == set(slots)
            for key, value in slots.items():
                assert torch.equal(restored[client][index][key], torch.as_tensor(value))


def test_restored_optimizer_state_continues_identically(tmp_path):
    """Adam resumed from the flattened state takes exactly the step the original takes."""
    torch.manual_seed(0)
    init = [torch.randn(4, 3), torch.randn(5)]
    params_a = [torch.nn.Parameter(t.clone()) for t in init]
    optimizer_a = adam_after_steps(params_a, 3)
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    path = tmp_path / "opt.safetensors"
    save_state(flatten_optimizer_states({0: optimizer_a.state_dict()["state"]}), path)

    optimizer_b = torch.optim.Adam(params_b, lr=0.1, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    saved = optimizer_b.state_dict()
    saved["state"] = unflatten_optimizer_states(load_state(path))[0]
    optimizer_b.load_state_dict(saved)
    for params, optimizer in ((params_a, optimizer_a), (params_b, optimizer_b)):
        sum(((p - 3) ** 2).sum() for p in params).backward()
        optimizer.step()
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)
    assert float(optimizer_b.state_dict()["state"][0]["step"]) == 4.0


def test_flatten_of_nothing_is_empty(tmp_path):
    assert flatten_optimizer_states({}) == {}
    save_state({}, tmp_path / "empty.safetensors")
    assert unflatten_optimizer_states(load_state(tmp_path / "empty.safetensors")) == {}


def test_safetensors_file_is_not_pickle(tmp_path):
    path = tmp_path / "x.safetensors"
    save_state({"w": torch.ones(2)}, path)
    assert torch.equal(safetensors.torch.load_file(path)["w"], torch.ones(2))
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert json.loads(path.read_bytes()[8 : 8 + header_len])["w"]["shape"] == [2]


def test_link_or_copy_survives_the_source_and_falls_back_to_a_copy(tmp_path, monkeypatch):
    source = tmp_path / "round_001.safetensors"
    save_state({"w": torch.arange(4.0)}, source)
    checkpoint.link_or_copy(source, tmp_path / "linked.safetensors")
    assert (tmp_path / "linked.safetensors").stat().st_ino == source.stat().st_ino

    def no_links(src, dst):
        raise OSError("links not supported")

    monkeypatch.setattr(checkpoint.os, "link", no_links)
    checkpoint.link_or_copy(source, tmp_path / "copied.safetensors")
    source.unlink()
    for name in ("linked", "copied"):
        assert torch.equal(load_state(tmp_path / f"{name}.safetensors")["w"], torch.arange(4.0))


@pytest.mark.parametrize(
    ("folder", "damage", "hint"),
    [
        ("checkpoints", lambda b: b[: len(b) // 2], "use another round's checkpoint from"),
        ("checkpoints", lambda b: b[:7], "use another round's checkpoint from"),
        ("resume", lambda b: b"\x00" * len(b), "restore it from a copy"),
    ],
    ids=["truncated", "header-only", "zeroed"],
)
def test_corrupt_file_is_one_clear_error_naming_it(tmp_path, folder, damage, hint):
    from flora_lightning.rundir.checkpoint import CorruptCheckpointError

    path = tmp_path / folder / "round_002.safetensors"
    save_state(sample_state(0), path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptCheckpointError) as err:
        load_state(path)
    message = str(err.value)
    assert isinstance(err.value, ValueError)  # `flora` prints it as one line, exit code 1
    assert message.startswith(f"{path}: not a readable safetensors file")
    assert "truncated or corrupted" in message and hint in message
    assert "\n" not in message


def test_flora_test_on_a_truncated_checkpoint_exits_1_with_one_line(
    tmp_path, offline_assets, monkeypatch, capsys
):
    from flora_lightning import cli

    path = tmp_path / "checkpoints" / "round_001.safetensors"
    save_state({"w": torch.zeros(4)}, path)
    path.write_bytes(path.read_bytes()[:20])
    args = ["flora", "test", "--config", "configs/quickstart.yaml", "--ckpt_path", str(path)]
    monkeypatch.setattr("sys.argv", [*args, "--trainer.default_root_dir", str(tmp_path / "t")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1  # a damaged file, not a wrong argument: a runtime error
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"flora: error: {path}: not a readable safetensors file")
