"""Run-directory files written atomically and verified on load: safetensors, JSON, folders.

Everything is written to a temporary name next to the target, flushed, then renamed over it, so
an interrupted run never leaves a half-written file or folder behind. Weights are loaded with
safetensors only (no pickle).

Integrity (:mod:`flora_lightning.rundir.integrity`): :func:`save_state` returns the file's sha256;
:func:`write_manifest` records sha256 and size of files in a folder's ``manifest.json``, and
every folder :func:`write_folder` builds carries one. :func:`load_state` checks a file against a
given sha256 or its folder's manifest, :func:`verify_folder` a whole folder, so silent
corruption (a flipped byte, a truncated copy) is one clear :class:`CorruptCheckpointError`
naming the file. Files and folders written before manifests existed load as before, unverified.

Fallback: ``write_folder(target, fill, keep_previous=True)`` keeps the replaced folder at
``<target>.prev``; at every moment of the swap a complete ``target`` or ``target.prev`` exists,
and :func:`newest_valid_folder` picks the newest one that verifies.

Disk full / unwritable: an ``OSError`` while writing (``ENOSPC``, ``EDQUOT``, ``EROFS``,
``EACCES``, ...) becomes a :class:`RunDirWriteError` naming the path, the reason and the fix;
the temporary files are removed and the previous file or folder stays as it was.

``torch`` is imported inside the functions that need it, so the error classes can be imported
by the command line before the heavy imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from flora_lightning.client_state.optimizer_shards import (
    flatten_optimizer_states,
    unflatten_optimizer_states,
)
from flora_lightning.rundir.integrity import (
    MANIFEST,
    CorruptCheckpointError,
    build_manifest,
    check_file,
    file_sha256,
    manifest_entry,
    newest_valid_folder,
    prev_folder,
    verify_folder,
)
from flora_lightning.rundir.write_errors import RunDirWriteError, is_write_failure, os_error_code

__all__ = [
    "CorruptCheckpointError",
    "RunDirWriteError",
    "file_sha256",
    "flatten_optimizer_states",
    "link_or_copy",
    "load_state",
    "newest_valid_folder",
    "save_state",
    "unflatten_optimizer_states",
    "verify_folder",
    "write_folder",
    "write_json",
    "write_manifest",
    "write_text",
]

if TYPE_CHECKING:
    import torch

    State = dict[str, torch.Tensor]


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a disk-full / unwritable ``OSError`` raised inside into a :class:`RunDirWriteError`."""
    try:
        yield
    except RunDirWriteError:
        raise
    except OSError as err:
        if is_write_failure(err):
            raise RunDirWriteError(path, err) from err
        raise


def _fsync_and_hash(path: Path) -> str:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _replace(tmp: Path, target: Path) -> str:
    """fsync ``tmp``, rename it over ``target``; returns its sha256."""
    digest = _fsync_and_hash(tmp)
    os.replace(tmp, target)
    return digest


def _remove(tmp: Path) -> None:
    with suppress(OSError):  # never let the cleanup hide the error that made it necessary
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)


def save_state(state: State, path: Path, metadata: dict[str, str] | None = None) -> str:
    """Save tensors as safetensors, atomically.

    Returns:
        The file's sha256 hex digest (for :func:`load_state` or a manifest).

    Raises:
        RunDirWriteError: the disk is full or the folder not writable; ``path`` is unchanged.
    """
    from safetensors import torch as safetensors_torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with _writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            try:
                safetensors_torch.save_file(tensors, tmp, metadata=metadata)
            except SafetensorError as err:  # a real full disk surfaces as this, not OSError
                code = os_error_code(err)
                if code is None:
                    raise
                raise OSError(code, os.strerror(code)) from err
            return _replace(tmp, path)
        finally:  # a failed write leaves neither a torn file nor a stray .tmp
            _remove(tmp)


def _corrupt_hint(path: Path) -> str:
    if path.parent.name == "checkpoints":
        return f"use another round's checkpoint from {path.parent}/"
    return "restore it from a copy, or start the run again in a new directory"


