"""How ``flora`` reports a failure: expected errors as one line, bugs as bugs, tracebacks in the log.

Every exception that ends a command is sorted into one of four kinds (:func:`classify`):

- ``config`` (exit 2): the command or its config is wrong — a jsonargparse parse error, a
  :class:`ConfigError` found before the heavy imports, or a ``ValueError`` / ``TypeError`` /
  ``KeyError`` / ``FileExistsError`` / ``FileNotFoundError`` / ``NotADirectoryError`` raised on
  purpose by our own validation (a ``raise`` statement in this package), or a model/dataset that
  cannot be loaded here (:class:`~flora_lightning.clip.hub.NotAvailableError`). Fix: the arguments.
- ``runtime`` (exit 1): the run failed for a reason outside the config — a full or read-only
  disk (:class:`~flora_lightning.rundir.checkpoint.RunDirWriteError`), a damaged file
  (:class:`~flora_lightning.rundir.checkpoint.CorruptCheckpointError`), or another error our code
  raises on purpose (e.g. too few clients accepted).
- ``oom`` (exit 1): out of GPU memory (``torch.cuda.OutOfMemoryError``) or of RAM.
- ``internal`` (exit 1): anything else — a bug of ours or of a library, never shown as a
  config error.

The traceback of a runtime, out-of-memory or internal error is written to the run directory's
``flora.log`` (:func:`run_log`), which also receives the run's log lines.
"""

from __future__ import annotations

import argparse
import errno
import linecache
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

PACKAGE_DIR = Path(__file__).resolve().parent
LOG_NAME = "flora.log"
CONFIG_EXIT, RUNTIME_EXIT = 2, 1

# errnos that only a write produces: disk full, quota, read-only, file too large
_ONLY_ON_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
_ON_PURPOSE_CONFIG = (
    ValueError,
    TypeError,
    KeyError,
    FileExistsError,
    FileNotFoundError,
    NotADirectoryError,
)


class ConfigError(ValueError):
    """A config problem found before anything is built (a config file, the run directory)."""


@dataclass(frozen=True)
class Report:
    """What ``flora`` prints and returns for an exception."""

    kind: str
    """``config``, ``runtime``, ``oom`` or ``internal``."""
    message: str
    """The text after ``flora: error: `` (one line, except for deliberately listed details)."""
    exit_code: int
    """2 for config errors, 1 for everything else."""


def _innermost(tb: TracebackType | None) -> TracebackType | None:
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def raised_on_purpose(err: BaseException) -> bool:
    """Whether ``err`` comes from a ``raise`` statement in this package (not from a library,
    and not an accident such as ``None + 1`` in our own code)."""
    tb = _innermost(err.__traceback__)
    if tb is None:
        return False
    filename = Path(tb.tb_frame.f_code.co_filename)
    if PACKAGE_DIR not in filename.resolve().parents:
        return False
    return linecache.getline(str(filename), tb.tb_lineno).lstrip().startswith("raise")


