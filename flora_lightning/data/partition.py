"""Federated partitioning of a labelled training set across clients.

The splitting itself is done by ``flwr_datasets`` partitioners (IID random chunks, Dirichlet,
pathological) plus two small ones of ours, the released code's per-class IID split
(:mod:`flora_lightning.data.per_class_iid`) and few-shot (:mod:`flora_lightning.data.fewshot`);
this module turns a label array into per-client index arrays and explains bad configurations in
terms of the ``data.partition.*`` CLI fields.

Any other ``flwr_datasets.partitioner.Partitioner`` subclass is one new class, selected in the
config without editing this package (:mod:`flora_lightning.data.custom_partitioner`)::

    data:
      partition:
        num_clients: 5
        partitioner:
          class_path: my_package.MyPartitioner
          init_args: {alpha: 0.3}
"""

import hashlib
import warnings
from collections.abc import Sequence

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from flora_lightning.data.custom_partitioner import build_partitioner
from flora_lightning.data.fewshot import FewShotPartitioner
from flora_lightning.data.partition_config import PartitionConfig
from flora_lightning.data.per_class_iid import PerClassIidPartitioner

_drawn: dict[tuple, list[np.ndarray]] = {}
"""The last partition drawn in this process, by (labels digest, classes, config): a Flower
simulation sets up one datamodule per virtual node in each of a few worker processes, and
drawing 1,000 partitions through flwr-datasets takes seconds (built-in kinds only; the arrays
are returned read-only, shared, not copied)."""


