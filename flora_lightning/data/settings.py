"""``data.*`` settings: their values and checks, torch-free.

:class:`~flora_lightning.data.datamodule.FederatedDataModule` runs :func:`check_data_settings`
when it is built, and ``flora`` runs it before torch, datasets and the other heavy libraries are
imported (:mod:`flora_lightning.config_check`), so a wrong value is reported at once.
"""

from __future__ import annotations

from typing import Literal

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
    **_: object,
) -> None:
    """Refuse bad ``data.*`` values, naming the field and the fix."""
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
    if test_split == POOLED and (not pool_splits or len(set(pool_splits)) < len(pool_splits)):
        raise ValueError(
            f"data.pool_splits must name one or more distinct splits (got {pool_splits}); "
            "e.g. [train, test]."
        )
