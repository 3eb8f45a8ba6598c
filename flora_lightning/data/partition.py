"""Federated partitioning of a labelled training set across clients.

The splitting itself is done by ``flwr_datasets`` partitioners (IID, Dirichlet,
pathological) plus a small few-shot partitioner; this module turns a label array
into per-client index arrays and explains bad configurations in terms of the
``data.partition.*`` CLI fields.

Any other ``flwr_datasets.partitioner.Partitioner`` subclass is one new class, selected in the
config without editing this package::

    data:
      partition:
        num_clients: 5
        partitioner:
          class_path: my_package.MyPartitioner
          init_args: {alpha: 0.3}
"""

import importlib
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

_KINDS = ("iid", "dirichlet", "pathological", "fewshot")


@dataclass
class PartitionConfig:
    """How the training set is split across clients."""

    kind: Literal["iid", "dirichlet", "pathological", "fewshot"] = "iid"
    """Partition scheme: iid, dirichlet (non-IID by Dirichlet(beta) per class),
    pathological (disjoint classes per client), fewshot (n shots per class per client)."""
    num_clients: int = 10
    """Number of clients (data owners)."""
    beta: float = 0.1
    """Dirichlet concentration (kind=dirichlet); smaller is more skewed."""
    classes_per_client: int | None = None
    """Classes each client holds (kind=pathological); null: num_classes // num_clients shuffled
    classes per client, the remainder to the last client (the released code's few-shot split)."""
    shots: int | None = None
    """Samples per class per client: required for kind=fewshot; for kind=pathological, exactly
    this many of each of a client's classes (pathological few-shot; null: all of them)."""
    self_balancing: bool = True
    """kind=dirichlet: a client already holding more than n/num_clients samples gets no share
    of the next classes (flwr-datasets ``self_balancing``, the released code's rule; that code
    also stops a client at exactly n/num_clients, a tie only when it is a whole number)."""
    shots_overlap: bool = True
    """kind=fewshot: every client draws its shots from the whole training pool independently,
    so two clients may hold the same sample (the released code); false deals disjoint shots."""
    min_samples: int = 1
    """Every client must receive at least this many samples (kind=dirichlet redraws until it
    holds, as the released code with 1), else a clear error."""
    seed: int = 42
    """Seed: same seed and labels give the same partition."""
    partitioner: dict | None = None
    """Any flwr-datasets ``Partitioner`` subclass, ``{class_path: ..., init_args: {...}}``, used
    instead of ``kind``; it gets ``num_partitions=num_clients``, ``partition_by`` (the name of
    the label column) and ``seed`` (where its signature takes them) plus its ``init_args``."""

    def __post_init__(self) -> None:
        """Reject invalid settings with a message naming the CLI field and the fix."""
        p = "data.partition."
        if self.kind not in _KINDS:
            raise ValueError(f"{p}kind must be one of {', '.join(_KINDS)} (got {self.kind!r})")
        if self.num_clients < 1:
            raise ValueError(f"{p}num_clients must be >= 1 (got {self.num_clients})")
        if not self.beta > 0:
            raise ValueError(
                f"{p}beta must be > 0 (got {self.beta}); "
                "use e.g. 0.1 for strong non-IID or 1.0 for mild"
            )
        if self.classes_per_client is not None and self.classes_per_client < 1:
            raise ValueError(
                f"{p}classes_per_client must be >= 1 or null (got {self.classes_per_client}); "
                "null gives every client num_classes // num_clients classes"
            )
        if self.shots is not None and self.shots < 1:
            raise ValueError(f"{p}shots must be >= 1 when given (got {self.shots}); use e.g. 16")
        if self.kind == "fewshot" and self.shots is None:
            raise ValueError(f"{p}shots is required for {p}kind=fewshot; set e.g. {p}shots=16")
        if self.min_samples < 1:
            raise ValueError(
                f"{p}min_samples must be >= 1 (got {self.min_samples}); "
                "use 1 to only forbid empty clients"
            )
        if self.partitioner is not None:
            partitioner_class(self.partitioner)


