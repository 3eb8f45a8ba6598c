"""Paper-style tables and plots of a sweep, built only from the run directories under OUT.

Only finished cells count (:func:`~flora_lightning.sweep.rundir.run_state`), found by their
layout ``OUT/<dataset>/<partition>/<method>/seed<k>/``, so the report can be rebuilt at any time
(``flora sweep --report_only``) and from shards run on several machines into one OUT.

Written to ``OUT/report/``:

- ``results_<partition>.md|.csv|.tex``: methods (rows) x datasets (columns), best test accuracy
  over rounds 0..R in percent, mean ± sample standard deviation (n - 1) over seeds; the best
  mean of each column in bold; ``(n=k)`` marks entries with fewer seeds than the others; ``–``
  marks cells not finished (yet).
- ``cost.md|.csv|.tex``: per dataset and method, means over all its finished cells: seconds per
  round (rounds 1..R, feature caching excluded), the one-time feature caching, bytes sent per
  client per round each way, bytes up per round (all sampled clients), peak memory of local
  training and its growth over the memory in use when the client's fit started (max over cells;
  with the ``MemoryProfiler`` callback, else ``n/a``). On CPU the peak is the process's RSS,
  which in a sweep (all cells in one process) includes what earlier cells left; the growth
  is what the fit itself added.
- ``accuracy_<dataset>_<partition>.png``: test accuracy per round, one line per method, the
  mean over seeds with ± one standard deviation shaded.
- ``report.md``: all tables in one file, plus the cells that failed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from flora_lightning.sweep.plots import PlotsNotInstalledError, plot_accuracy, require_pyplot
from flora_lightning.sweep.rundir import RunState, read_failure, read_summary, run_state
from flora_lightning.sweep.tables import Table, write_table

MISSING = "–"
"""Shown for a table entry without any finished cell."""


@dataclass
class CellRecord:
    """A finished cell: where it sits in the grid and its ``summary.json``."""

    dataset: str
    partition: str
    method: str
    seed: int
    run_dir: Path
    summary: dict


def collect(out: str | Path) -> list[CellRecord]:
    """Every finished cell under ``out`` (layout ``<dataset>/<partition>/<method>/seed<k>``)."""
    out = Path(out)
    records = []
    for run_dir in sorted(out.glob("*/*/*/seed*")):
        seed = run_dir.name.removeprefix("seed")
        if not run_dir.is_dir() or not seed.lstrip("-").isdigit():
            continue
        if run_state(run_dir) is not RunState.FINISHED:
            continue
        dataset, partition, method = run_dir.relative_to(out).parts[:3]
        records.append(
            CellRecord(dataset, partition, method, int(seed), run_dir, read_summary(run_dir))
        )
    return records


def failures(out: str | Path) -> list[tuple[str, str]]:
    """(cell id, ``Type: message``) of every cell under ``out`` whose last run failed."""
    found = []
    for run_dir in sorted(Path(out).glob("*/*/*/seed*")):
        if run_state(run_dir) is RunState.FAILED:
            info = read_failure(run_dir) or {}
            cell = str(run_dir.relative_to(out))
            found.append((cell, f"{info.get('error_type')}: {info.get('message')}"))
    return found


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _ordered(found: list[str], preferred: list[str] | None) -> list[str]:
    """``preferred`` (the spec's order, including names without results) then the rest."""
    preferred = list(preferred or [])
    return preferred + sorted(set(found) - set(preferred))


def describe_partition(run_dir: Path) -> str:
    """``dirichlet, beta=0.1, 5 clients`` from a run's ``config.yaml``."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        p = config["data"]["partition"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "partition settings unknown"

    def show(key: str) -> str:
        return f"{key}={'null' if p.get(key) is None else p.get(key)}"

    parts = [str(p.get("kind"))]
    if p.get("kind") == "dirichlet":
        parts.append(show("beta"))
    if p.get("kind") == "pathological":
        parts.append(show("classes_per_client"))
    if p.get("kind") in ("pathological", "fewshot") and p.get("shots") is not None:
        parts.append(show("shots"))
    parts.append(f"{p.get('num_clients')} clients")
    return ", ".join(parts)


def accuracy_table(records: list[CellRecord], partition: str, methods, datasets) -> tuple:
    """The methods x datasets table of one partition, and its CSV rows (fractions, not %)."""
    chosen = [r for r in records if r.partition == partition]
    values = {
        (m, d): [r.summary["best_test_acc"] for r in chosen if (r.method, r.dataset) == (m, d)]
        for m in methods
        for d in datasets
    }
    most = max((len(v) for v in values.values()), default=0)
    rounds = max((r.summary["rounds"][-1]["round"] for r in chosen), default=0)
    setting = describe_partition(chosen[0].run_dir) if chosen else "no finished cells"
    title = (
        f"Partition `{partition}` ({setting}): best test accuracy (%) over rounds 0..{rounds}, "
        "mean ± std over seeds (sample std)."
    )
    table = Table(title, ["method", *datasets], [])
    csv_rows = []
    for method in methods:
        row, csv_row = [method], {"method": method}
        for dataset in datasets:
            accs = values[(method, dataset)]
            csv_row.update({f"{dataset}_acc_mean": "", f"{dataset}_acc_std": ""})
            csv_row[f"{dataset}_seeds"] = len(accs)
            if not accs:
                row.append(MISSING)
                continue
            mean, std = mean_std(accs)
            csv_row.update({f"{dataset}_acc_mean": mean, f"{dataset}_acc_std": std})
            text = f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if len(accs) > 1 else "")
            row.append(text + (f" (n={len(accs)})" if len(accs) < most else ""))
        table.rows.append(row)
        csv_rows.append(csv_row)
    for j, dataset in enumerate(datasets, start=1):
        means = {
            i: statistics.fmean(values[(m, dataset)])
            for i, m in enumerate(methods)
            if values[(m, dataset)]
        }
        if len(means) > 1:
            best = max(means.values())
            table.bold |= {(i, j) for i, v in means.items() if v == best}
    return table, csv_rows


def cost_table(records: list[CellRecord], methods, datasets) -> tuple:
    """Per dataset and method, means over its finished cells; and the CSV rows."""
    header = [
        "dataset",
        "method",
        "trainable params",
        "bytes/round/client (each way)",
        "bytes up/round (all clients)",
        "s/round",
        "feature caching (s)",
        "peak memory (MiB)",
        "memory growth (MiB)",
        "cells",
    ]
    measures = sorted({r.summary.get("memory_measure", "") for r in records} - {""})
    title = (
        "Cost per method: means over each dataset's finished cells (all partitions and seeds); "
        "s/round over rounds 1..R without the one-time feature caching; peak memory of local "
        "training and its growth during a client's fit: max over cells "
        f"({', '.join(measures) or 'not measured: add the MemoryProfiler callback'})."
    )
    table, csv_rows = Table(title, header, []), []
    for dataset in datasets:
        for method in methods:
            chosen = [r for r in records if (r.dataset, r.method) == (dataset, method)]
            if not chosen:
                continue
            trained = [[x for x in r.summary["rounds"] if x["round"] > 0] for r in chosen]
            per_round = [statistics.fmean(x["seconds"] for x in t) for t in trained if t]
            up = [statistics.fmean(x["bytes_up"] for x in t) for t in trained if t]
            peaks = [
                r.summary["peak_memory_bytes"] for r in chosen if "peak_memory_bytes" in r.summary
            ]
            growths = [r.summary.get("peak_memory_growth_bytes", 0) for r in chosen if peaks]
            s = chosen[0].summary
            row = {
                "dataset": dataset,
                "method": method,
                "trainable_params": s["trainable_params"],
                "bytes_per_client_per_round": s["bytes_per_client_per_direction"],
                "bytes_up_per_round": statistics.fmean(up) if up else None,
                "seconds_per_round": statistics.fmean(per_round) if per_round else None,
                "seconds_per_round_std": mean_std(per_round)[1] if per_round else None,
                "feature_caching_seconds": statistics.fmean(
                    r.summary.get("feature_caching_seconds", 0.0) for r in chosen
                ),
                "peak_memory_mib": max(peaks) / 2**20 if peaks else None,
                "memory_growth_mib": max(growths) / 2**20 if peaks else None,
                "cells": len(chosen),
            }
            csv_rows.append(row)
            spr = row["seconds_per_round"]
            table.rows.append(
                [
                    dataset,
                    method,
                    f"{row['trainable_params']:,}",
                    f"{row['bytes_per_client_per_round']:,}",
                    MISSING if not up else f"{row['bytes_up_per_round']:,.0f}",
                    MISSING if spr is None else f"{spr:.2f} ± {row['seconds_per_round_std']:.2f}",
                    f"{row['feature_caching_seconds']:.2f}",
                    "n/a" if not peaks else f"{row['peak_memory_mib']:,.0f}",
                    "n/a" if not peaks else f"{row['memory_growth_mib']:,.1f}",
                    str(row["cells"]),
                ]
            )
    return table, csv_rows


def build_report(out: str | Path, order: dict[str, list[str]] | None = None) -> Path:
    """Write every table and plot of the sweep in ``out`` to ``out/report``; returns report.md.

    Args:
        out: the sweep's output folder.
        order: optional ``datasets``/``partitions``/``methods`` -> names in the order the tables
            list them (the spec's; names without results show as ``–``); else sorted names.
    """
    out, order = Path(out), order or {}
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    records = collect(out)
    datasets = _ordered([r.dataset for r in records], order.get("datasets"))
    partitions = _ordered([r.partition for r in records], order.get("partitions"))
    methods = _ordered([r.method for r in records], order.get("methods"))
    sections = [f"# Sweep report: `{out}`", "", f"{len(records)} finished cells.", ""]
    try:  # the tables need nothing more; the plots need the plots extra
        require_pyplot()
        plots = True
    except PlotsNotInstalledError as err:
        plots = False
        sections += [f"Plots skipped: {err}", ""]
    for partition in partitions:
        table, rows = accuracy_table(records, partition, methods, datasets)
        write_table(table, rows, report / f"results_{partition}")
        sections += [table.markdown()]
        for dataset in datasets:
            runs = {
                m: [
                    r.summary
                    for r in records
                    if (r.dataset, r.partition, r.method) == (dataset, partition, m)
                ]
                for m in methods
            }
            if any(runs.values()) and plots:
                png = report / f"accuracy_{dataset}_{partition}.png"
                plot_accuracy(runs, png, f"{dataset}, partition {partition}")
                sections += [f"![{dataset} {partition}]({png.name})", ""]
    table, rows = cost_table(records, methods, datasets)
    write_table(table, rows, report / "cost")
    sections += [table.markdown()]
    failed = failures(out)
    if failed:
        sections += ["Failed cells (see their failed.json):", ""]
        sections += [f"- `{cell}`: {error}" for cell, error in failed] + [""]
    path = report / "report.md"
    path.write_text("\n".join(sections))
    return path
