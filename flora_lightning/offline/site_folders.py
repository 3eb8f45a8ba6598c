"""Data owners' folders written from ``flora-offline/digits``: fixtures for node-local data.

A real federation's nodes each read their own imagefolder (one sub-folder per class). Tests and
the walkthrough need such folders without a network: :func:`write_site_folders` deals the
digits' training split into ``num_sites`` disjoint, seeded subsets and writes each as an
imagefolder (``site_0/zero/00017.png``), plus the digits' test split as a test-set folder
(``test/``), for ``data.partition.kind: folders`` and for SuperNodes started with
``--node-config 'data-path="..."'``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEST_FOLDER = "test"
"""Name of the test-set folder :func:`write_site_folders` writes beside the sites."""


def write_site_folders(
    out_dir: str | Path,
    num_sites: int,
    seed: int,
    max_per_site: int | None = None,
    test_folder: bool = True,
) -> list[Path]:
    """Write ``num_sites`` imagefolders from disjoint, seeded subsets of the digits' train split.

    The training rows are shuffled with ``seed`` and cut into ``num_sites`` near-equal
    consecutive chunks (``numpy.array_split``), so no image is in two sites. Each image is
    written as ``<site>/<class name>/<row>.png`` with its row in the train split as the file
    name (so a file's source is traceable and the folder's sort order is fixed).

    Args:
        out_dir: Parent folder; ``site_0`` .. ``site_{num_sites-1}`` are written in it.
        num_sites: Number of data owners (>= 1).
        seed: Seed of the shuffle that deals the rows.
        max_per_site: Keep at most this many images per site (the first of its chunk), for
            quick tests; None keeps all.
        test_folder: Also write the digits' test split to ``out_dir/test`` (:data:`TEST_FOLDER`).

    Returns:
        The site folders, in order.
    """
    import datasets

    from flora_lightning.offline.digits import CLASS_NAMES, digits_data_files

    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1 (got {num_sites})")
    files = digits_data_files()
    out_dir = Path(out_dir)
    train = datasets.load_dataset("parquet", data_files={"train": files["train"]})["train"]
    train = train.cast_column("image", datasets.Image(decode=False))
    order = np.random.default_rng(seed).permutation(len(train))
    sites = []
    for k, chunk in enumerate(np.array_split(order, num_sites)):
        rows = np.sort(chunk)[:max_per_site] if max_per_site is not None else np.sort(chunk)
        sites.append(_write(train, rows, out_dir / f"site_{k}", CLASS_NAMES))
    if test_folder:
        test = datasets.load_dataset("parquet", data_files={"test": files["test"]})["test"]
        test = test.cast_column("image", datasets.Image(decode=False))
        _write(test, np.arange(len(test)), out_dir / TEST_FOLDER, CLASS_NAMES)
    return sites


def _write(split, rows: np.ndarray, folder: Path, class_names: list[str]) -> Path:
    """The ``rows`` of ``split`` as PNG files under ``folder/<class name>/``."""
    selected = split.select(rows)
    for row, image, label in zip(rows, selected["image"], selected["label"], strict=True):
        target = folder / class_names[label] / f"{row:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image["bytes"])
    return folder