def partition_indices(
    labels: Sequence[int], num_classes: int, config: PartitionConfig
) -> list[np.ndarray]:
    """Per-client arrays of indices into the training set (sorted, int64, read-only).

    Partitions are disjoint except for ``kind=fewshot`` with ``shots_overlap`` (the released
    code's IID few-shot split, where clients draw their shots independently).

    Rows are shuffled with ``config.seed`` before partitioning (as
    ``flwr_datasets.FederatedDataset`` does), so sorted label order does not leak into
    the split; except for ``kind=iid`` with ``iid_rule=per_class``, the released code's split,
    which cuts each class in the order of ``labels`` (the training set's order: with
    ``data.test_split=pooled``, the pool's order less the held-out rows, as released) and
    draws nothing: the seed does not change it (in the datamodule it still picks the held-out
    test rows).

    Args:
        labels: Class index of every training sample, in ``[0, num_classes)``.
        num_classes: Number of classes of the task.
        config: Partition scheme and its parameters.

    Returns:
        One index array per client, ``config.num_clients`` in total.

    Raises:
        ValueError: If the configuration cannot be met by these labels; the message
            names the ``data.partition.*`` field to change.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if config.partitioner is not None:  # a custom partitioner: drawn every time
        return _draw(labels, num_classes, config)
    key = (hashlib.sha256(labels.tobytes()).hexdigest(), num_classes, repr(config))
    if key not in _drawn:
        parts = _draw(labels, num_classes, config)
        for idx in parts:
            idx.setflags(write=False)
        _drawn.clear()
        _drawn[key] = parts
    return list(_drawn[key])


def _draw(labels: np.ndarray, num_classes: int, config: PartitionConfig) -> list[np.ndarray]:
    p = "data.partition."
    n, k = labels.size, config.num_clients
    if n < k:
        raise ValueError(
            f"{p}num_clients={k} but the training set has {n} samples; lower {p}num_clients"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (got {labels.min()}..{labels.max()})"
        )
    kind = config.kind if config.partitioner is None else config.partitioner["class_path"]
    if config.partitioner is None and config.kind == "pathological":
        if config.classes_per_client is None and num_classes < k:
            raise ValueError(
                f"{p}classes_per_client=null deals num_classes // num_clients classes per "
                f"client, but {num_classes} classes < {p}num_clients={k}; lower "
                f"{p}num_clients or set {p}classes_per_client"
            )
        if (config.classes_per_client or 0) > num_classes:
            raise ValueError(
                f"{p}classes_per_client={config.classes_per_client} but the task has only "
                f"{num_classes} classes; lower {p}classes_per_client"
            )
    if config.partitioner is None and config.kind == "fewshot":
        needed = config.shots if config.shots_overlap else k * config.shots
        class_sizes = np.bincount(labels, minlength=num_classes)
        short = np.flatnonzero(class_sizes < needed)
        if short.size:
            c = short[0]
            per = "" if config.shots_overlap else f" with {p}num_clients={k}"
            raise ValueError(
                f"{p}shots={config.shots}{per} needs {needed} samples of every class but "
                f"class {c} has {class_sizes[c]}; lower {p}shots"
                + ("" if config.shots_overlap else f" or {p}num_clients")
            )

    rng = np.random.default_rng(config.seed)
    order = np.arange(n) if _keeps_row_order(config) else rng.permutation(n)
    partitioner, key = _make_partitioner(config, labels[order], rng)
    partitioner.dataset = Dataset.from_dict({"key": key, "_idx": order})
    try:
        # flwr warns on every Dirichlet redraw and on classes no client gets.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = [partitioner.load_partition(i)["_idx"][:] for i in range(k)]
    except ValueError as err:
        if kind != "dirichlet":
            what = f"kind={kind}" if config.partitioner is None else f"partitioner {kind!r}"
            raise ValueError(f"{p}{what} could not be partitioned: {err}") from err
        raise ValueError(
            f"{p}kind=dirichlet: no draw gave every client >= {p}min_samples={config.min_samples} "
            f"samples ({p}beta={config.beta}, {p}num_clients={k}, {n} samples); "
            f"raise {p}beta, lower {p}num_clients or lower {p}min_samples"
        ) from err
    parts = [np.sort(np.asarray(idx, dtype=np.int64)) for idx in parts]
    if kind == "pathological" and config.shots is not None:
        parts = [_take_shots(idx, labels, config.shots, rng) for idx in parts]

    sizes = np.array([idx.size for idx in parts])
    if sizes.min() < config.min_samples:
        client = int(np.argmin(sizes))
        hint = f"raise {p}beta, " if kind == "dirichlet" else ""
        if _keeps_row_order(config):  # a class with fewer rows than clients: all to the last
            hint = f"set {p}iid_rule=random_chunks, "
        raise ValueError(
            f"client {client} received {sizes[client]} samples, fewer than "
            f"{p}min_samples={config.min_samples}; "
            f"{hint}lower {p}num_clients or lower {p}min_samples"
        )
    return parts


def _keeps_row_order(config: PartitionConfig) -> bool:
    """Whether the split takes the rows in the given order (the released per-class IID split)."""
    return config.partitioner is None and config.kind == "iid" and config.iid_rule == "per_class"


def _make_partitioner(
    config: PartitionConfig, labels: np.ndarray, rng: np.random.Generator
) -> tuple[Partitioner, np.ndarray]:
    """The flwr partitioner for ``config.kind`` (or ``config.partitioner``) and its key column."""
    k = config.num_clients
    if config.partitioner is not None:
        return build_partitioner(config.partitioner, k, "key", config.seed), labels
    if config.kind == "iid" and config.iid_rule == "per_class":
        return PerClassIidPartitioner(k, "key"), labels
    if config.kind == "iid":
        return IidPartitioner(num_partitions=k), labels
    if config.kind == "fewshot":
        partitioner = FewShotPartitioner(
            k, config.shots, "key", seed=config.seed, overlap=config.shots_overlap
        )
        return partitioner, labels
    if config.kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=k,
            partition_by="key",
            alpha=float(config.beta),
            min_partition_size=config.min_samples,
            self_balancing=config.self_balancing,
            shuffle=False,
            seed=config.seed,
        )
        return partitioner, labels

    classes = np.unique(labels)
    per_client = config.classes_per_client or max(1, classes.size // k)
    if per_client * k > classes.size:
        # Overlap is unavoidable: client i gets class i % C plus random others.
        partitioner = PathologicalPartitioner(
            num_partitions=k,
            partition_by="key",
            num_classes_per_partition=per_client,
            class_assignment_mode="first-deterministic",
            shuffle=False,
            seed=config.seed,
        )
        return partitioner, labels
    # Disjoint classes. flwr's modes overlap for classes_per_client > 1 ("deterministic"
    # gives client i the classes i..i+k-1), so group the shuffled classes into blocks of
    # classes_per_client and give client i block i. With classes_per_client null the classes
    # left over (C mod num_clients) join the last client's block, as the released code.
    block_of_class = np.zeros(classes.max() + 1, dtype=np.int64)
    blocks = np.arange(classes.size) // per_client
    if config.classes_per_client is None:
        blocks = np.minimum(blocks, k - 1)
    block_of_class[rng.permutation(classes)] = blocks
    partitioner = PathologicalPartitioner(
        num_partitions=k,
        partition_by="key",
        num_classes_per_partition=1,
        class_assignment_mode="deterministic",
        shuffle=False,
        seed=config.seed,
    )
    return partitioner, block_of_class[labels]


def _take_shots(
    indices: np.ndarray, labels: np.ndarray, shots: int, rng: np.random.Generator
) -> np.ndarray:
    """Exactly ``shots`` randomly chosen indices of each class present in ``indices``."""
    kept = []
    for c in np.unique(labels[indices]):
        rows = indices[labels[indices] == c]
        if rows.size < shots:
            raise ValueError(
                f"data.partition.shots={shots} but class {c} has only {rows.size} training "
                "samples; lower data.partition.shots"
            )
        kept.append(rng.choice(rows, size=shots, replace=False))
    return np.sort(np.concatenate(kept)) if kept else indices
