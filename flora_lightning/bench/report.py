"""Ratios against FedFFT and the target checks (data), and ``bench.md`` rendered from that data.

The report is data first: :func:`derive` and :func:`check_targets` compute what ``bench.json``
holds; :func:`markdown` fills ``report_template.md`` (a ``str.format`` template next to this
module) and the two small templates below from that JSON alone, so ``bench.md`` can be
re-rendered from a saved ``bench.json``.
"""

from __future__ import annotations

import platform
from pathlib import Path

from flora_lightning.bench.config import LOOP_OVERHEAD_TARGET, TARGETS, BenchConfig
from flora_lightning.bench.privacy import markdown_section as dp_sgd_section

TEMPLATE_FILE = Path(__file__).with_name("report_template.md")
"""The document; ``{rows}`` is filled with one :data:`ROW` per method, ``{loop}`` with
:data:`LOOP` (or nothing), ``{dp_sgd_table}`` with the DP-SGD table (``bench/privacy.py``) or nothing."""
ROW = (
    "| {name} | {trainable_params:,} | {bytes_per_round_per_client:,} | {step_seconds:.3g} "
    "| {step_cpu_seconds:.3g} | {epoch_seconds:.4g} | {caching_seconds_per_round:.3g} "
    "| {round_seconds:.4g} | {peak_mb} | {peak_excl_runtime_mb} | {growth_mb} "
    "| {tflop_per_round:.3g} | {x_round} | {x_work} | {x_memory} / {x_memory_excl_runtime} "
    "| {x_bytes} |"
)
LOOP = (
    "\nLoop overhead (real FederatedLoop, {rounds} rounds of cached FLoRA, {clients} clients x "
    "{samples_per_client} synthetic samples, batch {batch_size}): {overhead_percent:.2f}% of a "
    "round ((seconds - train_seconds - eval_seconds) / seconds from summary.json); "
    "{wall_overhead_percent:.2f}% counting TensorBoard logging and checkpoints. Each client runs "
    "{local_steps} local steps, as a real epoch (5,000 samples at batch 128); a FLoRA step on "
    "cached features costs the same at either batch size.\n"
)


def derive(cfg: BenchConfig, results: list[dict]) -> list[dict]:
    """Add epoch/round extrapolations and the ratios against FedFFT to each worker result."""

    def epoch(step: float, last_step: float, per_image_loaded: float) -> float:
        """Full-batch steps, the last smaller one, and per-epoch loading of every image."""
        return cfg.full_steps_per_epoch * step + last_step + cfg.client_samples * per_image_loaded

    def amortised(per_image_encoded: float) -> float:
        """The one-time caching of every client image, spread over the rounds."""
        return cfg.client_samples * per_image_encoded / cfg.rounds

    rows = []
    for r in results:
        row = dict(r)
        row["loading_seconds_per_epoch"] = cfg.client_samples * r.get("load_seconds_per_image", 0)
        row["epoch_seconds"] = epoch(
            r["step_seconds"], r.get("last_step_seconds", 0.0), r.get("load_seconds_per_image", 0)
        )
        row["caching_seconds_per_client"] = cfg.client_samples * r["encode_seconds_per_image"]
        row["caching_seconds_per_round"] = amortised(r["encode_seconds_per_image"])
        row["round_seconds"] = row["epoch_seconds"] + row["caching_seconds_per_round"]
        row["flops_per_round"] = epoch(
            r.get("step_flops", 0), r.get("last_step_flops", 0), 0
        ) + amortised(r.get("encode_flops_per_image", 0))
        row["round_cpu_seconds"] = epoch(
            r["step_cpu_seconds"],
            r.get("last_step_cpu_seconds", 0.0),
            r.get("load_cpu_seconds_per_image", 0),
        ) + amortised(r["encode_cpu_seconds_per_image"])
        rows.append(row)
    fft = next((row for row in rows if row["method"] == "FedFFT"), None)
    ratios = {
        "step_speedup_vs_fft": "step_seconds",
        "round_speedup_vs_fft": "round_seconds",
        "step_speedup_vs_fft_cpu": "step_cpu_seconds",
        "round_speedup_vs_fft_cpu": "round_cpu_seconds",
        "memory_reduction_vs_fft": "peak_memory_bytes",
        "memory_excl_runtime_reduction_vs_fft": "peak_memory_excl_runtime_bytes",
        "memory_growth_reduction_vs_fft": "memory_growth_bytes",
        "bytes_reduction_vs_fft": "bytes_per_round_per_client",
        "params_reduction_vs_fft": "trainable_params",
        "work_reduction_vs_fft": "flops_per_round",
    }
    for row in rows:
        for ratio, key in ratios.items():
            row[ratio] = fft[key] / row[key] if fft is not None and row[key] > 0 else None
    return rows


