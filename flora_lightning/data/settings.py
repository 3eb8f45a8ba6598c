"""``data.*`` settings: their values and checks, torch-free.

:class:`~flora_lightning.data.datamodule.FederatedDataModule` runs :func:`check_data_settings`
when it is built, and ``flora`` runs it before torch, datasets and the other heavy libraries are
imported (:mod:`flora_lightning.config_check`), so a wrong value is reported at once.
"""

from __future__ import annotations

import math
from typing import Literal

from flora_lightning.data.source_spec import check_source_exists

POOLED = "pooled"
"""``data.test_split`` value for the released code's protocol: pool, then hold out 20%."""

Preprocess = Literal["device", "processor"]
PREPROCESS = ("device", "processor")
"""Values of ``data.preprocess``."""


def check_data_settings(
    template: str,
    test_fraction: float,
    batch_size: int,
    eval_batch_size: int,
    max_test_samples: int | None,
    local_test_fraction: float | None,
    num_workers: int,
    preprocess: str,
    test_split: str | None,
    pool_splits: tuple[str, ...] | list[str],
    max_unreadable_fraction: float = 0.0,
    test_dataset: str | None = None,
    partition: object = None,
    class_names: list[str] | None = None,
    **_: object,
) -> None:
    """Refuse bad ``data.*`` values, naming the field and the fix.

    With ``partition.kind == "folders"`` the data paths (``data.partition.client_dirs``,
    ``client_test_dirs``, ``data.test_dataset``) must exist here (a hub split is not checked).
    """
    for field, value in (
        ("test_fraction", test_fraction),
        ("local_test_fraction", local_test_fraction),
        ("max_unreadable_fraction", max_unreadable_fraction),
    ):
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"data.{field} must be a finite number (got {value!r}).")
    if "{}" not in template:
        raise ValueError(
            f"data.template must contain '{{}}' where the class name goes (got {template!r}); "
            "e.g. 'a photo of a {}.'"
        )
    if not 0 < test_fraction < 1:
        raise ValueError(f"data.test_fraction must be in (0, 1) (got {test_fraction}).")
    if batch_size < 1 or eval_batch_size < 1:
        raise ValueError(
            f"data.batch_size and data.eval_batch_size must be >= 1 "
            f"(got {batch_size}, {eval_batch_size})."
        )
    if max_test_samples is not None and max_test_samples < 1:
        raise ValueError(f"data.max_test_samples must be >= 1 or null (got {max_test_samples}).")
    if local_test_fraction is not None and not 0 < local_test_fraction < 1:
        raise ValueError(
            f"data.local_test_fraction must be in (0, 1) or null (got "
            f"{local_test_fraction}); e.g. 0.2 keeps a fifth of each client's partition "
            "for its local test set."
        )
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0 (got {num_workers}).")
    if preprocess not in PREPROCESS:
        raise ValueError(
            f"data.preprocess must be device or processor (got {preprocess!r}); device "
            "resizes, crops and normalises on the model's device, processor per image in "
            "the loader."
        )
    if not 0 <= max_unreadable_fraction < 1:
        raise ValueError(
            f"data.max_unreadable_fraction must be in [0, 1) (got {max_unreadable_fraction}); "
            "0 refuses data with any unreadable image, e.g. 0.01 skips up to 1% of them."
        )
    if getattr(partition, "kind", None) == "folders" and not class_names:
        raise ValueError(
            "data.class_names is required with data.partition.kind=folders: every client's "
            "labels are matched to it by class name. List the classes in label order, e.g. "
            "--data.class_names '[cat, dog]'."
        )
    check_data_paths(partition, test_dataset, local_test_fraction)
    if test_split == POOLED and (not pool_splits or len(set(pool_splits)) < len(pool_splits)):
        raise ValueError(
            f"data.pool_splits must name one or more distinct splits (got {pool_splits}); "
            "e.g. [train, test]."
        )


def check_data_paths(
    partition: object, test_dataset: str | None, local_test_fraction: float | None = None
) -> None:
    """The local data paths exist (named in the error when one does not): ``data.test_dataset``
    and, with ``kind=folders``, the clients' paths.

    Args:
        partition: The ``data.partition`` settings (a ``PartitionConfig``, or None).
        test_dataset: ``data.test_dataset``.
        local_test_fraction: ``data.local_test_fraction`` (not with ``client_test_dirs``).
    """
    if test_dataset is not None:
        check_source_exists(test_dataset, "data.test_dataset")
    if getattr(partition, "kind", None) != "folders":
        return
    if getattr(partition, "client_test_dirs", None) is not None and local_test_fraction is not None:
        raise ValueError(
            "data.local_test_fraction and data.partition.client_test_dirs both give the "
            "clients local test sets: set one of them to null."
        )
    named = [
        (f"data.partition.{name}[{k}]", path)
        for name in ("client_dirs", "client_test_dirs")
        for k, path in enumerate(getattr(partition, name) or [])
    ]
    for field, path in named:
        check_source_exists(path, field)
