"""Run FLoRA and the paper's baselines on one config and tabulate them side by side.

Usage::

    python experiments/compare_methods.py --config configs/quickstart.yaml --out runs/compare
    python experiments/compare_methods.py --config configs/cifar10_noniid.yaml --rounds 5 \\
        --methods flora fedlc -- --trainer.precision bf16-mixed

Every method runs through the ``flora fit`` command line (:func:`flora_lightning.cli.run`) with
the same data and trainer settings, into ``OUT/<method>``. The method's own settings come from

1. the config itself, when its ``model`` is already that method;
2. else the sibling config ``<stem>_<method>.yaml`` (e.g. ``configs/quickstart_fedlc.yaml``): its
   ``model`` section only, so each method keeps its measured learning rate;
3. else ``--model <Class>``, which keeps the config's ``name_or_path`` and ``optimizer``.

Arguments after the script's own (or after ``--``) are passed to every run, e.g.
``--trainer.max_local_steps 5``. Writes ``OUT/results.md`` (Markdown table), ``OUT/results.csv``
and ``OUT/accuracy.png`` (test accuracy per round, one line per method).

On the offline quickstart (10 rounds, 2 CPU cores) the five runs take about 1.5 minutes when
the machine is otherwise idle (FedFFT about 20 s, FedAA about 2 s), several times that on a
busy one. Each run folder must be new: rerun into another ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import yaml

from flora_lightning.methods import METHODS
from flora_lightning.sweep.plots import plot_accuracy as sweep_plot

COLUMNS = {
    "method": "method",
    "trainable_params": "trainable params",
    "bytes_per_client_per_round": "bytes per round (per client, each way)",
    "round0_acc": "round-0 acc",
    "final_acc": "final acc",
    "best_acc": "best acc",
    "best_round": "best round",
    "seconds": "seconds",
    "seconds_per_round": "s/round",
}


def model_args(short: str, config: Path) -> list[str]:
    """The ``--model`` arguments that select method ``short`` on top of ``config``."""
    cls = METHODS[short]
    base = yaml.safe_load(config.read_text()).get("model") or {}
    if str(base.get("class_path", "")).rsplit(".", 1)[-1] == cls.__name__:
        return []
    sibling = config.with_name(f"{config.stem}_{short}.yaml")
    if sibling.exists():
        model = yaml.safe_load(sibling.read_text())["model"]
        return ["--model", json.dumps(model)]
    return ["--model", cls.__name__]


def run_method(
    short: str, config: Path, run_dir: Path, rounds: int | None, extra: list[str]
) -> dict:
    """One ``flora fit`` run; returns its summary plus the wall-clock seconds it took."""
    from flora_lightning.cli import run

    args = [
        "fit",
        "--config",
        str(config),
        *model_args(short, config),
        *extra,
        "--trainer.default_root_dir",
        str(run_dir),
    ]
    if rounds is not None:
        args += ["--trainer.rounds", str(rounds)]
    start = time.perf_counter()
    summary = run(args)
    summary["wall_seconds"] = time.perf_counter() - start
    return summary


def result_row(short: str, summary: dict) -> dict:
    rounds = summary["rounds"]
    trained = [r["seconds"] for r in rounds if r["round"] > 0]
    return {
        "method": summary["method"],
        "trainable_params": summary["trainable_params"],
        "bytes_per_client_per_round": summary["bytes_per_client_per_direction"],
        "round0_acc": rounds[0]["test_acc"],
        "final_acc": summary["final_test_acc"],
        "best_acc": summary["best_test_acc"],
        "best_round": summary["best_round"],
        "seconds": summary["wall_seconds"],
        "seconds_per_round": sum(trained) / len(trained) if trained else 0.0,
    }


def write_markdown(rows: list[dict], path: Path, config: Path) -> None:
    def cell(key, value):
        if key.endswith("_acc"):
            return f"{value:.4f}"
        if key in ("seconds", "seconds_per_round"):
            return f"{value:.1f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = [
        f"Methods compared on `{config}`.",
        "",
        "| " + " | ".join(COLUMNS.values()) + " |",
        "| " + " | ".join("---" if k == "method" else "---:" for k in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(cell(k, row[k]) for k in COLUMNS) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def plot_accuracy(summaries: dict[str, dict], path: Path) -> None:
    """Test accuracy per round, one line per method (``flora sweep``'s plot, one seed each)."""
    runs = {summary["method"]: [summary] for summary in summaries.values()}
    sweep_plot(runs, path, "test accuracy per round")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--config",
        type=Path,
        default=Path("configs/quickstart.yaml"),
        help="Config giving data and trainer settings (and FLoRA's).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/compare"),
        help="Output folder: one run folder per method plus the results.",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="Override trainer.rounds for every method."
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        help="Methods to run, in this order.",
    )
    args, extra = parser.parse_known_args(argv)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if not args.config.exists():
        parser.error(f"--config {args.config} does not exist.")
    return args, extra


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every chosen method, then write the table, CSV and plot; returns the table rows."""
    args, extra = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = {
        short: run_method(short, args.config, args.out / short, args.rounds, extra)
        for short in args.methods
    }
    rows = [result_row(short, summary) for short, summary in summaries.items()]
    write_markdown(rows, args.out / "results.md", args.config)
    write_csv(rows, args.out / "results.csv")
    plot_accuracy(summaries, args.out / "accuracy.png")
    print((args.out / "results.md").read_text())
    return rows


if __name__ == "__main__":
    main()