def machine_description(cfg: BenchConfig) -> str:
    import torch

    if cfg.device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _timed_steps(rows: list[dict]) -> str:
    return ", ".join(f"{r['method']} {r.get('timed_steps', '?')}" for r in rows)


def _load_range(rows: list[dict]) -> str:
    loads = [load for r in rows for load in r["load_average"]]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"


def _x(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.1f}x"


def _mb(value: float) -> str:
    return f"{value / 1e6:,.0f}" if value >= 1e7 else f"{value / 1e6:,.2f}"


def _row(r: dict) -> str:
    return ROW.format(
        **r,
        name=f"{r['method']} (cached)" if r["cached"] else r["method"],
        peak_mb=_mb(r["peak_memory_bytes"]),
        peak_excl_runtime_mb=_mb(r["peak_memory_excl_runtime_bytes"]),
        growth_mb=_mb(r["memory_growth_bytes"]),
        tflop_per_round=r["flops_per_round"] / 1e12,
        x_round=_x(r["round_speedup_vs_fft"]),
        x_work=_x(r["work_reduction_vs_fft"]),
        x_memory=_x(r["memory_reduction_vs_fft"]),
        x_memory_excl_runtime=_x(r["memory_excl_runtime_reduction_vs_fft"]),
        x_bytes=_x(r["bytes_reduction_vs_fft"]),
    )


def _loop(loop: dict | None) -> str:
    if loop is None:
        return ""
    return LOOP.format(
        **loop,
        overhead_percent=100 * loop["overhead_fraction"],
        wall_overhead_percent=100 * loop["wall_overhead_fraction"],
        local_steps=loop["samples_per_client"] // loop["batch_size"],
    )


def markdown(report: dict) -> str:
    """``bench.md`` from ``bench.json``'s data (what :func:`~flora_lightning.bench.run_bench`
    returns): :data:`TEMPLATE_FILE` filled with the config, the rows and the checks."""
    cfg = BenchConfig(**report["config"])
    rows = report["methods"]
    remainder = cfg.client_samples % cfg.batch_size
    return TEMPLATE_FILE.read_text().format(
        **report["config"],
        arch_label={"vit-b-32": "ViT-B/32", "tiny": "tiny"}[cfg.arch],
        command=" ".join(cfg.to_argv()),
        machine=report["machine"],
        wall_seconds=report["wall_seconds"],
        cpu_count=report["cpu_count"],
        load_range=_load_range(rows),
        steps_per_epoch=cfg.steps_per_epoch,
        full_steps_per_epoch=cfg.full_steps_per_epoch,
        encoded_images=cfg.encoded_images,
        rows="\n".join(_row(r) for r in rows),
        timed_steps=_timed_steps(rows),
        last_batch=f" + one timed step on the last batch of {remainder}" if remainder else "",
        memory_measure=rows[0]["memory_measure"] if rows else "",
        runtime_mb=_mb(rows[0]["runtime_memory_bytes"] if rows else 0),
        caption_tokens=max((r["caption_tokens"] for r in rows), default=0),
        loop=_loop(report["loop_overhead"]),
        dp_sgd_table=dp_sgd_section(rows),
        targets="\n".join(f"- {line}" for line in report["targets"]),
    )


def check_targets(rows: list[dict], loop: dict | None) -> list[str]:
    """One line per target, with the measured value and whether it is met."""
    flora = next((r for r in rows if r["method"] == "FLoRA"), None)
    checks = []
    if flora is not None and flora["round_speedup_vs_fft"] is not None:
        extra = {
            "round_speedup_vs_fft": (
                f"FLOP ratio per round {_x(flora['work_reduction_vs_fft'])}; "
                f"per local step {_x(flora['step_speedup_vs_fft'])}; by CPU time "
                f"{_x(flora['round_speedup_vs_fft_cpu'])} per round, "
                f"{_x(flora['step_speedup_vs_fft_cpu'])} per step"
            ),
            "memory_reduction_vs_fft": (
                f"{_x(flora['memory_excl_runtime_reduction_vs_fft'])} excluding the runtime, "
                f"{_x(flora['memory_growth_reduction_vs_fft'])} in growth during training"
            ),
            "bytes_reduction_vs_fft": (
                f"{flora['trainable_params']:,} vs {flora['trainable_params'] * flora['params_reduction_vs_fft']:,.0f} params"
            ),
        }
        for key, target, what in (
            ("round_speedup_vs_fft", TARGETS["round_speedup"], "faster per round"),
            ("memory_reduction_vs_fft", TARGETS["memory_reduction"], "lower peak memory"),
            ("bytes_reduction_vs_fft", TARGETS["bytes_reduction"], "fewer bytes per round"),
        ):
            met = "met" if flora[key] >= target else "NOT met"
            checks.append(f">= {target:,.0f}x {what}: {_x(flora[key])} ({met}; {extra[key]})")
    if loop is not None:
        # Judged with logging and checkpoints included: they are part of the loop's cost.
        met = "met" if loop["wall_overhead_fraction"] < LOOP_OVERHEAD_TARGET else "NOT met"
        checks.append(
            f"loop overhead < {100 * LOOP_OVERHEAD_TARGET:.0f}% of a round: "
            f"{100 * loop['wall_overhead_fraction']:.2f}% with logging and checkpoints, "
            f"{100 * loop['overhead_fraction']:.2f}% without ({met})"
        )
    return checks or ["not checked (needs FLoRA and FedFFT)"]


