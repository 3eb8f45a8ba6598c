"""Refuse NaN and infinite numbers in config values, naming the field.

A range check lets them through more often than it looks: NaN compares false with everything,
so ``if x < 0: raise`` passes NaN (only the ``if not x > 0`` form catches it), and infinity
passes every lower bound. YAML (``.nan``, ``.inf``), the CLI (``1e400``) and Flower's TOML run
config (``nan``, ``inf``) all produce them. A NaN learning rate trains NaN weights, a NaN wait
never ends; so every float of a config is checked here first, before its range.

Standard library only: the torch-free settings modules use it before the heavy imports
(:mod:`flora_lightning.config_check`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping

_NO_DEFAULT = object()


def is_non_finite(value: object) -> bool:
    """True for a real, non-integer number (float, numpy float) that is NaN or +-infinity."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, numbers.Integral)  # ints are finite (and may not fit a float)
        and not math.isfinite(value)
    )


def _has_non_finite(value: object) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_has_non_finite(v) for v in value)
    return is_non_finite(value)


def check_finite(
    values: Mapping[str, object], defaults: Mapping[str, object] | None = None
) -> None:
    """Refuse the first value (or number inside a tuple or list value) that is NaN or infinite.

    Args:
        values: field name as the user writes it (``trainer.strategy.server_lr``) -> value.
        defaults: field name -> its default, shown as the example of a good value.

    Raises:
        ValueError: ``<field> must be a finite number (got nan); e.g. <default>.``
    """
    for name, value in values.items():
        if not _has_non_finite(value):
            continue
        default = (defaults or {}).get(name, _NO_DEFAULT)
        if default is _NO_DEFAULT:
            example = ""
        elif default is None:
            example = "; e.g. null (the default)"
        else:
            example = f"; e.g. {default!r} (the default)"
        what = "finite numbers" if isinstance(value, (tuple, list)) else "a finite number"
        raise ValueError(f"{name} must be {what} (got {value!r}){example}.")


def check_finite_fields(config: object, name: Callable[[str], str]) -> None:
    """:func:`check_finite` over every field of the dataclass instance ``config``.

    Args:
        config: a dataclass instance (its numbers of any declared type are checked).
        name: a field's name as the user writes it, from its attribute name (e.g.
            ``lambda f: f"model.optimizer.{f}"``).
    """
    fields = dataclasses.fields(config)
    check_finite(
        {name(f.name): getattr(config, f.name) for f in fields},
        {name(f.name): f.default for f in fields if f.default is not dataclasses.MISSING},
    )
