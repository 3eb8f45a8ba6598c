"""Measure FedAvg and the robust strategies under each ``trainer.attack`` (and none).

Usage::

    python experiments/robust_attacks.py --spec configs/sweeps/robust_attacks.yaml \\
        --out runs/robust_attacks --report docs/results/2026-12-05-robust-attacks.md

The spec (YAML, paths relative to it) names ``base`` (a ``flora fit`` config), ``strategies``
and ``attacks`` (name -> ``flora fit`` arguments; an attack ``[]`` is the clean run),
``seeds`` and ``overrides`` (arguments of every cell, last). Every cell
``strategy x attack x seed`` is one run through the ``flora fit`` command line
(:func:`flora_lightning.cli.run`) in ``OUT/<strategy>/<attack>/seed<k>``, with ``--trainer.seed
k``. A folder holding a finished run (``final/``) is read back, not rerun (an interrupted
measurement resumes; the report names what was read back). ``--only_strategies`` /
``--only_attacks`` run part of the grid. The report (Markdown, written by this script only)
holds the command, the cells' arguments and a table of final test accuracy (after the last
round; best over rounds in brackets), strategies as rows and attacks as columns, mean over the
seeds.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from flora_lightning.sweep.experiment import run_measure, write_report


def load_spec(path: Path) -> dict:
    """The spec, with ``base`` resolved against its folder; refuses missing keys."""
    spec = yaml.safe_load(path.read_text())
    missing = [k for k in ("base", "strategies", "attacks") if k not in (spec or {})]
    if missing:
        raise ValueError(f"{path}: missing {missing}; see configs/sweeps/robust_attacks.yaml.")
    spec["base"] = str((path.parent / spec["base"]).resolve())
    spec.setdefault("seeds", [0])
    spec.setdefault("overrides", [])
    return spec


def run_cell(spec: dict, strategy: str, attack: str, seed: int, run_dir: Path) -> dict:
    """One cell (or the finished run in ``run_dir``): final, best accuracy and seconds."""
    from flora_lightning.cli import run

    if (run_dir / "final").is_dir():
        summary = json.loads((run_dir / "summary.json").read_text())
        return {**accuracy(summary), "seconds": None, "read_back": True}
    start = time.perf_counter()
    summary = run(
        [
            "fit",
            "--config",
            spec["base"],
            *spec["strategies"][strategy],
            *spec["attacks"][attack],
            "--trainer.seed",
            str(seed),
            *spec["overrides"],
            "--trainer.default_root_dir",
            str(run_dir),
        ]  # fmt: skip
    )
    return {**accuracy(summary), "seconds": time.perf_counter() - start, "read_back": False}


def accuracy(summary: dict) -> dict:
    return {
        "final": summary["final_test_acc"],
        "best": summary["best_test_acc"],
        "attackers": [r.get("attackers", []) for r in summary["rounds"]],
    }


def table(results: dict, strategies: list[str], attacks: list[str]) -> list[str]:
    """Strategies (rows) x attacks (columns): mean final accuracy (mean best) over seeds."""
    lines = [
        "| strategy | " + " | ".join(attacks) + " |",
        "| --- | " + " | ".join("---:" for _ in attacks) + " |",
    ]
    for strategy in strategies:
        cells = []
        for attack in attacks:
            runs = list(results.get(strategy, {}).get(attack, {}).values())
            if not runs:
                cells.append("not run")
                continue
            final = sum(r["final"] for r in runs) / len(runs)
            best = sum(r["best"] for r in runs) / len(runs)
            cells.append(f"{final:.4f} ({best:.4f})")
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return lines


def measure(
    spec: Path = Path("configs/sweeps/robust_attacks.yaml"),
    out: Path = Path("runs/robust_attacks"),
    report: Path = Path("docs/results/robust-attacks.md"),
    only_strategies: list[str] | None = None,
    only_attacks: list[str] | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Run the grid's cells, then write the report; returns the results.

    Args:
        spec: The grid (see the module docstring).
        out: Output folder: one run folder per cell, plus results.json.
        report: The Markdown report to write.
        only_strategies: Run only these strategies of the spec (default all).
        only_attacks: Run only these attacks of the spec (default all).
        overrides: ``flora fit`` arguments after the spec's own overrides (e.g. fewer rounds).
    """
    if not spec.exists():
        raise ValueError(f"spec: {spec} does not exist.")
    grid = load_spec(spec)
    grid["overrides"] = [*grid["overrides"], *(overrides or [])]
    for axis, chosen in (("strategies", only_strategies), ("attacks", only_attacks)):
        unknown = sorted(set(chosen or []) - set(grid[axis]))
        if unknown:
            raise ValueError(f"only_{axis}: unknown {unknown}; the spec has {list(grid[axis])}.")
    strategies = [s for s in grid["strategies"] if not only_strategies or s in only_strategies]
    attacks = [a for a in grid["attacks"] if not only_attacks or a in only_attacks]
    results: dict = {}
    for strategy in strategies:
        for attack in attacks:
            for seed in grid["seeds"]:
                folder = out / strategy / attack / f"seed{seed}"
                result = run_cell(grid, strategy, attack, seed, folder)
                results.setdefault(strategy, {}).setdefault(attack, {})[seed] = result
                print(f"{strategy} / {attack} / seed {seed}: final {result['final']:.4f} "
                      f"best {result['best']:.4f}", flush=True)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    command = shlex.join(["python", "experiments/robust_attacks.py", *sys.argv[1:]])
    read_back = [
        f"{s}/{a}/seed{k}"
        for s, by_attack in results.items()
        for a, by_seed in by_attack.items()
        for k, r in by_seed.items()
        if r["read_back"]
    ]
    lines = [
        "# Robust aggregation under attack",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command}`: base "
        f"`{Path(grid['base']).name}`, seeds {grid['seeds']}, every cell with "
        f"`{shlex.join(grid['overrides'])}`. Test accuracy after the last round (best over "
        "rounds 0..R in brackets), mean over the seeds.",
        "",
        *table(results, strategies, attacks),
        "",
        "Arguments of each strategy and attack:",
        "",
        *[
            f"- {name}: `{shlex.join(args)}`"
            for name, args in grid["strategies"].items()
            if name in strategies
        ],  # fmt: skip
        *[
            f"- {name}: `{shlex.join(args) or '(no attack)'}`"
            for name, args in grid["attacks"].items()
            if name in attacks
        ],  # fmt: skip
        "",
    ]
    if read_back:
        lines += [f"Read back from finished runs in `{out}`: {', '.join(read_back)}.", ""]
    write_report(report, lines)
    return results


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default: ``sys.argv``) from :func:`measure`'s signature, then run it."""
    return run_measure(measure, "robust_attacks.py", __doc__, argv)


if __name__ == "__main__":
    main()