def partitioner_class(spec: dict) -> type[Partitioner]:
    """The ``Partitioner`` subclass named by ``data.partition.partitioner``, checked.

    Args:
        spec: ``{"class_path": "module.Class", "init_args": {...}}`` (``init_args`` optional).

    Raises:
        ValueError: If the entry is malformed, the class cannot be imported or is not a
            ``flwr_datasets.partitioner.Partitioner`` subclass; the message names the field.
    """
    p = "data.partition.partitioner"
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(
            f"{p} needs a class_path: {{class_path: my.module.MyPartitioner, init_args: {{}}}} "
            f"(got {spec!r})"
        )
    unknown = sorted(set(spec) - {"class_path", "init_args"})
    if unknown:
        raise ValueError(f"{p} takes only class_path and init_args (got {', '.join(unknown)})")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"{p}.init_args must be a mapping (got {init_args!r})")
    if "num_partitions" in init_args:
        raise ValueError(f"{p}.init_args.num_partitions is set from data.partition.num_clients")
    if "partition_by" in init_args:
        raise ValueError(f"{p}.init_args.partition_by is set by flora (the label column)")
    path = spec["class_path"]
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{p}.class_path {path!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Partitioner)):
        raise ValueError(
            f"{p}.class_path {path!r} is not a flwr_datasets.partitioner.Partitioner subclass"
        )
    return cls


class FewShotPartitioner(Partitioner):
    """IID few-shot partitioner: every partition gets ``shots`` samples of every class.

    With ``overlap`` (the released code's split) each partition draws its ``shots`` rows
    of each class independently from all rows of that class, so two partitions may share
    rows and a class needs only ``shots`` rows. Without it the rows of each class are
    shuffled once and dealt out in consecutive blocks of ``shots``: partitions are disjoint
    and a class needs ``num_partitions * shots`` rows. Rows not drawn stay unused.

    Args:
        num_partitions: Number of partitions (clients).
        shots: Samples of each class per partition.
        partition_by: Name of the label column.
        seed: Seed of the shuffle.
        overlap: Draw each partition's shots independently (partitions may share rows).
    """

    def __init__(
        self,
        num_partitions: int,
        shots: int,
        partition_by: str = "label",
        seed: int | None = 42,
        overlap: bool = False,
    ) -> None:
        super().__init__()
        if num_partitions < 1 or shots < 1:
            raise ValueError(
                f"num_partitions and shots must be >= 1 (got {num_partitions}, {shots})"
            )
        self._num_partitions = num_partitions
        self._shots = shots
        self._partition_by = partition_by
        self._seed = seed
        self._overlap = overlap
        self._partition_id_to_indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        """Total number of partitions."""
        return self._num_partitions

    def load_partition(self, partition_id: int) -> Dataset:
        """Load the partition ``partition_id`` (all partitions are drawn on the first call)."""
        if self._partition_id_to_indices is None:
            self._partition_id_to_indices = self._deal_shots()
        return self.dataset.select(self._partition_id_to_indices[partition_id])

    def _deal_shots(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self._seed)
        labels = np.asarray(self.dataset[self._partition_by][:])
        needed = self._shots if self._overlap else self._num_partitions * self._shots
        by_class = [np.flatnonzero(labels == label) for label in np.unique(labels)]
        for label, rows in zip(np.unique(labels), by_class, strict=True):
            if rows.size < needed:
                raise ValueError(f"class {label!r} has {rows.size} samples but {needed} are needed")
        if self._overlap:  # partition by partition, each class drawn afresh (released order)
            return [
                np.sort(np.concatenate([rng.permutation(rows)[: self._shots] for rows in by_class]))
                for _ in range(self._num_partitions)
            ]
        blocks: list[list[np.ndarray]] = [[] for _ in range(self._num_partitions)]
        for rows in by_class:
            rows = rng.permutation(rows)
            for pid, block in enumerate(np.split(rows[:needed], self._num_partitions)):
                blocks[pid].append(block)
        return [np.sort(np.concatenate(b)) for b in blocks]