def our_config_cause(err: BaseException) -> BaseException | None:
    """The config error of ours that a jsonargparse error wraps, if any: instantiating a
    Union-typed class (``trainer.strategy``) re-raises our ``__init__``'s ValueError as "Does
    not validate against any of the Union subtypes", chained to ours."""
    tb = _innermost(err.__traceback__)
    module = "" if tb is None else tb.tb_frame.f_globals.get("__name__", "")
    if not module.startswith("jsonargparse"):
        return None
    seen, cause = {id(err)}, err.__cause__ or err.__context__
    while cause is not None and id(cause) not in seen:
        if raised_on_purpose(cause) and isinstance(cause, _ON_PURPOSE_CONFIG):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _text(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1:
        return str(err.args[0])  # not KeyError's repr with quotes
    return str(err)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _is_cuda_oom(err: BaseException) -> bool:
    torch = sys.modules.get("torch")  # only loaded modules can have raised it
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return oom is not None and isinstance(err, oom)


def _loaded(module: str, *names: str) -> tuple[type, ...]:
    """Exception classes of ``flora_lightning.<module>`` if it is imported (only then can it
    have raised them): classifying a config error found early imports nothing heavy."""
    loaded = sys.modules.get(f"flora_lightning.{module}")
    return tuple(getattr(loaded, name) for name in names if hasattr(loaded, name))


def classify(err: BaseException) -> Report:
    """Sort an exception into config / runtime / oom / internal, with its message."""
    if isinstance(err, argparse.ArgumentError):  # jsonargparse parse errors
        return Report("config", _one_line(str(err)), CONFIG_EXIT)
    if isinstance(err, ConfigError):
        return Report("config", str(err), CONFIG_EXIT)
    if _is_cuda_oom(err):
        first = _one_line(str(err))[:300]
        return Report(
            "oom",
            f"out of GPU memory: {first} — reduce data.batch_size (and data.eval_batch_size), "
            "or use trainer.precision bf16-mixed; this is not a config error.",
            RUNTIME_EXIT,
        )
    if isinstance(err, MemoryError):
        return Report(
            "oom",
            f"out of memory (RAM){': ' + _text(err) if str(err) else ''} — reduce "
            "data.batch_size or data.num_workers, or run on a machine with more memory.",
            RUNTIME_EXIT,
        )
    if isinstance(err, _loaded("rundir.checkpoint", "RunDirWriteError", "CorruptCheckpointError")):
        return Report("runtime", str(err), RUNTIME_EXIT)
    if isinstance(err, OSError) and err.errno in _ONLY_ON_WRITE:  # a write elsewhere (TensorBoard)
        from flora_lightning.rundir.checkpoint import RunDirWriteError

        path = Path(err.filename or "(a file in the run directory)")
        return Report("runtime", str(RunDirWriteError(path, err, atomic=False)), RUNTIME_EXIT)
    if isinstance(err, _loaded("clip.hub", "NotAvailableError")):
        return Report("config", str(err), CONFIG_EXIT)
    cause = our_config_cause(err)
    if cause is not None:
        return Report("config", _text(cause), CONFIG_EXIT)
    if raised_on_purpose(err):
        if isinstance(err, _ON_PURPOSE_CONFIG):
            return Report("config", _text(err), CONFIG_EXIT)
        return Report("runtime", _text(err), RUNTIME_EXIT)
    first = _one_line(_text(err))[:300]
    return Report(
        "internal",
        f"internal error: {type(err).__name__}: {first} — this is a bug, please report it "
        "with the traceback (rerun with --debug, or see flora.log in the run directory).",
        RUNTIME_EXIT,
    )


class _RunLogHandler(logging.Handler):
    """Appends log records to ``<run_dir>/flora.log`` once ``run_dir`` exists.

    Records before that are held in memory and written when the folder appears, or dropped if
    it never does (a config error writes nothing) or if another process holds the folder's
    run lock (a run refused as a second writer leaves the holder's log alone). A failing write
    (full disk) is ignored: the log must never be what stops a run.
    """

    def __init__(self, run_dir: Path):
        super().__init__(logging.INFO)
        self.path = Path(run_dir) / LOG_NAME
        self.pending: list[str] = []
        self.file = None
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.pending.append(self.format(record))
            self.flush()
        except OSError:
            pass

    def flush(self) -> None:
        if not self.pending:
            return
        if self.file is None:
            if not self.path.parent.is_dir():
                return
            from flora_lightning.rundir.lock import holder

            if holder(self.path.parent) is not None:  # another process's run: not our log
                self.pending.clear()
                return
            self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self.file.write("".join(line + "\n" for line in self.pending))
        self.file.flush()
        self.pending.clear()

    def close(self) -> None:
        try:
            self.flush()
        except OSError:
            pass
        if self.file is not None:
            self.file.close()
        super().close()


@contextmanager
def run_log(run_dir: str | Path, what: str) -> Iterator[Path]:
    """Log lines of the block go to ``<run_dir>/flora.log``; so does the traceback of a failure
    that is not a config error (when ``run_dir`` exists by then). Yields the log's path."""
    handler = _RunLogHandler(Path(run_dir))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.path
    except Exception as err:
        if classify(err).kind != "config":
            record = logging.LogRecord(
                "flora_lightning", logging.ERROR, __file__, 0, "%s failed:", (what,),
                (type(err), err, err.__traceback__),
            )  # fmt: skip
            handler.handle(record)  # this handler only: the console gets the one-line message
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
