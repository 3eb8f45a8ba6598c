"""``flora sweep``'s options, parser and entry point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flora_lightning.sweep.cells import Shard
from flora_lightning.sweep.report import build_report
from flora_lightning.sweep.runner import run_sweep
from flora_lightning.sweep.spec import SweepSpec, load_spec


@dataclass
class SweepOptions:
    """What ``flora sweep`` runs, where, and which part of it."""

    config: str | None = None
    """Sweep YAML (axes, base config, seeds), e.g. configs/sweeps/offline.yaml; optional with
    --report_only (it then only sets the tables' row and column order)."""
    out: str = "runs/sweep"
    """Output folder: a run directory per cell (<dataset>/<partition>/<method>/seed<k>),
    sweep.json and report/."""
    shard: str | None = None
    """Run only shard i of n, "i/n" with 1 <= i <= n (1-based): cell k of the sorted cells goes
    to shard k % n + 1. Each machine runs its own; --report_only builds the tables from all."""
    dry_run: bool = False
    """Validate every cell and list what would happen to each (run, resume, skip); run and
    write nothing."""
    report_only: bool = False
    """Only rebuild OUT/report (tables and plots) from the run directories under --out."""


def sweep_parser():
    """``flora sweep`` options (the two flags also work bare: ``--dry_run``)."""
    from jsonargparse import ActionYesNo, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="flora sweep",
        description=(
            "A grid of `flora fit` runs (datasets x partitions x methods x seeds) and "
            "paper-style tables; re-running skips finished cells and resumes interrupted ones."
        ),
        exit_on_error=False,
    )
    parser.add_class_arguments(SweepOptions, skip={"dry_run", "report_only"}, instantiate=False)
    # jsonargparse wants a value for a bool field; these two read better as bare flags.
    for name in ("dry_run", "report_only"):
        parser.add_argument(
            f"--{name}",
            action=ActionYesNo,
            nargs="?",
            default=False,
            help=_FLAG_HELP[name],
        )
    return parser


_FLAG_HELP = {
    "dry_run": "Validate every cell and list what would happen to each; write nothing.",
    "report_only": "Only rebuild OUT/report from the run directories under --out.",
}


def options_from(namespace) -> SweepOptions:
    values = namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)
    return SweepOptions(**{k: values[k] for k in SweepOptions.__dataclass_fields__ if k in values})


def spec_order(spec: SweepSpec) -> dict[str, list[str]]:
    """The spec's axis order, for the tables."""
    return {
        "datasets": list(spec.datasets),
        "partitions": list(spec.partitions),
        "methods": list(spec.methods),
    }


def run_command(options: SweepOptions) -> dict:
    """Run ``flora sweep``; returns the sweep record (with ``report``: the report.md path).

    Raises:
        ValueError: for a bad --shard, a missing --config, or any invalid entry or cell, all
            before any cell runs.
    """
    shard = Shard.parse(options.shard) if options.shard is not None else None
    if options.dry_run and options.report_only:
        raise ValueError("sweep: --dry_run and --report_only exclude each other; choose one.")
    spec = load_spec(options.config) if options.config is not None else None
    if options.report_only:
        if not Path(options.out).is_dir():
            raise ValueError(f"sweep --out {options.out} does not exist; nothing to report.")
        path = build_report(options.out, spec_order(spec) if spec else None)
        print(path.read_text())
        return {"out": options.out, "report": str(path)}
    if spec is None:
        raise ValueError(
            "sweep --config is required: a sweep YAML, e.g. configs/sweeps/offline.yaml "
            "(--report_only alone rebuilds the tables of an existing --out)."
        )
    record = run_sweep(spec, options.out, shard, dry_run=options.dry_run)
    if not options.dry_run:
        path = build_report(options.out, spec_order(spec))
        print(path.read_text())
        record["report"] = str(path)
    return record
