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


def split_local_tests(
    partitions: list[np.ndarray], fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every client's local test set: a seeded share of its partition no other client holds.

    A row that another client also holds (overlapping partitions: ``kind=fewshot`` with
    ``data.partition.shots_overlap``, or a custom partitioner) would be that client's training
    row: testing on it inflates personalised accuracy. So a client's local test set is drawn
    from its *own* rows, those in no other partition: ``int(fraction * m)`` of its ``m`` own
    rows, seeded per ``(data.partition.seed, client)`` so a client's split does not depend on
    the number of clients after it. Shared rows always stay training rows. With disjoint
    partitions (every other kind) every row is a client's own and this is a plain
    ``int(fraction * n)`` draw of its ``n`` rows. Both parts keep the partition's order.

    Args:
        partitions: Per client, its row indices into the training set.
        fraction: ``data.local_test_fraction``, in (0, 1).
        seed: ``data.partition.seed``.

    Returns:
        ``(train, local_test)``: per client, the rows it trains on and its local test rows.

    Raises:
        ValueError: If a client is left with no local test row; the message names the fields.
    """
    partitions = [np.asarray(idx, dtype=np.int64) for idx in partitions]
    size = 1 + max((int(idx.max()) for idx in partitions if idx.size), default=-1)
    holders = np.zeros(size, dtype=np.int64)  # times each row is held, over all clients
    for idx in partitions:
        np.add.at(holders, idx, 1)
    train, test = [], []
    for client, idx in enumerate(partitions):
        train_idx, test_idx = _split_one(idx, holders[idx] == 1, fraction, seed, client)
        train.append(train_idx)
        test.append(test_idx)
    return train, test


def split_local_test(
    indices: np.ndarray, fraction: float, seed: int, client: int
) -> tuple[np.ndarray, np.ndarray]:
    """One client's ``(train, local_test)`` when it shares no row with another client.

    The draw :func:`split_local_tests` makes for that client with disjoint partitions
    (seeded by ``(seed, client)``), so a deployed node holding only its own rows gets the
    local test rows the in-process run gives it.
    """
    indices = np.asarray(indices, dtype=np.int64)
    return _split_one(indices, np.ones(len(indices), dtype=bool), fraction, seed, client)


def _split_one(
    indices: np.ndarray, own: np.ndarray, fraction: float, seed: int, client: int
) -> tuple[np.ndarray, np.ndarray]:
    """One client's ``(train, local_test)``: ``int(fraction * m)`` of its ``m`` own positions."""
    n, own_pos = len(indices), np.flatnonzero(own)
    rng = np.random.default_rng([seed, client, 7])
    # Generator.choice of an array draws the positions as choice(len(array)) would: with
    # disjoint partitions (own_pos = 0..n-1) the rows of a plain int(f * n) draw of n.
    test_pos = np.sort(rng.choice(own_pos, size=int(own_pos.size * fraction), replace=False))
    keep = np.ones(n, dtype=bool)
    keep[test_pos] = False
    train_idx, test_idx = indices[keep], indices[test_pos]
    # int(f * m) < m <= n for f < 1, so the training part is never empty (every client has
    # >= data.partition.min_samples >= 1 samples); the local test set can be.
    if len(test_idx):
        return train_idx, test_idx
    if own_pos.size == n:
        raise ValueError(
            f"data.local_test_fraction={fraction} leaves client {client} "
            f"({n} samples) with no local test sample; set data.local_test_fraction >= "
            f"1/{n} or give every client more samples (data.partition.min_samples, fewer "
            "data.partition.num_clients)."
        )
    fixes = (
        "set data.partition.shots_overlap=false (disjoint shots) or lower "
        "data.partition.num_clients or data.partition.shots"
    )
    if own_pos.size > 1:  # with one own row no fraction below 1 draws it
        fixes = f"raise data.local_test_fraction to >= 1/{own_pos.size}, {fixes}"
    raise ValueError(
        f"data.local_test_fraction={fraction} leaves client {client} with no local test "
        f"sample: only {own_pos.size} of its {n} samples are held by no other client, and a "
        "local test row must not be another client's training row (partitions overlap with "
        f"data.partition.shots_overlap=true); {fixes}."
    )


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
