"""Measure SVD factor alignment against the raw SVD factors and against resetting Adam moments.

Usage::

    python experiments/svd_factor_alignment.py --out runs/svd_alignment \\
        --report docs/results/2026-12-04-svd-factor-alignment.md

The SVD strategies (``LoraProductAverage``; ``SvdRedistribution`` with mixed client ranks)
rebuild ``B`` and ``A`` every round while each client keeps its Adam moments from the factors
it trained from (:mod:`flora_lightning.strategy.factor_alignment`). On ``--config`` (default
the offline quickstart) this runs, for every seed in ``--seeds`` (``trainer.seed``; the
partition keeps the config's seed):

- ``LoraProductAverage`` at the config's rank with ``factor_alignment`` none, sign and
  procrustes, and none with ``trainer.keep_client_optimizer_state: false`` (a fresh Adam every
  round: the moments reset);
- ``SvdRedistribution`` with ``trainer.client_ranks`` ``--hetero_ranks`` (default docs/strategies.md's
  tiers: 60% rank 2, 40% rank 1), with none, sign and the reset. Mixed ranks need
  ``model.lora.alpha: null`` (the quickstart's default; another config must set it).

Every run goes through the ``flora fit`` command line (:func:`flora_lightning.cli.run`) into
``OUT/<setting>-<variant>-seed<seed>``. A folder that already holds a finished run (its
``final/`` model, written after the last round) is read back instead of run again (an
interrupted measurement resumes; the report names the runs read back); delete a folder to
rerun it. The report (a Markdown file) holds the command, the final and best test accuracy of
every run and their means over seeds; it is written by this script only.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from flora_lightning.sweep.experiment import run_measure, write_report

LORA_PRODUCT = {
    "none": ["--trainer.strategy.factor_alignment", "none"],
    "sign": ["--trainer.strategy.factor_alignment", "sign"],
    "procrustes": ["--trainer.strategy.factor_alignment", "procrustes"],
    "reset moments": [
        "--trainer.strategy.factor_alignment",
        "none",
        "--trainer.keep_client_optimizer_state",
        "false",
    ],
}
"""``LoraProductAverage`` variants: label -> ``flora fit`` arguments."""
SVD_REDISTRIBUTION = {
    "none": LORA_PRODUCT["none"],
    "sign": LORA_PRODUCT["sign"],
    "reset moments": LORA_PRODUCT["reset moments"],
}
"""``SvdRedistribution`` variants (a rotation would change lower ranks' slices)."""


def settings(hetero_ranks: str) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """Setting name -> (its ``flora fit`` arguments, its variants)."""
    return {
        "LoraProductAverage": (["--trainer.strategy", "LoraProductAverage"], LORA_PRODUCT),
        "SvdRedistribution": (
            [
                "--trainer.strategy",
                "SvdRedistribution",
                "--trainer.client_ranks",
                hetero_ranks,
            ],
            SVD_REDISTRIBUTION,
        ),
    }


def run_one(config: Path, args: list[str], seed: int, run_dir: Path) -> dict:
    """One ``flora fit`` run (or the finished one in ``run_dir``); its final and best test
    accuracy, wall seconds (None when read back) and whether it was read back."""
    from flora_lightning.cli import run

    if (run_dir / "final").is_dir():  # written after the last round (summary.json is per round)
        summary = json.loads((run_dir / "summary.json").read_text())
        return {**accuracy(summary), "seconds": None, "read_back": True}
    start = time.perf_counter()
    summary = run(
        [
            "fit",
            "--config",
            str(config),
            *args,
            "--trainer.seed",
            str(seed),
            "--trainer.progress",
            "false",
            "--trainer.default_root_dir",
            str(run_dir),
        ]
    )
    return {**accuracy(summary), "seconds": time.perf_counter() - start, "read_back": False}


def accuracy(summary: dict) -> dict:
    """Final and best test accuracy, the best round and the per-round accuracy of a run."""
    return {
        "final": summary["final_test_acc"],
        "best": summary["best_test_acc"],
        "best_round": summary["best_round"],
        "accuracy": [r["test_acc"] for r in summary["rounds"]],
    }


def table(setting: str, results: dict[str, dict[int, dict]], seeds: list[int]) -> list[str]:
    """Markdown rows: one per variant, final / best per seed ("not run" where missing), then
    their means over the seeds that ran (how many in brackets when not all)."""
    head = " | ".join(f"seed {s} final / best" for s in seeds)
    lines = [
        f"### {setting}",
        "",
        f"| factor alignment | {head} | mean final | mean best |",
        "| --- | " + " | ".join("---:" for _ in seeds) + " | ---: | ---: |",
    ]
    for variant, by_seed in results.items():
        ran = [s for s in seeds if s in by_seed]
        if not ran:
            continue
        cells = [
            f"{by_seed[s]['final']:.4f} / {by_seed[s]['best']:.4f}" if s in by_seed else "not run"
            for s in seeds
        ]
        count = "" if len(ran) == len(seeds) else f" ({len(ran)} seed{'s' * (len(ran) > 1)})"
        mean_final = sum(by_seed[s]["final"] for s in ran) / len(ran)
        mean_best = sum(by_seed[s]["best"] for s in ran) / len(ran)
        lines.append(
            f"| {variant} | "
            + " | ".join(cells)
            + f" | {mean_final:.4f}{count} | {mean_best:.4f}{count} |"
        )
    return [*lines, ""]


def measure(
    config: Path = Path("configs/quickstart.yaml"),
    out: Path = Path("runs/svd_alignment"),
    report: Path = Path("docs/results/2026-12-04-svd-factor-alignment.md"),
    seeds: list[int] | None = None,
    hetero_ranks: str = "[{rank: 2, share: 0.6}, {rank: 1, share: 0.4}]",
    only: list[str] | None = None,
    variants: list[str] | None = None,
    report_only: bool = False,
) -> dict:
    """Run every setting and variant for every seed, then write the report; returns the results.

    Args:
        config: Config giving model, data and trainer settings.
        out: Output folder: one run folder per setting, variant and seed, plus results.json.
        report: The Markdown report to write.
        seeds: ``trainer.seed`` of the runs (default 42, 43, 44).
        hetero_ranks: ``trainer.client_ranks`` of the SvdRedistribution runs.
        only: Settings to run (default both: LoraProductAverage, SvdRedistribution).
        variants: Variants to run where a setting has them (default all: none, sign,
            procrustes, reset moments).
        report_only: Run nothing: write the report from the finished runs in ``out`` (a run
            not there is shown as not run and left out of the means).
    """
    if not config.exists():
        raise ValueError(f"config: {config} does not exist; pass an existing --config YAML.")
    seeds = seeds or [42, 43, 44]
    chosen = settings(hetero_ranks)
    unknown = sorted(set(only or []) - set(chosen))
    if unknown:
        raise ValueError(f"only: unknown setting(s) {unknown}; choose from {sorted(chosen)}.")
    known = set(LORA_PRODUCT) | set(SVD_REDISTRIBUTION)
    if set(variants or []) - known:
        raise ValueError(
            f"variants: unknown {sorted(set(variants) - known)}; from {sorted(known)}."
        )
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[int, dict]]] = {}
    for setting in only or list(chosen):
        base, chosen_variants = chosen[setting]
        results[setting] = {}
        for variant, extra in chosen_variants.items():
            if variants and variant not in variants:
                continue
            results[setting][variant] = {}
            for seed in seeds:
                folder = out / f"{setting}-{variant.replace(' ', '_')}-seed{seed}"
                if report_only and not (folder / "final").is_dir():
                    continue
                result = run_one(config, [*base, *extra], seed, folder)
                results[setting][variant][seed] = result
                print(f"{setting} {variant} seed {seed}: {result}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    command = shlex.join(["python", "experiments/svd_factor_alignment.py", *sys.argv[1:]])
    lines = [
        "# SVD factor alignment vs raw SVD factors vs reset Adam moments",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command}` on `{config}` "
        f"({sum(len(r) for v in results.values() for r in v.values())} runs; test accuracy "
        "after the "
        "last round / best over rounds 0..N). Reset moments: "
        "`trainer.keep_client_optimizer_state: false` (a fresh Adam every round) with the raw "
        f"SVD factors. SvdRedistribution runs use `trainer.client_ranks: {hetero_ranks}`.",
        "",
    ]
    read_back = [
        f"{setting} {variant} seed {seed}"
        for setting, by_variant in results.items()
        for variant, by_seed in by_variant.items()
        for seed, result in by_seed.items()
        if result["read_back"]
    ]
    if read_back:
        lines += [
            "Read back from the finished run folders in "
            f"`{out}` (run by earlier invocations of this script with the same settings, not "
            f"rerun): {', '.join(read_back)}.",
            "",
        ]
    for setting, by_variant in results.items():
        lines += table(setting, by_variant, seeds)
    write_report(report, lines)
    return results


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default: ``sys.argv``) from :func:`measure`'s signature, then run it."""
    return run_measure(measure, "svd_factor_alignment.py", __doc__, argv)


if __name__ == "__main__":
    main()
