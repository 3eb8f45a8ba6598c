"""What a node-local data path means: an imagefolder, parquet files or a hub split (torch-free).

One data owner's data is named by one string (``data.partition.client_dirs`` entries,
``data.test_dataset``, a Flower node's ``data-path``):

- ``DIR``: an imagefolder directory, one sub-folder per class (``DIR/cat/1.png``);
- ``FILE.parquet`` or a glob (``DIR/*.parquet``, ``DIR/**/*.parquet``): parquet files;
- ``hub:ID`` or ``hub:ID:SPLIT``: a split (default ``train``) of a dataset on the Hugging Face
  hub or a built-in offline one (``hub:flora-offline/digits:test``).

This module only parses the string and checks that a local path exists, so ``flora`` can refuse
a wrong path before the heavy imports (:mod:`flora_lightning.config_check`);
:mod:`flora_lightning.data.local_source` loads the data.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

HUB_PREFIX = "hub:"
"""Prefix of a hub split: ``hub:ID`` or ``hub:ID:SPLIT``."""
GLOB_CHARS = "*?["
SYNTAX = (
    "an imagefolder directory (one sub-folder per class), a .parquet file or glob "
    "(DIR/*.parquet), or hub:ID[:SPLIT]"
)


@dataclass(frozen=True)
class SourceSpec:
    """One data owner's data path, parsed.

    Attributes:
        kind: ``imagefolder``, ``parquet`` or ``hub``.
        location: the directory, the file or glob, or the hub id.
        split: the split of a hub dataset (``train`` when not given); None otherwise.
    """

    kind: Literal["imagefolder", "parquet", "hub"]
    location: str
    split: str | None = None


def parse_source(spec: str, field: str) -> SourceSpec:
    """Parse a data path (syntax in the module docstring) without touching the disk.

    Args:
        spec: The path string.
        field: The dotted config field or node-config key it came from (for errors).

    Raises:
        ValueError: naming ``field`` and the syntax, for an empty string or a bare ``hub:``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{field}={spec!r}: give a data path: {SYNTAX}.")
    if spec.startswith(HUB_PREFIX):
        rest = spec[len(HUB_PREFIX) :]
        repo, _, split = rest.partition(":")
        if not repo:
            raise ValueError(
                f"{field}={spec!r}: hub: needs a dataset id, e.g. hub:uoft-cs/cifar10:train."
            )
        return SourceSpec("hub", repo, split or "train")
    if spec.endswith(".parquet") or any(c in spec for c in GLOB_CHARS):
        return SourceSpec("parquet", spec)
    return SourceSpec("imagefolder", spec)


def check_source_exists(spec: str, field: str) -> SourceSpec:
    """Parse ``spec`` and check that its local files exist (a hub split is not checked).

    Raises:
        ValueError: naming ``field`` and the path: no such directory, file, or no file
            matching the glob (relative paths are read from the current directory).
    """
    parsed = parse_source(spec, field)
    where = f"(relative to {Path.cwd()})"
    if parsed.kind == "imagefolder":
        path = Path(parsed.location)
        if not path.is_dir():
            what = "is a file, not a directory" if path.exists() else "no such directory"
            raise ValueError(f"{field}={spec!r}: {what} {where}; give {SYNTAX}.")
    elif parsed.kind == "parquet":
        if any(c in parsed.location for c in GLOB_CHARS):
            if not glob.glob(parsed.location, recursive=True):
                raise ValueError(f"{field}={spec!r}: no file matches this glob {where}.")
        elif not Path(parsed.location).is_file():
            raise ValueError(f"{field}={spec!r}: no such parquet file {where}.")
    return parsed