def partition_indices(
    labels: Sequence[int], num_classes: int, config: PartitionConfig
) -> list[np.ndarray]:
    """Per-client arrays of indices into the training set (sorted, int64).

    Partitions are disjoint except for ``kind=fewshot`` with ``shots_overlap`` (the released
    code's IID few-shot split, where clients draw their shots independently).

    Rows are shuffled with ``config.seed`` before partitioning (as
    ``flwr_datasets.FederatedDataset`` does), so sorted label order does not leak into
    the split.

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
    p = "data.partition."
    labels = np.asarray(labels, dtype=np.int64)
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
    order = rng.permutation(n)
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
        raise ValueError(
            f"client {client} received {sizes[client]} samples, fewer than "
            f"{p}min_samples={config.min_samples}; "
            f"{hint}lower {p}num_clients or lower {p}min_samples"
        )
    return parts


def _make_partitioner(
    config: PartitionConfig, labels: np.ndarray, rng: np.random.Generator
) -> tuple[Partitioner, np.ndarray]:
    """The flwr partitioner for ``config.kind`` (or ``config.partitioner``) and its key column."""
    k = config.num_clients
    if config.partitioner is not None:
        return _custom_partitioner(config), labels
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
    per_client = config.classes_per_client or classes.size // k
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


def _custom_partitioner(config: PartitionConfig) -> Partitioner:
    """``config.partitioner`` built with the config's clients, key column and seed."""
    cls = partitioner_class(config.partitioner)
    kwargs = dict(config.partitioner.get("init_args") or {})
    params = inspect.signature(cls).parameters
    takes_any = any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values())
    for key, value in (("partition_by", "key"), ("seed", config.seed)):
        if key not in kwargs and (key in params or takes_any):
            kwargs[key] = value
    try:
        return cls(num_partitions=config.num_clients, **kwargs)
    except TypeError as err:
        raise ValueError(
            f"data.partition.partitioner {config.partitioner['class_path']!r}: {err}; "
            "check data.partition.partitioner.init_args"
        ) from err


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


def label_counts(
    labels: Sequence[int], partitions: list[np.ndarray], num_classes: int
) -> np.ndarray:
    """[num_clients, num_classes] count matrix.

    Args:
        labels: Class index of every training sample.
        partitions: Per-client index arrays, as from :func:`partition_indices`.
        num_classes: Number of classes (columns).

    Returns:
        Integer matrix whose entry ``[i, c]`` counts client ``i``'s samples of class ``c``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.zeros((len(partitions), num_classes), dtype=np.int64)
    for i, idx in enumerate(partitions):
        counts[i] = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=num_classes)
    return counts


def format_label_table(
    counts: np.ndarray, class_names: Sequence[str] | None = None, max_classes: int = 20
) -> str:
    """Plain-text table of per-client label counts, for printing and logging.

    One row per client (client id, total, per-class counts); more than ``max_classes``
    classes are summarised as the number of classes present and the top classes.

    Args:
        counts: ``[num_clients, num_classes]`` matrix from :func:`label_counts`.
        class_names: Column names; class indices when ``None``.
        max_classes: Beyond this many classes, rows show the number of classes present
            and the three largest classes instead of every count.

    Returns:
        The table, rows separated by newlines, ending with an ``all`` row of totals.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if class_names is None:
        class_names = range(counts.shape[1])
    names = [str(name) for name in class_names]
    rows = np.vstack([counts, counts.sum(axis=0, keepdims=True)])
    ids = [str(i) for i in range(counts.shape[0])] + ["all"]
    if len(names) <= max_classes:
        header = ["client", "total", *names]
        body = [[cid, str(r.sum()), *map(str, r)] for cid, r in zip(ids, rows, strict=True)]
        left = {0}
    else:
        header = ["client", "total", "classes", "top classes"]
        body = []
        for cid, r in zip(ids, rows, strict=True):
            top = [f"{names[c]}:{r[c]}" for c in np.argsort(-r, kind="stable")[:3] if r[c]]
            body.append([cid, str(r.sum()), str(np.count_nonzero(r)), " ".join(top)])
        left = {0, 3}
    table = [header, *body]
    widths = [max(len(line[j]) for line in table) for j in range(len(header))]
    lines = []
    for line in table:
        cells = [
            cell.ljust(w) if j in left else cell.rjust(w)
            for j, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
