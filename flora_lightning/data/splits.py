"""Where samples go before partitioning and after: the held-out test set, class names and
labels checked, and each client's local test share.

Pure functions of their arguments (seeded with numpy), used by
:class:`~flora_lightning.data.datamodule.FederatedDataModule.setup`.
"""

from __future__ import annotations

import numpy as np


def hold_out(pool, test_fraction: float, seed: int):
    """A seeded random ``int(test_fraction * n)`` of the pool as the test set, as released.

    Returns:
        ``(train, test)``: the rest of the pool (in pool order) and the held-out rows.
    """
    n = len(pool)
    rng = np.random.default_rng(seed)
    test_rows = np.sort(rng.choice(n, size=int(n * test_fraction), replace=False))
    train_rows = np.setdiff1d(np.arange(n), test_rows)
    if not len(test_rows) or not len(train_rows):
        raise ValueError(
            f"data.test_fraction={test_fraction} of the {n} pooled samples leaves an "
            "empty test or training set; pool more data or change data.test_fraction."
        )
    return pool.select(train_rows), pool.select(test_rows)


def split_local_test(
    indices: np.ndarray, fraction: float, seed: int, client: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``int(fraction * n)`` of a client's partition as its local test set.

    Seeded per ``(data.partition.seed, client)``, so a client's split does not depend on
    the number of clients after it. Both parts keep the partition's order.

    Returns:
        ``(train, local_test)`` row indices into the training set.
    """
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    rng = np.random.default_rng([seed, client, 7])
    test_pos = np.sort(rng.choice(n, size=int(n * fraction), replace=False))
    keep = np.ones(n, dtype=bool)
    keep[test_pos] = False
    train_idx, test_idx = indices[keep], indices[test_pos]
    # int(f * n) < n for f < 1, so the training part is never empty (every client has
    # >= data.partition.min_samples >= 1 samples); the local test set can be.
    if not len(test_idx):
        raise ValueError(
            f"data.local_test_fraction={fraction} leaves client {client} "
            f"({n} samples) with no local test sample; set data.local_test_fraction >= "
            f"1/{n} or give every client more samples (data.partition.min_samples, fewer "
            "data.partition.num_clients)."
        )
    return train_idx, test_idx


def resolve_class_names(
    names: list[str] | None, class_names: list[str] | None, label_column: str
) -> list[str]:
    """``data.class_names`` if given (checked against the label column's ``names``), else the
    ``ClassLabel`` names; underscores become spaces."""
    if class_names is not None:
        if names is not None and len(names) != len(class_names):
            raise ValueError(
                f"data.class_names has {len(class_names)} names but the label column "
                f"'{label_column}' has {len(names)} classes."
            )
        return [n.replace("_", " ") for n in class_names]
    if names is None:
        raise ValueError(
            f"data.class_names is required: the label column '{label_column}' has no "
            "class names (not a ClassLabel). Pass them in label order, e.g. "
            "--data.class_names '[cat, dog]'."
        )
    return [n.replace("_", " ") for n in names]


def check_labels(labels: np.ndarray, num_classes: int, label_column: str) -> None:
    """Labels must index the class names."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"data.label_column '{label_column}' holds labels in "
            f"[{labels.min()}, {labels.max()}] but there are {num_classes} class names; "
            "labels must be 0..num_classes-1 (check data.class_names)."
        )
