"""Checks of a train reply's fields before anything reads them: the server trusts no reply.

A reply comes from another party's machine. Each field is read through one of these checks,
which raise :class:`BadReply` with a short reason instead of whatever ``int()``, NumPy or torch
would raise: the strategy turns the reason into a rejection (:func:`bounded`, so a hostile
reply cannot fill the log or the round record), never into an exception of the ServerApp.

The array checks read only an :class:`~flwr.app.Array`'s metadata (``dtype``, ``shape``,
``stype``) and compare it with the arrays the server sent, so a reply of the wrong names,
shapes or dtype (big-endian, unicode, object, float64 for float32) is refused before any
bytes are copied, and before Flower's DP wrappers (which clip every reply) see it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from flora_lightning.strategy.base import MAX_REASON_CHARS, bounded

__all__ = ["MAX_REASON_CHARS", "BadReply", "bounded", "check_layout", "count", "layout", "real",
           "remote_error", "text", "to_checked_state"]  # fmt: skip


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?\w*(?:Error|Exception)\b[^:\s]*: \S")


def remote_error(reason: object) -> str:
    """The line of a node's error that names its exception (the last ``XError: message``
    line of a remote traceback, colours removed), so that the cause survives the bound on
    rejection reasons; the whole text when no line does."""
    text = _ANSI.sub("", str(reason))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line) and "ClientAppException" not in line:
            return line
    return text


class BadReply(ValueError):
    """A reply field that cannot be used; the message is the rejection reason."""


def _number(value: object, key: str) -> float:
    """``value`` as a finite float; bools, lists, strings, NaN and Inf are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BadReply(bounded(f"its {key!r} is not a number ({type(value).__name__})"))
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        raise BadReply(f"its {key!r} is out of range") from None
    if not math.isfinite(number):
        raise BadReply(f"its {key!r} is {number}")
    return number


def count(value: object, key: str, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` as an integer count in ``[minimum, maximum]`` (a float must be integral)."""
    number = _number(value, key)
    if not number.is_integer():
        raise BadReply(f"its {key!r} is not a whole number ({number:g})")
    whole = int(value) if isinstance(value, (int, np.integer)) else int(number)
    if whole < minimum:
        raise BadReply(f"its {key!r} is {whole}, below {minimum}")
    if maximum is not None and whole > maximum:
        raise BadReply(bounded(f"its {key!r} is {whole}, above the bound {maximum}"))
    return whole


def real(value: object, key: str, minimum: float | None = None) -> float:
    """``value`` as a finite float, at least ``minimum`` when given."""
    number = _number(value, key)
    if minimum is not None and number < minimum:
        raise BadReply(f"its {key!r} is {number:g}, below {minimum:g}")
    return number


def text(value: object, key: str) -> str:
    """``value`` as a string (bounded); anything else is refused."""
    if not isinstance(value, str):
        raise BadReply(bounded(f"its {key!r} is not text ({type(value).__name__})"))
    return bounded(value)


def layout(record: ArrayRecord) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Name -> (serialization, dtype, shape) of ``record``'s arrays, from their metadata."""
    return {name: (a.stype, str(a.dtype), tuple(a.shape)) for name, a in record.items()}


def check_layout(record: ArrayRecord, expected: Mapping[str, tuple[str, str, tuple]]) -> None:
    """Refuse ``record`` unless its names, serialization, dtypes and shapes (metadata only,
    nothing deserialized) are those of ``expected`` (:func:`layout` of what was sent)."""
    got = layout(record)
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise BadReply(
            bounded(
                f"its tensor names differ from the global state (missing {missing[:3]}, "
                f"unexpected {extra[:3]})"
            )
        )
    for name, (stype, dtype, shape) in expected.items():
        if got[name][0] != stype:
            raise BadReply(bounded(f"tensor {name} is serialized as {got[name][0]!r}"))
        if got[name][1] != dtype:
            raise BadReply(bounded(f"tensor {name} has dtype {got[name][1]}, not {dtype}"))
        if got[name][2] != shape:
            raise BadReply(bounded(f"tensor {name} has shape {got[name][2]}, not {shape}"))


def to_checked_state(record: ArrayRecord, expected: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """``record`` as writable torch tensors, after :func:`check_layout`; the deserialized
    arrays must match their metadata too (the bytes could say otherwise)."""
    check_layout(record, expected)
    state = {}
    for name, array in record.items():
        try:
            data = array.numpy()
        except Exception as err:  # noqa: BLE001 - any decoding failure is the reply's
            reason = f"tensor {name} does not decode: {type(err).__name__}: {err}"
            raise BadReply(bounded(reason)) from None
        _, dtype, shape = expected[name]
        if str(data.dtype) != dtype or tuple(data.shape) != shape:
            raise BadReply(
                bounded(
                    f"tensor {name} decodes as {data.dtype} {tuple(data.shape)}, its "
                    f"metadata says {dtype} {shape}"
                )
            )
        state[name] = torch.from_numpy(np.array(data, copy=True))
    return state
