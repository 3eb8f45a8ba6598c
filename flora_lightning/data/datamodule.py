"""The federated data: one global test set and one training partition per client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from flora_lightning.clip.preprocess import decode_image, stack_images
from flora_lightning.data.label_table import format_label_table, label_counts
from flora_lightning.data.local_source import LocalSource, load_local_source
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
    split_local_test,
    split_local_tests,
)


class FederatedDataModule(L.LightningDataModule):
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

    # ------------------------------------------------------ the owners' data
    def _run_class_names(self, where: str) -> list[str]:
        """``data.class_names``, required when each data owner brings its own data."""
        if not self.class_names:
            raise ValueError(
                f"data.class_names is required with {where}: every data owner's labels are "
                "matched to it by class name. List the classes in label order, e.g. "
                "--data.class_names '[cat, dog]'."
            )
        return resolve_class_names(None, self.class_names, self.label_column)

    def load_local(self, path: str, field: str) -> LocalSource:
        """One data owner's data from ``path``, labelled in ``data.class_names`` order.

        Args:
            path: The data path (an imagefolder DIR, a .parquet file or glob, ``hub:ID[:SPLIT]``).
            field: Where the path came from, named in errors (``data-path``).
        """
        return load_local_source(
            path,
            self._run_class_names(field),
            self.image_column,
            self.label_column,
            self.max_unreadable_fraction,
            field,
        )

    def _setup_folders(self) -> None:
        """Client ``k`` holds ``data.partition.client_dirs[k]``; nothing is drawn."""
        dirs = self.partition.client_dirs
        owned = {
            k: self.load_local(d, f"data.partition.client_dirs[{k}]") for k, d in enumerate(dirs)
        }
        tests = None
        if self.partition.client_test_dirs is not None:
            tests = {
                k: self.load_local(d, f"data.partition.client_test_dirs[{k}]")
                for k, d in enumerate(self.partition.client_test_dirs)
            }
        self._use_sources(owned, tests, len(dirs))
        self.test_set = self._global_test()

    def setup_node(
        self,
        data_path: str,
        client: int,
        test_path: str | None = None,
        fields: tuple[str, str] = ("data-path", "test-path"),
    ) -> None:
        """Set up a deployed node: it holds only its own data, as client ``client``.

        The node trains exactly as client ``client`` of the in-process twin
        (``kind: folders`` with ``client_dirs[client] == data_path``): the same rows in the
        same order, the same seeded local test rows (``local_test_fraction``, seeded by
        ``(partition.seed, client)``) or ``test_path``'s rows as its local test set. Other
        clients' rows are empty; no global test set is loaded (``test_set`` stays None).

        Args:
            data_path: The node's data (``--node-config data-path``).
            client: The client index the run gives this node (its seeds depend on it).
            test_path: The node's own local test set (``--node-config test-path``), or None.
            fields: The names of the two paths in error messages (e.g.
                ``("data.partition.client_dirs[2]", "data.partition.client_test_dirs[2]")``
                on a simulated node).
        """
        if self.train_set is not None:
            return
        if test_path is not None and self.local_test_fraction is not None:
            raise ValueError(
                f"A node has a {fields[1]} and data.local_test_fraction is set: give one local "
                f"test set, either the node's {fields[1]} or data.local_test_fraction."
            )
        owned = {client: self.load_local(data_path, fields[0])}
        tests = None if test_path is None else {client: self.load_local(test_path, fields[1])}
        self.node_test_path = test_path
        self._use_sources(owned, tests, max(self.partition.num_clients, client + 1))

    def setup_server(self) -> None:
        """Set up a server that holds no training data: class names and the global test set.

        The test set is ``data.test_dataset`` when set, else the test set ``data.dataset``
        gives (``test_split``); ``train_set`` stays None and no client rows exist.
        """
        if self.test_set is not None:
            return
        self.test_set = self._global_test()

    def _global_test(self):
        """``data.test_dataset``'s rows, else the test set of ``data.dataset``."""
        if self.test_dataset is not None:
            names = self._run_class_names("data.test_dataset")
            self.class_names = names
            return self._capped(self._load_test_dataset(names))
        names = self._run_class_names("data.partition.kind=folders (or node-local data)")
        _, test, class_names = self._load_dataset()
        if [n.lower() for n in class_names] != [n.lower() for n in names]:
            raise ValueError(
                f"data.dataset={self.dataset!r} (the global test set) has the classes "
                f"{class_names}, not data.class_names {names}; set data.test_dataset to a "
                "test set of the run's classes."
            )
        self.class_names = names
        return test

    def _load_test_dataset(self, class_names: list[str]):
        """``data.test_dataset``'s rows, labelled in ``class_names`` order."""
        return load_local_source(
            self.test_dataset,
            class_names,
            self.image_column,
            self.label_column,
            self.max_unreadable_fraction,
            "data.test_dataset",
        ).rows

    def _use_sources(self, owned: dict, tests: dict | None, num_clients: int) -> None:
        """One training set of the owners' rows (client by client, then their test rows)."""
        from datasets import concatenate_datasets

        class_names = self._run_class_names("data.partition.kind=folders")
        parts, start = [], 0
        blocks: dict[str, list[np.ndarray]] = {"train": [], "test": []}
        for name, group in (("train", owned), ("test", tests or {})):
            for client in range(num_clients):
                source = group.get(client)
                n = 0 if source is None else source.num_samples
                blocks[name].append(np.arange(start, start + n, dtype=np.int64))
                if source is not None:
                    parts.append(source.rows)
                start += n
        train = concatenate_datasets(parts)
        labels = np.asarray(train[self.label_column], dtype=np.int64)
        if self.local_test_fraction is not None and tests is None:
            partitions, local = blocks["train"], []
            for client, rows in enumerate(partitions):
                if client in owned:
                    rows, test_rows = split_local_test(
                        rows, self.local_test_fraction, self.partition.seed, client
                    )
                else:
                    test_rows = rows
                partitions[client] = rows
                local.append(test_rows)
            self._use_partitions(train, labels, partitions, class_names, local)
        else:
            held = blocks["test"] if tests is not None else None
            self._use_partitions(train, labels, blocks["train"], class_names, held)
        self.sources = dict(owned)

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

    def set_image_transform(self, transform: Callable) -> None:
        """The model's own preprocessing (CLIP resize, crop, normalise)."""
        self.image_transform = transform

    def collate(self, rows: list[dict]) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """Dataset rows -> ``(pixels, labels [B])``.

        ``data.preprocess: processor``: float pixels ``[B, 3, H, W]``, the model's
        preprocessing applied per image. ``device``: the decoded uint8 RGB images, one tensor
        ``[B, 3, H, W]`` (a list of ``[3, H, W]`` when their sizes differ), which the method
        preprocesses on its device (:meth:`~flora_lightning.methods.base.FederatedCLIPModule.
        prepare_images`).
        """
        labels = torch.tensor([row[self.label_column] for row in rows], dtype=torch.long)
        if self.preprocess == "device":
            images = [decode_image(row[self.image_column]) for row in rows]
            if len({image.shape for image in images}) == 1:
                return stack_images(images), labels
            return [image.contiguous() for image in images], labels
        pixels = torch.stack([self.image_transform(row[self.image_column]) for row in rows])
        return pixels, labels

    def train_rows(self, indices):
        """The training-set rows at ``indices``, in that order (one ``datasets`` selection)."""
        return self.train_set.select(indices)

    def client_dataset(self, client_id: int):
        return self.train_rows(self.client_indices[client_id])

    def client_dataloader(
        self, client_id: int, generator: torch.Generator, batch_sampler=None
    ) -> DataLoader:
        """Shuffled loader over one client's partition; ``generator`` fixes the order.

        With ``batch_sampler`` (sample-level DP-SGD's
        :class:`~flora_lightning.privacy.poisson.PoissonBatchSampler`) it draws the batches
        instead, as the cached-feature loader does with the same sampler.
        """
        if batch_sampler is not None:
            # imported on use: the privacy package loads Opacus, which data-only users skip
            from flora_lightning.privacy.poisson import poisson_loader

            return poisson_loader(
                self.client_dataset(client_id), batch_sampler, self.collate, self.num_workers
            )
        return DataLoader(
            self.client_dataset(client_id),
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )

    def client_test_dataset(self, client_id: int):
        """One client's local test set (``data.local_test_fraction`` of its partition)."""
        if not self.has_local_test:
            raise ValueError(
                "data.local_test_fraction is null (and no client test paths): clients hold no "
                "local test sets. Set it, "
                "e.g. --data.local_test_fraction 0.2, for personalised evaluation."
            )
        return self.train_rows(self.client_test_indices[client_id])

    def client_test_dataloader(self, client_id: int) -> DataLoader:
        """Loader over one client's local test set, in order (for evaluation)."""
        return DataLoader(
            self.client_test_dataset(client_id),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(
            self.test_set,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )
