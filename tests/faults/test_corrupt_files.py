"""Corrupt or truncated run-directory files: found by checksum, one error naming the file, and
the previous complete folder used instead."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from flora_lightning.rundir import checkpoint
from flora_lightning.rundir.checkpoint import (
    CorruptCheckpointError,
    load_state,
    newest_valid_folder,
    save_state,
    verify_folder,
    write_folder,
    write_json,
    write_manifest,
)

STATE = {"a": torch.arange(64.0), "b": torch.ones(3, 5, dtype=torch.bfloat16)}


def flip_last_byte(path: Path) -> None:
    """Silent corruption: same size, one data byte changed (still parses as safetensors)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def fill(round_: int):
    def write(folder: Path) -> None:
        save_state({"w": torch.full((8,), float(round_))}, folder / "optimizers.safetensors")
        write_json({"round": round_}, folder / "state.json")
        (folder / "sub").mkdir()
        (folder / "sub" / "adapter_config.json").write_text(json.dumps({"r": round_}))

    return write


def test_save_state_returns_the_files_sha256(tmp_path):
    import hashlib

    path = tmp_path / "round_001.safetensors"
    digest = save_state(STATE, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("damage", "how", "expected"),
    [
        (flip_last_byte, "manifest", "checksum mismatch"),
        (flip_last_byte, "sha256", "checksum mismatch"),
        (truncate, "manifest", "truncated ("),
        (truncate, "sha256", "checksum mismatch"),
    ],
)
def test_damaged_single_file_is_one_error_naming_it(tmp_path, damage, how, expected):
    path = tmp_path / "checkpoints" / "round_003.safetensors"
    digest = save_state(STATE, path)
    if how == "manifest":
        write_manifest(path.parent, [path.name])
    damage(path)
    with pytest.raises(CorruptCheckpointError) as info:
        load_state(path, sha256=digest if how == "sha256" else None)
    message = str(info.value)
    assert message.startswith(f"{path}: {expected}")
    assert f"use another round's checkpoint from {path.parent}/" in message
    assert "\n" not in message


def test_files_without_a_checksum_load_unverified(tmp_path):
    """Backward compatible: a run written before manifests loads as before (no verification)."""
    path = tmp_path / "checkpoints" / "round_001.safetensors"
    save_state(STATE, path)
    flip_last_byte(path)
    assert not torch.equal(load_state(path)["b"], STATE["b"])  # loaded, damage unnoticed


def test_write_manifest_updates_named_entries_and_drops_removed_files(tmp_path):
    for round_ in (1, 2, 3):
        save_state(
            {"w": torch.full((2,), float(round_))}, tmp_path / f"round_{round_:03d}.safetensors"
        )
        write_manifest(tmp_path, [f"round_{round_:03d}.safetensors"])
    (tmp_path / "round_001.safetensors").unlink()  # pruned (keep_last_checkpoints)
    save_state({"w": torch.zeros(2)}, tmp_path / "round_003.safetensors")  # rewritten
    files = write_manifest(tmp_path, ["round_003.safetensors"])
    assert sorted(files) == ["round_002.safetensors", "round_003.safetensors"]
    on_disk = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert on_disk == files
    assert torch.equal(load_state(tmp_path / "round_003.safetensors")["w"], torch.zeros(2))


FOLDER_DAMAGE = [
    ("flipped", lambda f: flip_last_byte(f / "optimizers.safetensors"),
     "optimizers.safetensors: checksum mismatch"),
    ("truncated", lambda f: truncate(f / "optimizers.safetensors"),
     "optimizers.safetensors: truncated ("),
    ("missing", lambda f: (f / "state.json").unlink(), "state.json: missing (listed in manifest.json)"),
    ("nested", lambda f: (f / "sub" / "adapter_config.json").write_text('{"r": 9}'),
     "sub/adapter_config.json: checksum mismatch"),
    ("grown", lambda f: (f / "state.json").write_bytes((f / "state.json").read_bytes() + b" "),
     "state.json: longer than written"),
    ("manifest", lambda f: (f / "manifest.json").write_text("{not json"),
     "manifest.json: unreadable checksum manifest"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "expected"), [c[1:] for c in FOLDER_DAMAGE], ids=[c[0] for c in FOLDER_DAMAGE]
)
def test_damaged_folder_falls_back_to_prev(tmp_path, caplog, damage, expected):
    target = tmp_path / "resume"
    write_folder(target, fill(1), keep_previous=True)
    write_folder(target, fill(2), keep_previous=True)
    assert newest_valid_folder(target) == target
    damage(target)

    with pytest.raises(CorruptCheckpointError) as info:
        verify_folder(target)
    assert str(info.value).startswith(f"{target}/{expected}")
    with caplog.at_level(logging.WARNING, logger="flora_lightning.rundir.integrity"):
        chosen = newest_valid_folder(target)
    assert chosen == tmp_path / "resume.prev"
    assert json.loads((chosen / "state.json").read_text()) == {"round": 1}
    assert expected in caplog.text and "using the previous complete copy" in caplog.text

    damage(chosen)  # both damaged: nothing usable
    assert newest_valid_folder(target) is None


def test_folders_without_a_manifest_still_verify(tmp_path):
    old = tmp_path / "resume"  # as written by an earlier version
    old.mkdir()
    save_state({"w": torch.ones(2)}, old / "optimizers.safetensors")
    verify_folder(old)
    assert newest_valid_folder(old) == old
    assert newest_valid_folder(tmp_path / "nothing") is None


class Killed(BaseException):
    """Stands for SIGKILL: no cleanup handler of ours runs (it is not an OSError)."""


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_a_kill_at_any_step_of_the_swap_leaves_a_complete_folder(tmp_path, monkeypatch, kill_at):
    """keep_previous swaps by renames; killed after any of them, a complete copy remains."""
    target = tmp_path / "resume"
    write_folder(target, fill(1), keep_previous=True)
    write_folder(target, fill(2), keep_previous=True)
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == kill_at:
            raise Killed
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(Killed):
        write_folder(target, fill(3), keep_previous=True)
    monkeypatch.undo()
    assert [c[1] for c in calls][-1] == [".resume.old", "resume.prev", "resume"][kill_at - 1]
    chosen = newest_valid_folder(target)
    assert chosen is not None
    # Before the new folder's rename completes, the newest complete copy is round 2's.
    assert json.loads((chosen / "state.json").read_text()) == {"round": 2}
    verify_folder(chosen)


def test_offline_cache_is_built_once_with_a_manifest_and_rebuilt_when_damaged(tmp_path, caplog):
    from flora_lightning.offline.cache import build_once

    builds = []

    def build(folder: Path) -> None:
        builds.append(folder)
        (folder / "model.safetensors").write_bytes(b"weights" * 100)

    target = tmp_path / "tiny-clip-v1"
    assert build_once(target, build) == target
    assert build_once(target, build) == target
    assert len(builds) == 1 and (target / "manifest.json").is_file()
    flip_last_byte(target / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="flora_lightning.offline.cache"):
        build_once(target, build)
    assert len(builds) == 2 and "model.safetensors: checksum mismatch" in caplog.text
    verify_folder(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-clip-v1"]


def test_offline_cache_race_keeps_the_first_complete_folder(tmp_path):
    from flora_lightning.offline.cache import build_once

    target = tmp_path / "digits-v1"

    def slow_build(folder: Path) -> None:  # another process finishes first, meanwhile
        write_folder(target, lambda other: (other / "who").write_text("other"))
        (folder / "who").write_text("us")

    build_once(target, slow_build)
    assert (target / "who").read_text() == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-v1"]
