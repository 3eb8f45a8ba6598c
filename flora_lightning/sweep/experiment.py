"""What the measurement scripts in ``experiments/`` share: their command line, built from the
signature of their ``measure`` function, and writing their Markdown report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser


def run_measure(measure: Callable[..., Any], prog: str, doc: str, argv: list[str] | None = None):
    """Parse ``argv`` (default: ``sys.argv``) from ``measure``'s signature and run it; a
    ValueError it raises (a bad argument) is reported as a usage error (exit 2)."""
    parser = ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_function_arguments(measure)
    options = parser.parse_args(argv)
    try:
        return measure(**options.as_dict())
    except ValueError as err:
        parser.error(str(err))


def write_report(report: Path, lines: list[str]) -> None:
    """The report's lines to ``report`` (its folder made), then echoed to stdout."""
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))
    print(report.read_text())
