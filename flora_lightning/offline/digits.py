"""``flora-offline/digits``: scikit-learn's handwritten digits as a parquet image dataset.

The 1,797 real 8x8 scans of handwritten digits (UCI ML digits, shipped inside scikit-learn)
are written once as PNG images with a ``ClassLabel`` column, split by a fixed seed into

- ``pretrain``: 25% kept aside, used only to pre-train the offline tiny CLIP;
- ``train`` / ``test``: the rest, pooled and split 80/20 like the paper's global test set.

It is loaded through ``datasets.load_dataset("parquet", data_files=...)``, the same code that
loads any user parquet dataset.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from flora_lightning.offline.cache import build_once, cache_dir

OFFLINE_DIGITS = "flora-offline/digits"
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATE = "a photo of the digit {}."
_VERSION = "v1"
_SEED = 1234


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _build(folder: Path) -> None:
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(_SEED).permutation(len(labels))
    n_pre = len(order) // 4
    rest = order[n_pre:]
    n_test = len(rest) // 5
    splits = {"pretrain": order[:n_pre], "test": rest[:n_test], "train": rest[n_test:]}
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)}
    )
    for split, index in splits.items():
        rows = {
            "image": [{"bytes": _png(images[i]), "path": None} for i in sorted(index)],
            "label": [int(labels[i]) for i in sorted(index)],
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / f"{split}.parquet")


def digits_data_files() -> dict[str, str]:
    """Build the dataset on first use and return its ``data_files`` for ``load_dataset``."""
    folder = build_once(cache_dir() / f"digits-{_VERSION}", _build)
    return {split: str(folder / f"{split}.parquet") for split in ("train", "test", "pretrain")}
