"""Ratios against FedFFT, the markdown report and the target checks, from the workers' results."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from flora_lightning.bench.config import LOOP_OVERHEAD_TARGET, TARGETS, BenchConfig
from flora_lightning.bench.worker import encode_samples


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


def _caption_tokens(rows: list[dict]) -> str:
    return str(max((r["caption_tokens"] for r in rows), default=0))


def _load_range(rows: list[dict]) -> str:
    loads = [load for r in rows for load in r["load_average"]]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"


def _x(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.1f}x"


def _mb(value: float) -> str:
    return f"{value / 1e6:,.0f}" if value >= 1e7 else f"{value / 1e6:,.2f}"


def markdown(
    cfg: BenchConfig, rows: list[dict], loop: dict | None, wall: float, machine: str
) -> str:
    label = {"vit-b-32": "ViT-B/32", "tiny": "tiny"}[cfg.arch]
    lines = [
        f"# flora bench: local-training cost per method, {label} shapes",
        "",
        f"`flora bench {' '.join(cfg.to_argv())}`  ",
        f"{cfg.device}: {machine}; precision {cfg.precision}; wall time {wall:.0f} s.  ",
        f"Random weights; synthetic {cfg.input_size}x{cfg.input_size} RGB images, CLIP-preprocessed "
        f"to the model's input size; {cfg.num_classes} classes; batch {cfg.batch_size}; "
        f"{cfg.client_samples} samples per client = {cfg.steps_per_epoch} local steps per epoch; "
        f"caching amortised over {cfg.rounds} rounds.  ",
        f"Load average (1 min) while the methods ran: {_load_range(rows)} on "
        f"{os.cpu_count()} cores; above the core count, other jobs shared the CPU and stretched "
        "wall times unevenly between methods: CPU s / step (process CPU time, all threads) is "
        "less sensitive to that.",
        "",
        "| method | trainable params | bytes / round / client | s / step | CPU s / step "
        "| s / epoch (extrap.) "
        "| caching s / round (amortised) | s / round (extrap.) | peak MB | peak excl. runtime MB "
        "| growth in training MB | TFLOP / round | faster / round vs FedFFT | fewer FLOPs / round "
        "vs FedFFT | less memory vs FedFFT (peak / excl. runtime) | fewer bytes vs FedFFT |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        name = f"{r['method']} (cached)" if r["cached"] else r["method"]
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {r['bytes_per_round_per_client']:,} "
            f"| {r['step_seconds']:.3g} | {r['step_cpu_seconds']:.3g} | {r['epoch_seconds']:.4g} "
            f"| {r['caching_seconds_per_round']:.3g} | {r['round_seconds']:.4g} "
            f"| {_mb(r['peak_memory_bytes'])} | {_mb(r['peak_memory_excl_runtime_bytes'])} "
            f"| {_mb(r['memory_growth_bytes'])} | {r['flops_per_round'] / 1e12:.3g} "
            f"| {_x(r['round_speedup_vs_fft'])} | {_x(r['work_reduction_vs_fft'])} "
            f"| {_x(r['memory_reduction_vs_fft'])} / {_x(r['memory_excl_runtime_reduction_vs_fft'])} "
            f"| {_x(r['bytes_reduction_vs_fft'])} |"
        )
    measure = rows[0]["memory_measure"] if rows else ""
    runtime = rows[0]["runtime_memory_bytes"] if rows else 0
    lines += [
        "",
        f"- s / step: median of the timed local optimizer steps (forward, backward, Adam; "
        f"{_timed_steps(rows)} per method: at least {cfg.steps}, fast methods until "
        f"{cfg.min_timed_seconds:g} s were timed) after {cfg.warmup} warm-up, wall clock, on a "
        "ready batch (data loading excluded); pixels, or the "
        "cached image features where the loop caches them (cached).",
        f"- s / epoch is *extrapolated*: {cfg.full_steps_per_epoch} full-batch steps x s / step"
        + (
            f" + one timed step on the last batch of {cfg.client_samples % cfg.batch_size}"
            if cfg.client_samples % cfg.batch_size
            else ""
        )
        + ", plus, when training from "
        "pixels, CLIP preprocessing of every client image (timed on the step's batch; the loop "
        "preprocesses in the training process, num_workers=0). Caching s / round is "
        "*extrapolated*: the time per image to preprocess and encode a sample of "
        f"{encode_samples(cfg)} images after one untimed warm-up batch, times "
        f"{cfg.client_samples} images, divided by {cfg.rounds} rounds. s / round = the two summed.",
        f"- Memory ({measure}), each method in a fresh process; with caching the vision tower is "
        "released first. Peak: during local training (model, gradients, optimizer state, "
        f"activations, plus the runtime). Excl. runtime: minus what the process held before "
        f"building any model ({_mb(runtime)} MB here: interpreter and libraries). Growth: minus "
        "what it held when training started (runtime and weights).",
        "- FLOPs: matmuls, convolutions and attention of one local step (forward and backward) "
        "and of encoding, counted by torch.utils.flop_counter.FlopCounterMode, combined as the "
        "round time is (elementwise ops and Adam are not counted). At equal efficiency the "
        "speed-up per round equals the FLOP ratio.",
        "- Bytes: the communicated state (trainable parameters, fp32), sent up by each client "
        "and the same amount down, per round. Ratios: FedFFT's value / the method's.",
        f"- Captions: {_caption_tokens(rows)} tokens each (padded), from the offline byte-level "
        "tokenizer with BPE merges for the caption words, as CLIP's vocabulary has them "
        "(CLIP's own tokenizer gives 8 for 'a photo of a airplane.').",
    ]
    if loop is not None:
        lines += [
            "",
            f"Loop overhead (real FederatedLoop, {loop['rounds']} rounds of cached FLoRA, "
            f"{loop['clients']} clients x {loop['samples_per_client']} synthetic samples, batch "
            f"{loop['batch_size']}): {100 * loop['overhead_fraction']:.2f}% of a round "
            "((seconds - train_seconds - eval_seconds) / seconds from summary.json); "
            f"{100 * loop['wall_overhead_fraction']:.2f}% counting TensorBoard logging and "
            "checkpoints. Each client runs "
            f"{loop['samples_per_client'] // loop['batch_size']} local steps, as a real epoch "
            "(5,000 samples at batch 128); a FLoRA step on cached features costs the same at "
            "either batch size.",
        ]
    lines += ["", "Targets (FLoRA with caching vs FedFFT):", ""]
    lines += [f"- {line}" for line in check_targets(rows, loop)]
    return "\n".join(lines) + "\n"


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
