"""``data.partition``: how the training set is split across clients (torch-free config).

:func:`~flora_lightning.data.partition.partition_indices` does the splitting; this module holds
only the settings and their checks, so ``flora`` can check them before the heavy imports
(:mod:`flora_lightning.config_check`).
"""

import math
from dataclasses import dataclass
from typing import Literal

_KINDS = ("iid", "dirichlet", "pathological", "fewshot", "folders")
_IID_RULES = ("per_class", "random_chunks")


@dataclass
class PartitionConfig:
    """How the training set is split across clients."""

    kind: Literal["iid", "dirichlet", "pathological", "fewshot", "folders"] = "iid"
    """Partition scheme: iid, dirichlet (non-IID by Dirichlet(beta) per class),
    pathological (disjoint classes per client), fewshot (n shots per class per client),
    folders (client k holds client_dirs[k]: the data owners' own data, nothing drawn)."""
    num_clients: int = 10
    """Number of clients (data owners); kind=folders: len(client_dirs)."""
    client_dirs: list[str] | None = None
    """kind=folders: one data path per client (client k = entry k): an imagefolder DIR (one
    sub-folder per class), a .parquet file or glob, or hub:ID[:SPLIT]."""
    client_test_dirs: list[str] | None = None
    """kind=folders: one local test set path per client (same syntax), instead of
    data.local_test_fraction; null: none."""
    iid_rule: Literal["per_class", "random_chunks"] = "per_class"
    """kind=iid: per_class (released; each class cut in row order, equal shares) or random_chunks."""
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
        if not isinstance(self.beta, int | float) or not math.isfinite(self.beta):
            raise ValueError(
                f"{p}beta must be a finite number (got {self.beta}); "
                "use e.g. 0.1 for strong non-IID or 1.0 for mild"
            )
        self._check_folders(p)
        if self.iid_rule not in _IID_RULES:
            raise ValueError(
                f"{p}iid_rule must be one of {', '.join(_IID_RULES)} (got {self.iid_rule!r}); "
                "per_class is the released code's IID split"
            )
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
            # flwr-datasets is imported only for a custom partitioner
            from flora_lightning.data.custom_partitioner import partitioner_class

            partitioner_class(self.partitioner)

    def _check_folders(self, p: str) -> None:
        """``client_dirs`` / ``client_test_dirs`` go with ``kind=folders`` and only with it."""
        if self.kind != "folders":
            for name in ("client_dirs", "client_test_dirs"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{p}{name} is read only with {p}kind=folders (got kind={self.kind}); "
                        f"set {p}kind=folders or remove {p}{name}"
                    )
            return
        if self.client_dirs is None:
            raise ValueError(
                f"{p}kind=folders needs {p}client_dirs: one data path per client, e.g. "
                f"{p}client_dirs=[sites/a, sites/b] (a folder with one sub-folder per class, "
                "a .parquet file or glob, or hub:ID:SPLIT)"
            )
        if isinstance(self.client_dirs, str) or not len(self.client_dirs):
            raise ValueError(
                f"{p}client_dirs must be a non-empty list of data paths, one per client "
                f"(got {self.client_dirs!r})"
            )
        repeated = sorted({d for d in self.client_dirs if self.client_dirs.count(d) > 1})
        if repeated:
            raise ValueError(
                f"{p}client_dirs names {repeated} more than once: two clients would hold the "
                "same data; give each client its own path"
            )
        if self.partitioner is not None:
            raise ValueError(
                f"{p}partitioner draws partitions; {p}kind=folders reads them from "
                f"{p}client_dirs: remove one of them"
            )
        tests = self.client_test_dirs
        if tests is not None and (isinstance(tests, str) or len(tests) != len(self.client_dirs)):
            raise ValueError(
                f"{p}client_test_dirs must list one test path per client, "
                f"{len(self.client_dirs)} like {p}client_dirs (got {tests!r})"
            )
        if self.num_clients != len(self.client_dirs):  # the saved config.yaml must say so too
            raise ValueError(
                f"{p}num_clients={self.num_clients} but {p}client_dirs lists "
                f"{len(self.client_dirs)} paths (kind=folders: one client per path); set "
                f"{p}num_clients={len(self.client_dirs)}"
            )