def load_state(path: str | Path, sha256: str | None = None) -> State:
    """Load a safetensors file (never unpickles), verifying its checksum when one is known.

    Args:
        path: a ``.safetensors`` file.
        sha256: expected digest; when None, the entry of the file's folder ``manifest.json`` is
            used if there is one (else the file is loaded unverified, as older runs are).

    Raises:
        CorruptCheckpointError: truncated, wrong checksum, or not readable as safetensors.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors checkpoints are loaded (no pickle files).")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    expected = {"sha256": sha256} if sha256 else manifest_entry(path)
    if expected:
        check_file(path, expected, _corrupt_hint(path))
    try:
        return load_file(path)
    except SafetensorError as err:
        raise CorruptCheckpointError(
            f"{path}: not a readable safetensors file ({err}); it is truncated or corrupted "
            f"(an interrupted copy, a full disk?): {_corrupt_hint(path)}."
        ) from err


def write_text(text: str, path: Path) -> str:
    """Write a text file atomically, never through a symlink; returns the file's sha256.

    The temporary file is created anew (``O_EXCL | O_NOFOLLOW``: a symlink planted at its name
    is refused, never followed) and renamed over ``path``: a symlink at ``path`` is replaced by
    the file, and what it pointed to is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with _writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)  # a stale temporary file (or a link) of an earlier crash
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            with open(os.open(tmp, flags, 0o666), "w", encoding="utf-8") as handle:
                handle.write(text)
            return _replace(tmp, path)
        finally:
            _remove(tmp)


def write_json(data: dict, path: Path) -> str:
    """Write JSON atomically (:func:`write_text`); returns the file's sha256."""
    return write_text(json.dumps(data, indent=2) + "\n", path)


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` holds ``source``'s bytes: a hard link (nothing written twice), or an atomic
    copy on filesystems without links. Later removing ``source`` leaves ``target`` intact."""
    target = Path(target)
    try:
        os.link(source, target)
        return
    except OSError:
        pass
    tmp = target.with_name(f".{target.name}.tmp")
    with _writing(target):
        try:
            shutil.copyfile(source, tmp)
            _replace(tmp, target)
        finally:
            _remove(tmp)


# ------------------------------------------------------------------ manifests
def write_manifest(folder: Path, names: Iterable[str] | None = None) -> dict[str, dict]:
    """Record sha256 and size of files in ``folder/manifest.json`` (atomically).

    Args:
        folder: the folder.
        names: files (relative to ``folder``) to (re)record; entries of other files still on
            disk are kept, entries of removed files dropped. None: every file below ``folder``.

    Returns:
        The recorded ``{name: {"sha256": ..., "size": ...}}``.
    """
    manifest = build_manifest(folder, names)
    write_json(manifest, Path(folder) / MANIFEST)
    return manifest["files"]


# ------------------------------------------------------------------ folders
def write_folder(
    target: Path,
    fill: Callable[[Path], None],
    *,
    keep_previous: bool = False,
    replace: bool = True,
) -> Path:
    """Create ``target`` by ``fill(tmp_dir)`` plus a ``manifest.json``, then swap it in.

    Args:
        target: the folder to (re)write.
        fill: writes the folder's files into the temporary folder it is given.
        keep_previous: move the replaced folder to ``<target>.prev`` (replacing an older one)
            instead of deleting it. The order (old ``.prev`` aside, ``target`` → ``.prev``, new →
            ``target``) keeps a complete ``target`` or ``.prev`` at every moment.
        replace: when False and ``target`` exists by the time the new folder is ready (another
            process built it meanwhile), keep that one and discard ours.

    Returns:
        ``target``.

    Raises:
        RunDirWriteError: disk full / unwritable; ``target`` (and ``.prev``) stay as they were.
    """
    target = Path(target)
    prev, old = prev_folder(target), target.with_name(f".{target.name}.old")
    with _writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            try:
                fill(tmp)
                write_manifest(tmp)
            except RunDirWriteError as err:  # name the file where it was going, not the tmp
                if tmp not in err.path.parents:
                    raise
                raise RunDirWriteError(target / err.path.relative_to(tmp), err.__cause__) from (
                    err.__cause__
                )
            if target.exists() and not replace:
                return target
            _remove(old)
            try:
                if target.exists():
                    if keep_previous:
                        if prev.exists():
                            os.rename(prev, old)  # target is still complete
                        os.rename(target, prev)  # prev is complete
                    else:
                        os.rename(target, old)
                os.rename(tmp, target)
            except OSError:
                if not replace and target.is_dir():  # another process won the race
                    return target
                _restore_swap(target, prev, old, keep_previous)
                raise
            _remove(old)
        finally:
            _remove(tmp)
    return target


def _restore_swap(target: Path, prev: Path, old: Path, keep_previous: bool) -> None:
    """Undo a half-done swap: the folders go back to their names before it."""
    with suppress(OSError):
        if keep_previous:
            if not target.exists() and prev.exists():
                os.rename(prev, target)
            if not prev.exists() and old.exists():
                os.rename(old, prev)
        elif not target.exists() and old.exists():
            os.rename(old, target)
