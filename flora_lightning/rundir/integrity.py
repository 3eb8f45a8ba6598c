"""Integrity of run-directory files: sha256 manifests, verification, the fallback folder.

A folder's ``manifest.json`` records the sha256 and size of its files (written by
:func:`flora_lightning.rundir.checkpoint.write_manifest` and by every
:func:`~flora_lightning.rundir.checkpoint.write_folder`). :func:`verify_folder` checks a folder against
it, :func:`check_file` one file; :func:`newest_valid_folder` picks ``target`` or, when that is
damaged, the previous complete copy ``<target>.prev``. Folders without a manifest (written
before manifests existed) pass unverified, unless the caller requires one
(``require_manifest``: the resume state, unless ``trainer.resume_without_manifest``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
"""Name of the checksum manifest inside a folder."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file or folder exists but is unreadable, truncated or fails its checksum."""


class MissingManifestError(CorruptCheckpointError):
    """A folder required to carry a checksum manifest has none: nothing says it is whole."""


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def build_manifest(folder: Path, names: Iterable[str] | None = None) -> dict:
    """The content of ``folder/manifest.json`` after (re)recording ``names``.

    Args:
        folder: the folder.
        names: files (relative to ``folder``) to (re)record; entries of other files still on
            disk are kept, entries of removed files dropped. None: every file below ``folder``.
    """
    folder = Path(folder)
    if names is None:
        files: dict[str, dict] = {}
        names = folder_files(folder)
    else:
        old = read_manifest(folder) or {}
        files = {name: entry for name, entry in old.items() if (folder / name).is_file()}
    for name in names:
        path = folder / name
        files[name] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    return {"format": 1, "files": dict(sorted(files.items()))}


def folder_files(folder: Path) -> list[str]:
    """Relative POSIX paths of every regular file below ``folder`` except the manifest."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
    )


def read_manifest(folder: Path) -> dict[str, dict] | None:
    """``{relative name: {"sha256", "size"}}``, or None when the folder has no manifest."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
        return files
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(
            f"{path}: unreadable checksum manifest ({type(err).__name__}: {err}); the folder "
            f"{folder} cannot be verified: restore it from a copy, or start a new run directory."
        ) from err


def manifest_entry(path: Path) -> dict | None:
    """The manifest entry of ``path`` in its folder's manifest (None: no manifest or entry)."""
    files = read_manifest(path.parent)
    return None if files is None else files.get(path.name)


def check_file(path: Path, expected: dict, hint: str) -> None:
    """Raise :class:`CorruptCheckpointError` if ``path`` is missing or differs from
    ``expected`` (``{"sha256", "size"?}``); ``hint`` says what to do."""
    if not path.is_file():
        raise CorruptCheckpointError(
            f"{path}: missing (listed in {MANIFEST}); the folder is incomplete: {hint}."
        )
    size = path.stat().st_size
    if "size" in expected and size != expected["size"]:
        what = "truncated" if size < expected["size"] else "longer than written"
        raise CorruptCheckpointError(
            f"{path}: {what} ({size} bytes, {expected['size']} were written): {hint}."
        )
    actual = file_sha256(path)
    if actual != expected["sha256"]:
        raise CorruptCheckpointError(
            f"{path}: checksum mismatch (sha256 {actual[:16]}..., {expected['sha256'][:16]}... "
            f"was written): the file was corrupted after it was written: {hint}."
        )


def verify_folder(folder: Path, require_manifest: bool = False) -> None:
    """Check every file listed in ``folder/manifest.json`` (presence, size, sha256).

    A folder without a manifest (written before manifests existed) passes unverified, unless
    ``require_manifest``.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        CorruptCheckpointError: naming the first file that is missing, truncated or altered,
            or the missing manifest (with ``require_manifest``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist")
    files = read_manifest(folder)
    if files is None and require_manifest:
        raise MissingManifestError(
            f"{folder} has no {MANIFEST}: its files cannot be verified (written before "
            "checksums existed, or copied without it)"
        )
    hint = (
        f"restore {folder.name} from a copy, or use {prev_folder(folder).name} if it verifies"
        if not folder.name.endswith(".prev")
        else "restore it from a copy, or start a new run directory"
    )
    for name, entry in (files or {}).items():
        check_file(folder / name, entry, hint)


def prev_folder(target: Path) -> Path:
    """Where the previous complete copy of ``target`` is kept: ``<target>.prev``."""
    return target.with_name(f"{target.name}.prev")


def newest_valid_folder(target: Path, require_manifest: bool = False) -> Path | None:
    """``target`` if it verifies, else ``<target>.prev`` if that does (with a warning), else None
    (``require_manifest``: a folder without its manifest does not verify).

    Logs a warning naming what was wrong with each folder passed over.
    """
    target = Path(target)
    problems = []
    for folder in (target, prev_folder(target)):
        if not folder.is_dir():
            problems.append(f"{folder} does not exist")
            continue
        try:
            verify_folder(folder, require_manifest)
        except CorruptCheckpointError as err:
            problems.append(str(err))
            continue
        if folder != target:
            log.warning("%s; using the previous complete copy %s.", problems[0], folder)
        return folder
    if target.exists() or prev_folder(target).exists():
        log.warning("no valid copy of %s: %s", target, "; ".join(problems))
    return None
