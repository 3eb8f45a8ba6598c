"""Accuracy against epsilon: FLoRA and FLoRA with a frozen A (FFA-LoRA) under DP.

Usage::

    python experiments/privacy_tradeoff.py --out runs/privacy
    python experiments/privacy_tradeoff.py --out runs/privacy --epsilons [1, 8] --rounds 3

For every level (``sample``: DP-SGD in each local fit; ``client``: DP-FedAvg), every variant
(``flora``; ``flora_freeze_a``: ``--model.lora.freeze_a true``; at client level also
``flora_adaptive``: adaptive clipping) and every epsilon, one
``flora fit`` run of ``--config`` (the offline quickstart by default) with
``--privacy.target_epsilon`` (the noise multiplier is picked for the planned rounds) writes to
``OUT/<level>/<variant>/eps<epsilon>``; epsilon ``inf`` is the non-private run of the variant
(shared by both levels), and ``OUT/<level>/<variant>/clip_only`` the level with noise
multiplier 0 (its clipping, and at sample level DP-SGD's per-example loss, without noise). Writes ``OUT/results.json``, ``OUT/results.md`` (one row per level and
variant, one column per epsilon: final test accuracy, and the epsilon actually reached) and
``OUT/accuracy_vs_epsilon.png``.

Client-level DP needs many clients per round to add little noise per client (sigma * C / m);
the quickstart has 5, so expect a large accuracy cost there: that is the measurement.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from flora_lightning.stages import fit

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
VARIANTS = {
    "flora": [],
    "flora_freeze_a": ["--model.lora.freeze_a", "true"],
    # client level only. Andrew et al.'s sigma_b = m / 20 leaves no budget with 5 clients per
    # round (sigma must stay below 2 sigma_b), so the count's noise is sigma_b = m = 5 here.
    "flora_adaptive": [
        "--privacy.adaptive_clipping",
        "true",
        "--privacy.clipped_count_stddev",
        "5",
    ],
}
LEVEL_VARIANTS = {
    "sample": ("flora", "flora_freeze_a"),
    "client": ("flora", "flora_freeze_a", "flora_adaptive"),
}
NONPRIVATE_OF = {"flora_adaptive": "flora"}
"""A variant whose settings exist only under DP shares the non-private run of another."""


def run_one(config: Path, run_dir: Path, level: str, epsilon: float, variant: str,
            common: list[str], clip_only: bool = False) -> dict:  # fmt: skip
    """One fit; returns its row (reuses a finished run folder). ``clip_only``: the level's
    clipping (and, at sample level, its per-example loss) with noise multiplier 0."""
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        seconds = None
    else:
        args = ["--config", str(config), "--trainer.default_root_dir", str(run_dir), *common]
        private = clip_only or math.isfinite(epsilon)
        args += VARIANTS[variant if private else NONPRIVATE_OF.get(variant, variant)]
        if clip_only:
            args += ["--privacy.level", level, "--privacy.noise_multiplier", "0"]
        elif math.isfinite(epsilon):
            args += ["--privacy.level", level, "--privacy.target_epsilon", str(epsilon)]
        start = time.perf_counter()
        summary = fit(args)
        seconds = time.perf_counter() - start
    privacy = summary.get("privacy", {})
    return {
        "level": level,
        "variant": variant,
        "target_epsilon": epsilon,
        "clip_only": clip_only,
        "epsilon": privacy.get("epsilon", math.inf),
        "noise_multiplier": privacy.get("noise_multiplier", 0.0),
        "sampling": privacy.get("sampling"),
        "final_test_acc": summary["final_test_acc"],
        "best_test_acc": summary["best_test_acc"],
        "seconds": seconds,
    }


def main(
    out: Path = Path("runs/privacy"),
    config: Path = QUICKSTART,
    epsilons: tuple[float, ...] = (1.0, 4.0, 8.0, math.inf),
    levels: tuple[str, ...] = ("sample", "client"),
    rounds: int = 5,
    max_local_steps: int = 5,
    extra: tuple[str, ...] = (),
    clip_only: bool = True,
    results: Path | None = None,
) -> list[dict]:
    """Run the grid and write results.json, results.md and accuracy_vs_epsilon.png.

    Args:
        out: output folder (finished runs in it are reused).
        config: the ``flora fit`` config every run starts from.
        epsilons: target epsilons; ``inf`` is the non-private run.
        levels: privacy levels (``sample``, ``client``).
        rounds: communication rounds of every run.
        max_local_steps: local steps per client per round.
        extra: more ``flora fit`` arguments for every run.
        clip_only: also run each level with noise multiplier 0: its clipping (and, at sample
            level, DP-SGD's per-example loss) without noise, which separates the cost of the
            noise from the change of loss and clipping.
        results: also write the table, the rows and the plot as dated files
            ``<results>/<date>-privacy-tradeoff.{md,json,png}`` (the docs link to them).
    """
    common = ["--trainer.rounds", str(rounds), "--trainer.max_local_steps",
              str(max_local_steps), "--trainer.progress", "false", *extra]  # fmt: skip
    rows = []
    for level in levels:
        for variant in LEVEL_VARIANTS[level]:
            for epsilon in epsilons:
                name = f"eps{epsilon:g}" if math.isfinite(epsilon) else "nonprivate"
                shared = NONPRIVATE_OF.get(variant, variant)
                folder = out / (shared if not math.isfinite(epsilon) else f"{level}/{variant}")
                rows.append(run_one(config, folder / name, level, epsilon, variant, common))
                print(json.dumps(rows[-1]))
            if clip_only:
                folder = out / level / variant / "clip_only"
                rows.append(run_one(config, folder, level, math.inf, variant, common, True))
                print(json.dumps(rows[-1]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(table(rows, epsilons))
    plot(rows, out / "accuracy_vs_epsilon.png")
    if results is not None:
        write_results(results, rows, epsilons, rounds, max_local_steps, config, extra)
    return rows


def write_results(folder: Path, rows: list[dict], epsilons: tuple[float, ...], rounds: int,
                  max_local_steps: int, config: Path, extra: tuple[str, ...]) -> Path:  # fmt: skip
    """The dated results file (and its rows and plot) that the docs link to."""
    import datetime
    import platform

    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{datetime.date.today().isoformat()}-privacy-tradeoff"
    seconds = [r["seconds"] for r in rows if r["seconds"] is not None]
    sampling = sorted({r["sampling"] for r in rows if r["sampling"]})
    header = (
        "# Accuracy against epsilon (written by `python experiments/privacy_tradeoff.py`)\n\n"
        f"Config `{config.name}`{' ' + ' '.join(extra) if extra else ''}, {rounds} rounds x "
        f"{max_local_steps} local steps, delta 1e-5, noise multiplier picked for each target "
        "epsilon (Opacus RDP); final test accuracy, the epsilon reached in brackets. One seed. "
        f"Sample-level batches: {', '.join(sampling) or '-'} (privacy.sampling). Machine: "
        f"{platform.machine()}; {len(seconds)} of {len(rows)} runs ran in this invocation "
        f"({sum(seconds) / 60:.0f} min), the others were reused from its output folder.\n\n"
    )
    stem.with_suffix(".md").write_text(header + table(rows, epsilons))
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    plot(rows, stem.with_suffix(".png"))
    return stem.with_suffix(".md")


def table(rows: list[dict], epsilons: tuple[float, ...]) -> str:
    """Markdown: final accuracy per (level, variant) and target epsilon (reached epsilon)."""
    clipped = any(r["clip_only"] for r in rows)
    head = ["level", "variant", *(f"eps={e:g}" for e in epsilons)] + (
        ["clip only (sigma=0)"] if clipped else []
    )
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for level in dict.fromkeys(r["level"] for r in rows):
        for variant in LEVEL_VARIANTS[level]:
            cells = []
            for epsilon in epsilons:
                row = next(r for r in rows if (r["level"], r["variant"], r["target_epsilon"])
                           == (level, variant, epsilon) and not r["clip_only"])  # fmt: skip
                reached = "" if not math.isfinite(epsilon) else f" (eps {row['epsilon']:.2f})"
                cells.append(f"{row['final_test_acc']:.3f}{reached}")
            if clipped:
                row = next(r for r in rows if (r["level"], r["variant"]) == (level, variant)
                           and r["clip_only"])  # fmt: skip
                cells.append(f"{row['final_test_acc']:.3f}")
            lines.append(f"| {level} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Final accuracy against epsilon (non-private drawn as a dashed line per variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for level in dict.fromkeys(r["level"] for r in rows):
        for variant in LEVEL_VARIANTS[level]:
            points = sorted((r["target_epsilon"], r["final_test_acc"]) for r in rows
                            if (r["level"], r["variant"]) == (level, variant)
                            and math.isfinite(r["target_epsilon"]))  # fmt: skip
            clip = [r["final_test_acc"] for r in rows if r["clip_only"]
                    and (r["level"], r["variant"]) == (level, variant)]  # fmt: skip
            if clip:
                ax.axhline(clip[0], linestyle=":", linewidth=1,
                           label=f"{level} / {variant}, sigma=0")  # fmt: skip
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=f"{level} / {variant}")
    for variant in VARIANTS:
        if variant in NONPRIVATE_OF:
            continue
        base = [r["final_test_acc"] for r in rows
                if r["variant"] == variant and not math.isfinite(r["target_epsilon"])
                and not r["clip_only"]]  # fmt: skip
        if base:
            ax.axhline(base[0], linestyle="--", linewidth=1, label=f"non-private / {variant}")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("final test accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main)