AB_ROW = (
    "| {method} | {runner} | {eager:.3g} | {compiled:.3g} | {step_x} | {eager_round:.4g} "
    "| {compiled_round:.4g} | {eager_fft} | {compiled_fft} | {flops} | {eager_eff} "
    "| {compiled_eff} |"
)


def ab_rows(eager: list[dict], compiled: list[dict]) -> list[dict]:
    """One row per method: its step and round, eager and compiled, and the round ratio vs
    FedFFT in each arm with its share of the FLOP ratio (1.0: as fast as the work allows)."""
    rows = []
    for e, c in zip(eager, compiled, strict=True):

        def share(row: dict) -> float | None:
            if row["round_speedup_vs_fft"] is None or not row["work_reduction_vs_fft"]:
                return None
            return row["round_speedup_vs_fft"] / row["work_reduction_vs_fft"]

        rows.append(
            {
                "method": e["method"],
                "runner": c.get("step_runner", "compiled"),
                "eager_step_seconds": e["step_seconds"],
                "compiled_step_seconds": c["step_seconds"],
                "step_speedup": e["step_seconds"] / c["step_seconds"],
                "eager_round_seconds": e["round_seconds"],
                "compiled_round_seconds": c["round_seconds"],
                "eager_round_speedup_vs_fft": e["round_speedup_vs_fft"],
                "compiled_round_speedup_vs_fft": c["round_speedup_vs_fft"],
                "work_reduction_vs_fft": c["work_reduction_vs_fft"],
                "eager_share_of_flop_ratio": share(e),
                "compiled_share_of_flop_ratio": share(c),
            }
        )
    return rows


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ab_markdown(report: dict) -> str:
    """``bench.md`` of ``flora bench --compile ab``: both arms side by side."""
    cfg = BenchConfig(**report["config"])
    arms = report["arms"]
    rows = ab_rows(arms["eager"]["methods"], arms["compiled"]["methods"])
    lines = [
        f"# flora bench A/B: eager vs compiled, {cfg.arch} shapes, {cfg.device}, {cfg.precision}",
        "",
        f"`flora bench {' '.join(cfg.to_argv())}`  ",
        f"{report['machine']}; wall time {report['wall_seconds']:.0f} s; load average (1 min) "
        f"while the methods ran: {_load_range(arms['eager']['methods'] + arms['compiled']['methods'])}"
        f" on {arms['eager']['cpu_count']} cores (above the core count other jobs shared the CPU; "
        "small steps suffer most). Each method was measured eager and then compiled, one after "
        "the other, each in a fresh process; each arm's full report: `eager/bench.md` and "
        "`compiled/bench.md` beside this file's `bench.md` (with ``--results``: "
        "`<name>-eager.md`, `<name>-compiled.md`).",
        "",
        "| method | compiled step | eager s / step | compiled s / step | step eager / compiled "
        "| eager s / round | compiled s / round | eager vs FedFFT / round | compiled vs FedFFT "
        "/ round | FLOP ratio / round | eager share of FLOP ratio | compiled share |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            AB_ROW.format(
                method=r["method"],
                runner=r["runner"],
                eager=r["eager_step_seconds"],
                compiled=r["compiled_step_seconds"],
                step_x=f"{r['step_speedup']:.2f}x",
                eager_round=r["eager_round_seconds"],
                compiled_round=r["compiled_round_seconds"],
                eager_fft=_x(r["eager_round_speedup_vs_fft"]),
                compiled_fft=_x(r["compiled_round_speedup_vs_fft"]),
                flops=_x(r["work_reduction_vs_fft"]),
                eager_eff=_share(r["eager_share_of_flop_ratio"]),
                compiled_eff=_share(r["compiled_share_of_flop_ratio"]),
            )
        )
    lines += [
        "",
        "- s / step: median wall seconds of the timed local steps (the compiled arm compiles "
        "in its warm-up, untimed); s / round as in each arm's report (steps of one epoch plus "
        "amortised caching, or per-epoch preprocessing from pixels).",
        "- share of FLOP ratio: the round speed-up vs FedFFT divided by the FLOP ratio; 1.0 "
        "means FLoRA is as much faster as it does less work.",
        "",
    ]
    return "\n".join(lines)
