"""``OwnersData``: the datamodule's setup when each data owner brings its own data.

Mixed into :class:`~flora_lightning.data.datamodule.FederatedDataModule`: with
``data.partition.kind: folders`` (client ``k`` holds ``client_dirs[k]``), on a Flower node
that reads only its own ``data-path`` (:meth:`OwnersData.setup_node`), and on a server that
holds no training data (:meth:`OwnersData.setup_server`). Each owner's data is loaded by
:func:`~flora_lightning.data.local_source.load_local_source` and labelled by class name in
``data.class_names`` order; the rows then take the same form as drawn partitions
(``FederatedDataModule._use_partitions``), so a node trains exactly as its in-process twin.
"""

from __future__ import annotations

import numpy as np

from flora_lightning.data.local_source import LocalSource, load_local_source
from flora_lightning.data.splits import resolve_class_names, split_local_test


class OwnersData:
    """Setup from the data owners' own paths (see the module docstring). Uses the
    datamodule's settings (``class_names``, ``image_column``, ``label_column``,
    ``max_unreadable_fraction``, ``partition``, ``local_test_fraction``, ``test_dataset``) and
    its ``_use_partitions``, ``_load_dataset`` and ``_capped``."""

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
