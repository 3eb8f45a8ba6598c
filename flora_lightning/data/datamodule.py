"""The federated data: one global test set and one training partition per client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np

from flora_lightning.data.label_table import format_label_table, label_counts
from flora_lightning.data.loaders import ClientLoaders
from flora_lightning.data.local_source import LocalSource
from flora_lightning.data.owners import OwnersData
from flora_lightning.data.partition import PartitionConfig, partition_indices
from flora_lightning.data.settings import (  # noqa: F401  (re-exported: the old import paths)
    POOLED,
    PREPROCESS,
    Preprocess,
    check_data_settings,
)
from flora_lightning.data.source import load_source
from flora_lightning.data.splits import (
    check_labels,
    hold_out,
    resolve_class_names,
    split_local_tests,
)


class FederatedDataModule(OwnersData, ClientLoaders, L.LightningDataModule):
    """Loads an image-classification dataset and splits its training set across clients.

    Args:
        dataset: HF hub id (``uoft-cs/cifar10``), ``imagefolder``, ``parquet``, a local folder,
            or ``flora-offline/digits`` (built-in, offline).
        subset: dataset configuration name, if the dataset has several.
        data_dir: folder for ``imagefolder`` (or a hub dataset's sub-folder).
        data_files: files for ``parquet``/``imagefolder``, e.g. ``{train: a.parquet, test: b.parquet}``.
        image_column: column holding the images.
        label_column: column holding integer class labels.
        class_names: class names in label order; read from a ``ClassLabel`` column when omitted.
        template: caption template with ``{}`` for the class name (paper: "a photo of a {}.").
        train_split: split to partition across clients (unless ``test_split`` is ``pooled``).
        test_split: ``pooled`` (the released code's protocol): pool the splits in
            ``pool_splits``, hold out a seeded random ``test_fraction`` of the pool as the
            global test set and partition the rest; a split name: that split is the global
            test set and ``train_split`` is partitioned; ``null``: hold out ``test_fraction``
            of ``train_split``.
        pool_splits: the splits pooled when ``test_split`` is ``pooled``.
        test_fraction: share held out as the global test set (``pooled`` or ``null``); the
            released code holds out ``int(0.2 * n)`` samples.
        max_test_samples: evaluate on a seeded random subset of this size (faster rounds).
        batch_size: local training batch size (paper: 128).
        eval_batch_size: batch size for evaluation.
        num_workers: DataLoader worker processes.
        preprocess: ``device``: the loader only decodes (uint8), resize/crop/normalise run
            batched on the model's device (the PIL processor's pixels within 2 uint8 levels);
            ``processor``: the checkpoint's preprocessing per image in the loader (CPU).
        partition: how the training set is split across clients.
        local_test_fraction: each client keeps this seeded share of its partition as a local
            test set (personalised evaluation), taken out of its training data and only from
            rows no other client holds (overlapping few-shot partitions); ``null``: no local
            test sets, clients train on their whole partition.
        test_dataset: the global test set's data path (an imagefolder DIR, a .parquet file
            or glob, or ``hub:ID[:SPLIT]``), labels matched by class name; what a server with
            no training data evaluates on; ``null``: the test set ``data.dataset`` gives
            (``test_split``; with ``pooled`` the held-out rows stay out of training either way).
        max_unreadable_fraction: ``partition.kind: folders`` and node-local data: images that
            do not decode are skipped and counted; a data path with more than this share of
            them is refused (0: any unreadable image refuses the data).
    """

    def __init__(
        self,
        dataset: str = "uoft-cs/cifar10",
        subset: str | None = None,
        data_dir: str | None = None,
        data_files: str | list[str] | dict[str, Any] | None = None,
        image_column: str = "img",
        label_column: str = "label",
        class_names: list[str] | None = None,
        template: str = "a photo of a {}.",
        train_split: str = "train",
        test_split: str | None = POOLED,
        pool_splits: tuple[str, ...] = ("train", "test"),
        test_fraction: float = 0.2,
        max_test_samples: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        preprocess: Preprocess = "device",
        partition: PartitionConfig = PartitionConfig(),
        local_test_fraction: float | None = None,
        test_dataset: str | None = None,
        max_unreadable_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        check_data_settings(
            template=template,
            test_fraction=test_fraction,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            max_test_samples=max_test_samples,
            local_test_fraction=local_test_fraction,
            num_workers=num_workers,
            preprocess=preprocess,
            test_split=test_split,
            pool_splits=pool_splits,
            max_unreadable_fraction=max_unreadable_fraction,
            test_dataset=test_dataset,
            partition=partition,
            class_names=class_names,
        )
        self.dataset = dataset
        self.subset = subset
        self.data_dir = data_dir
        self.data_files = data_files
        self.image_column = image_column
        self.label_column = label_column
        self.class_names = list(class_names) if class_names is not None else None
        self.template = template
        self.train_split = train_split
        self.test_split = test_split
        self.pool_splits = list(pool_splits)
        self.test_fraction = test_fraction
        self.max_test_samples = max_test_samples
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.preprocess = preprocess
        self.partition = partition
        self.local_test_fraction = local_test_fraction
        self.test_dataset = test_dataset
        self.max_unreadable_fraction = max_unreadable_fraction
        self.sources: dict[int, LocalSource] = {}
        """kind=folders or a node's own data: per client, its loaded data (what was skipped)."""
        self.node_test_path: str | None = None
        """A node's own local test set path (:meth:`setup_node`), if any."""
        self.image_transform: Callable | None = None
        self.train_set = None
        self.test_set = None
        self.client_indices: list[np.ndarray] = []
        """Per client: the rows of ``train_set`` it trains on."""
        self.client_test_indices: list[np.ndarray] = []
        """Per client: the rows of ``train_set`` of its local test set (empty list: none)."""

    # ---------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Load, check columns and class names, hold out the test set, partition the rest.

        With ``partition.kind: folders``: load every client's own data path instead (client
        ``k`` holds ``client_dirs[k]``) and the global test set (:meth:`setup_server`).
        """
        if self.train_set is not None:
            return
        if self.partition.kind == "folders":
            self._setup_folders()
            return
        train, test, class_names = self._load_dataset()
        if self.test_dataset is not None:  # the global test set from its own path
            test = self._capped(self._load_test_dataset(class_names))
        labels = np.asarray(train[self.label_column], dtype=np.int64)
        check_labels(labels, len(class_names), self.label_column)
        partitions = partition_indices(labels, len(class_names), self.partition)
        self._use_partitions(train, labels, partitions, class_names)
        self.test_set = test

    def _load_dataset(self):
        """``(train, test, class_names)`` of ``data.dataset`` under the ``test_split`` rule."""
        source = load_source(self.dataset, self.subset, self.data_dir, self.data_files)
        if self.test_split == POOLED:
            train = self._pool(source)
        else:
            train = self._split(source, self.train_split, "data.train_split")
            self._check_columns(train)
        names = getattr(train.features[self.label_column], "names", None)
        class_names = resolve_class_names(names, self.class_names, self.label_column)
        if self.test_split == POOLED:
            train, test = hold_out(train, self.test_fraction, self.partition.seed)
        elif self.test_split is None:
            held = train.train_test_split(test_size=self.test_fraction, seed=self.partition.seed)
            train, test = held["train"], held["test"]
        else:
            test = self._split(source, self.test_split, "data.test_split")
            self._check_columns(test)
        return train, self._capped(test), class_names

    def _capped(self, test):
        """The test set, cut to a seeded ``max_test_samples`` subset when it is larger."""
        if self.max_test_samples is not None and len(test) > self.max_test_samples:
            test = test.shuffle(seed=self.partition.seed).select(range(self.max_test_samples))
        return test

    def _use_partitions(self, train, labels, partitions, class_names, tests=None) -> None:
        """Keep ``train`` and per-client rows; local test rows from ``tests`` (per client, rows
        of ``train``) or drawn with ``local_test_fraction``; count every client's labels."""
        self.client_test_indices = []
        if tests is not None:
            self.client_indices, self.client_test_indices = partitions, tests
        elif self.local_test_fraction is not None:
            self.client_indices, self.client_test_indices = split_local_tests(
                partitions, self.local_test_fraction, self.partition.seed
            )
        else:
            self.client_indices = partitions
        if self.client_test_indices:
            self.test_counts = label_counts(labels, self.client_test_indices, len(class_names))
        self.class_names = class_names
        self.train_set = train
        self.counts = label_counts(labels, self.client_indices, len(class_names))

    def _pool(self, source):
        """The ``pool_splits`` of the dataset concatenated (columns checked in each)."""
        from datasets import concatenate_datasets

        splits = [self._split(source, name, "data.pool_splits") for name in self.pool_splits]
        for split in splits:
            self._check_columns(split)
        try:
            return concatenate_datasets(splits)
        except ValueError as err:
            raise ValueError(
                f"data.pool_splits={self.pool_splits}: the splits cannot be pooled, their "
                f"features differ ({err}). Pool fewer splits or set --data.test_split to a "
                "split name."
            ) from err

    def _split(self, source, split: str, field: str):
        if split not in source:
            hint = (
                " Set --data.test_split null to hold out data.test_fraction of the training split."
                if field == "data.test_split"
                else ""
            )
            raise ValueError(
                f"{field}='{split}' is not a split of the dataset {list(source)}.{hint}"
            )
        return source[split]

    def _check_columns(self, split) -> None:
        for field, column in (
            ("data.image_column", self.image_column),
            ("data.label_column", self.label_column),
        ):
            if column not in split.column_names:
                raise ValueError(
                    f"{field}='{column}' is not a column of the dataset; its columns are "
                    f"{split.column_names}. Set --{field} to one of them."
                )

    # -------------------------------------------------------------- access
    @property
    def num_clients(self) -> int:
        return self.partition.num_clients

    def num_samples(self, client_id: int) -> int:
        """The client's training samples (its local test set not counted): its FedAvg weight."""
        return len(self.client_indices[client_id])

    def client_report(self, client_id: int) -> tuple[int, np.ndarray]:
        """What a node reports about its data: ``(num_samples, label_counts)``.

        ``num_samples`` is its FedAvg weight (:meth:`num_samples`: training rows, local test
        rows not counted); ``label_counts[c]`` its training rows of ``class_names[c]`` (a copy).
        """
        return self.num_samples(client_id), self.counts[client_id].copy()

    @property
    def has_local_test(self) -> bool:
        """Whether every client holds a local test set (``data.local_test_fraction``,
        ``data.partition.client_test_dirs`` or a node's ``test-path``)."""
        return self.local_test_fraction is not None or self._test_paths

    @property
    def _test_paths(self) -> bool:
        return self.partition.client_test_dirs is not None or bool(self.node_test_path)

    def fingerprints(self) -> dict[str, str]:
        """Content hashes of the loaded train and test sets (``train``, ``test``).

        The hashes ``datasets`` keeps for its own cache; this is the one place that reads them.
        """
        test = self.test_set._fingerprint if self.test_set is not None else "none"
        return {"train": self.train_set._fingerprint, "test": test}

    def label_table(self) -> str:
        """Per-client label counts; with local test sets, a training and a local-test block."""
        table = format_label_table(self.counts, self.class_names)
        if not self.has_local_test:
            return table
        local = format_label_table(self.test_counts, self.class_names)
        origin = (
            f"data.local_test_fraction={self.local_test_fraction}"
            if self.local_test_fraction is not None
            else "the clients' test paths"
        )
        return f"train\n{table}\n\nlocal test ({origin})\n{local}"
