"""Disk full / unwritable at every write site of the run directory: one clear error, nothing torn.

Each case injects the ``OSError`` at the lowest-level call that write site uses, then checks the
error (type, errno, cause, one-line message naming path, reason and fix), that no temporary file
is left, and that the previous version still loads (and verifies, for folders).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from flora_lightning.rundir import checkpoint
from flora_lightning.rundir.checkpoint import (
    RunDirWriteError,
    link_or_copy,
    load_state,
    save_state,
    verify_folder,
    write_folder,
    write_json,
)

OLD, NEW = {"w": torch.arange(4.0)}, {"w": torch.full((4,), 7.0)}


def fill_with(state):
    def fill(folder: Path) -> None:
        save_state(state, folder / "optimizers.safetensors")
        write_json({"round": int(state["w"][-1])}, folder / "state.json")

    return fill


def fail_with(code: int, real, when=lambda *a, **k: True):
    """A stand-in for ``real`` raising ``OSError(code)`` when ``when(args)`` holds."""

    def fake(*args, **kwargs):
        if when(*args, **kwargs):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    return fake


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ the write sites
def state_file(tmp):
    path = tmp / "checkpoints" / "round_001.safetensors"
    save_state(OLD, path)
    return path, lambda: save_state(NEW, path), lambda: load_state(path)


def json_file(tmp):
    path = tmp / "summary.json"
    write_json({"round": 1}, path)
    return path, lambda: write_json({"round": 2}, path), lambda: json.loads(path.read_text())


def copied_file(tmp):
    source, path = tmp / "round_002.safetensors", tmp / "resume" / "global.safetensors"
    save_state(NEW, source)
    save_state(OLD, path)
    return path, lambda: link_or_copy(source, path), lambda: load_state(path)


def resume_folder(tmp, keep_previous=True):
    path = tmp / "resume"
    write_folder(path, fill_with(OLD), keep_previous=keep_previous)

    def read():
        verify_folder(path)
        return load_state(path / "optimizers.safetensors")

    return path, lambda: write_folder(path, fill_with(NEW), keep_previous=keep_previous), read


def resume_folder_no_prev(tmp):
    return resume_folder(tmp, keep_previous=False)


def partial_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\x00" * 17)  # a torn file, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def safetensors_disk_full(tensors, filename, metadata=None):
    """What safetensors really raises on a full disk (seen on a 256 KiB tmpfs): not an OSError."""
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\x00" * 17)
    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


def is_tmp_dir(src, dst):
    """The last step of a folder swap: the new folder (``.resume.XXXX``) renamed to ``resume``."""
    name = Path(src).name
    return name.startswith(".resume.") and name != ".resume.old" and Path(dst).name == "resume"


CASES = [
    # (id, site, patched object, attribute, replacement factory, errno, reason)
    ("save_state/save_file", state_file, safetensors.torch, "save_file",
     lambda real: partial_save_file, errno.ENOSPC, "no space left on device"),
    ("save_state/save_file(SafetensorError)", state_file, safetensors.torch, "save_file",
     lambda real: safetensors_disk_full, errno.ENOSPC, "no space left on device"),
    ("save_state/os.replace", state_file, checkpoint.os, "replace",
     lambda real: fail_with(errno.ENOSPC, real), errno.ENOSPC, "no space left on device"),
    ("write_json/open", json_file, checkpoint.os, "open",
     lambda real: fail_with(errno.ENOSPC, real), errno.ENOSPC, "no space left on device"),
    ("write_json/fsync", json_file, checkpoint.os, "fsync",
     lambda real: fail_with(errno.EDQUOT, real), errno.EDQUOT, "disk quota exceeded"),
    ("link_or_copy/copyfile", copied_file, shutil, "copyfile",
     lambda real: fail_with(errno.ENOSPC, real), errno.ENOSPC, "no space left on device"),
    ("write_folder/fill", resume_folder, safetensors.torch, "save_file",
     lambda real: partial_save_file, errno.ENOSPC, "no space left on device"),
    ("write_folder/manifest", resume_folder, checkpoint.os, "open",
     lambda real: fail_with(
         errno.ENOSPC, real, lambda p, *a, **k: Path(p).name == ".manifest.json.tmp"),
     errno.ENOSPC, "no space left on device"),
    ("write_folder/swap(prev)", resume_folder, checkpoint.os, "rename",
     lambda real: fail_with(errno.EROFS, real, is_tmp_dir), errno.EROFS, "read-only file system"),
    ("write_folder/swap", resume_folder_no_prev, checkpoint.os, "rename",
     lambda real: fail_with(errno.EACCES, real, is_tmp_dir), errno.EACCES, "permission denied"),
    ("write_folder/mkdtemp", resume_folder, checkpoint.tempfile, "mkdtemp",
     lambda real: fail_with(errno.EACCES, real), errno.EACCES, "permission denied"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("site", "owner", "attribute", "replacement", "code", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_write_failure_is_clear_and_keeps_the_previous_version(
    tmp_path, monkeypatch, site, owner, attribute, replacement, code, reason
):
    path, write, read = site(tmp_path)
    before = read()
    monkeypatch.setattr(owner, attribute, replacement(getattr(owner, attribute)))
    with pytest.raises(RunDirWriteError) as info:
        write()
    monkeypatch.undo()

    err = info.value
    assert isinstance(err, OSError) and err.errno == code
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == code
    message = str(err)
    # The path where the file was going (for a folder: the folder or the file in it).
    assert message.startswith(f"could not write {path}")
    assert f": {reason} ([Errno {code}]" in message and ".resume." not in message
    assert "then rerun (`--trainer.resume true`" in message and "\n" not in message
    # The previous version is intact and nothing temporary is left.
    after = read()
    if isinstance(before, dict) and "w" in before:
        assert torch.equal(after["w"], before["w"])
    else:
        assert after == before
    for folder in (path.parent, *(p for p in path.parent.iterdir() if p.is_dir())):
        assert hidden(folder) == [], folder


def test_keep_previous_survives_a_failed_swap_with_both_copies(tmp_path, monkeypatch):
    """A failed swap puts ``resume`` and ``resume.prev`` back exactly as they were."""
    path = tmp_path / "resume"
    write_folder(path, fill_with(OLD), keep_previous=True)
    write_folder(path, fill_with(NEW), keep_previous=True)
    real = checkpoint.os.rename
    monkeypatch.setattr(checkpoint.os, "rename", fail_with(errno.ENOSPC, real, is_tmp_dir))
    with pytest.raises(RunDirWriteError):
        write_folder(path, fill_with({"w": torch.zeros(4)}), keep_previous=True)
    monkeypatch.undo()
    assert torch.equal(load_state(path / "optimizers.safetensors")["w"], NEW["w"])
    assert torch.equal(
        load_state(tmp_path / "resume.prev" / "optimizers.safetensors")["w"], OLD["w"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume", "resume.prev"]


def test_other_os_errors_are_not_relabelled(tmp_path, monkeypatch):
    """Only 'the disk cannot take it' errors become RunDirWriteError; others pass unchanged."""
    path = tmp_path / "summary.json"
    monkeypatch.setattr(checkpoint.os, "open", fail_with(errno.ENAMETOOLONG, checkpoint.os.open))
    with pytest.raises(OSError) as info:
        write_json({"round": 1}, path)
    assert not isinstance(info.value, RunDirWriteError)
    assert info.value.errno == errno.ENAMETOOLONG


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (a real disk that fills up); skipped where mounting is not allowed."""
    import subprocess

    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def fill_up(folder: Path) -> Path:
    """Write a filler file until the disk is full; returns it (delete it to free space)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:  # unbuffered: nothing left to flush
        try:
            while True:
                handle.write(b"\x00" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def test_a_really_full_disk_keeps_the_last_complete_state_and_recovers(small_tmpfs):
    run_dir = small_tmpfs / "run"
    big = {"w": torch.arange(8192.0)}  # 32 KiB
    save_state(big, run_dir / "checkpoints" / "round_001.safetensors")
    write_folder(run_dir / "resume", fill_with(OLD), keep_previous=True)
    write_json({"round": 1}, run_dir / "summary.json")
    filler = fill_up(small_tmpfs)

    attempts = [
        lambda: save_state(big, run_dir / "checkpoints" / "round_002.safetensors"),
        lambda: write_folder(run_dir / "resume", fill_with(NEW), keep_previous=True),
        lambda: write_json({"round": 2, "pad": "x" * 8192}, run_dir / "summary.json"),
    ]
    for attempt in attempts:
        with pytest.raises(RunDirWriteError, match="no space left on device") as info:
            attempt()
        assert info.value.errno == errno.ENOSPC
    # Round 1's files are intact, nothing temporary is left.
    assert torch.equal(load_state(run_dir / "checkpoints" / "round_001.safetensors")["w"], big["w"])
    verify_folder(run_dir / "resume")
    assert torch.equal(load_state(run_dir / "resume" / "optimizers.safetensors")["w"], OLD["w"])
    assert json.loads((run_dir / "summary.json").read_text()) == {"round": 1}
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round_*")) == [
        "round_001.safetensors"
    ]
    assert hidden(run_dir) == [] and hidden(run_dir / "resume") == []

    filler.unlink()  # space freed: the same writes now succeed
    for attempt in attempts:
        attempt()
    assert torch.equal(load_state(run_dir / "resume" / "optimizers.safetensors")["w"], NEW["w"])
    assert torch.equal(
        load_state(run_dir / "resume.prev" / "optimizers.safetensors")["w"], OLD["w"]
    )
