"""Run FLoRA and the paper's baselines on one config and tabulate them side by side.

Usage::

    python experiments/compare_methods.py --config configs/quickstart.yaml --out runs/compare
    python experiments/compare_methods.py --config configs/cifar10_noniid.yaml --rounds 5 \\
        --methods '[flora, fedlc]' -- --trainer.precision bf16-mixed

Every method runs through the ``flora fit`` command line (:func:`flora_lightning.cli.run`) with
the same data and trainer settings, into ``OUT/<method>``. The method's own settings come from

1. the config itself, when its ``model`` is already that method;
2. else the sibling config ``<stem>_<method>.yaml`` (e.g. ``configs/quickstart_fedlc.yaml``): its
   ``model`` section only, so each method keeps its measured learning rate;
3. else ``--model <Class>``, which keeps the config's ``name_or_path`` and ``optimizer``.

The script's own options are the typed parameters of :func:`compare`, parsed by jsonargparse
as ``flora fit`` parses its own (``--help`` lists them; ``--methods`` takes a list,
``--methods '[flora, fedlc]'``). Arguments after ``--`` are passed to every run, e.g.
``-- --trainer.max_local_steps 5``. Writes ``OUT/results.md`` (Markdown table), ``OUT/results.csv``
and ``OUT/accuracy.png`` (test accuracy per round, one line per method).

On the offline quickstart (10 rounds, 2 CPU cores) the five runs take about 1.5 minutes when
the machine is otherwise idle (FedFFT about 20 s, FedAA about 2 s), several times that on a
busy one. Each run folder must be new: rerun into another ``--out``.
"""

import csv
import json
import sys
import time
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse import ArgumentParser

from flora_lightning.methods import METHODS
from flora_lightning.sweep.plots import PlotsNotInstalledError, require_pyplot
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


Method = Literal[tuple(METHODS)]
"""A method's short name in :data:`flora_lightning.methods.METHODS` (``flora``, ``fedfft``, ...)."""


def compare(
    config: Path = Path("configs/quickstart.yaml"),
    out: Path = Path("runs/compare"),
    rounds: int | None = None,
    methods: tuple[Method, ...] = tuple(METHODS),
    fit_args: list[str] | None = None,
) -> list[dict]:
    """Run every chosen method, then write the table, CSV and plot; returns the table rows.

    Args:
        config: Config giving data and trainer settings (and FLoRA's).
        out: Output folder: one run folder per method plus the results.
        rounds: Override trainer.rounds for every method.
        methods: Methods to run, in this order.
        fit_args: Extra ``flora fit`` arguments for every run (on the command line: after ``--``).
    """
    if not config.exists():
        raise ValueError(f"config: {config} does not exist; pass an existing --config YAML.")
    require_pyplot()  # the plot comes last: without matplotlib, say so before any run
    out.mkdir(parents=True, exist_ok=True)
    summaries = {
        short: run_method(short, config, out / short, rounds, list(fit_args or []))
        for short in methods
    }
    rows = [result_row(short, summary) for short, summary in summaries.items()]
    write_markdown(rows, out / "results.md", config)
    write_csv(rows, out / "results.csv")
    plot_accuracy(summaries, out / "accuracy.png")
    print((out / "results.md").read_text())
    return rows


def build_parser() -> ArgumentParser:
    """The script's options, from :func:`compare`'s signature (``fit_args`` come after ``--``)."""
    parser = ArgumentParser(prog="compare_methods.py", description=__doc__.splitlines()[0])
    parser.add_function_arguments(compare, skip={"fit_args"})
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv`` (default: ``sys.argv``), then :func:`compare`; ``--`` starts ``fit_args``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, fit_args = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    parser = build_parser()
    options = parser.parse_args(own)
    try:
        return compare(**options.as_dict(), fit_args=fit_args)
    except (ValueError, PlotsNotInstalledError) as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
