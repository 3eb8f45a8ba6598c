"""DP-SGD's cost per local step next to the plain step (``flora bench --dp_sgd true``).

In a method's worker process, after its usual measurements, the plain local step
(:func:`~flora_lightning.federation.local_trainer.local_step`) and the sample-level DP-SGD step
(:class:`~flora_lightning.privacy.dpsgd.DPSGDStep`, σ = :data:`NOISE_MULTIPLIER`,
C = :data:`MAX_GRAD_NORM`, the whole batch at once) are timed back to back on the same batch
(cached features where the loop caches them), each with a fresh optimizer, by the same
:func:`~flora_lightning.bench.timing.time_steps` and with the peak memory metered around each
alone. For FLoRA, the same pair follows with ``lora.freeze_a`` (A frozen, FFA-LoRA). Methods
that :func:`~flora_lightning.privacy.check_compatible` refuses at sample level (FedFFT) are
recorded with its reason instead.

The two steps do not train on the same loss: the plain step is the method's own (CLIP's
in-batch contrastive loss for most), the DP step the per-example zero-shot classification loss
(see :mod:`flora_lightning.privacy.dpsgd`); the ratios are the cost of switching a client's fit
to DP-SGD, loss change included.
"""

from __future__ import annotations

NOISE_MULTIPLIER = 1.0
"""σ of the measured DP-SGD step (the cost does not depend on it)."""
MAX_GRAD_NORM = 1.0
"""C of the measured DP-SGD step (the released code's clip bound)."""
RATIOS = {
    "step_ratio": "step_seconds",
    "cpu_ratio": "step_cpu_seconds",
    "memory_ratio": "peak_memory_bytes",
    "memory_excl_runtime_ratio": "peak_memory_excl_runtime_bytes",
}
"""DP / plain ratios in each measured pair, and the measurement each divides."""
SECTION = (
    "\nDP-SGD vs the plain local step (`--dp_sgd true`): sample-level DP-SGD "
    "(`DPSGDStep`: per-example gradients with torch.func, clip {max_grad_norm:g}, noise "
    "multiplier {noise_multiplier:g}, the whole batch at once) and the plain step, timed as "
    "above one after the other in each method's worker process on the same batch, each with a "
    "fresh Adam and its own memory peak. The plain step trains on the method's own loss, the "
    "DP step on the per-example zero-shot classification loss (one caption per class).\n\n"
    "| method | plain s / step | DP s / step | DP / plain | plain CPU s / step "
    "| DP CPU s / step | DP / plain (CPU) | plain peak MB | DP peak MB | DP / plain (peak) "
    "| plain peak excl. runtime MB | DP peak excl. runtime MB |\n"
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
    "{rows}\n{refused}"
)
ROW = (
    "| {name} | {plain[step_seconds]:.3g} | {dp[step_seconds]:.3g} | {step_ratio:.2f}x "
    "| {plain[step_cpu_seconds]:.3g} | {dp[step_cpu_seconds]:.3g} | {cpu_ratio:.2f}x "
    "| {plain_peak} | {dp_peak} | {memory_ratio:.2f}x | {plain_excl} | {dp_excl} |"
)


def refusal(variant: str) -> str | None:
    """Why sample-level DP-SGD cannot train ``variant`` (``check_compatible``'s message with
    FedAvg), or None when it can."""
    from flora_lightning.methods import METHODS
    from flora_lightning.privacy import PrivacyConfig, check_compatible
    from flora_lightning.strategy import FedAvg

    by_name = {cls.__name__: cls for cls in METHODS.values()}
    privacy = PrivacyConfig(
        level="sample", noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM
    )
    try:
        check_compatible(privacy, FedAvg, by_name[variant.removesuffix("-uncached")])
    except ValueError as error:
        return str(error)
    return None


def measure_dp_sgd(fabric, module, batch, cfg, variant: str, meter, runtime_bytes: int) -> dict:
    """The plain and the DP-SGD step of ``variant`` on ``batch``, and for FLoRA again with A
    frozen. Changes the module's parameters (and, for FLoRA, freezes A): call it last.

    Args:
        fabric: the worker's launched Fabric.
        module: the method, set up, its batch ready (cached features or pixels).
        batch: ``(inputs, labels)`` on ``fabric.device``.
        cfg: the :class:`~flora_lightning.bench.config.BenchConfig` (steps, warm-up, seed).
        variant: the benchmarked name (``FLoRA``, ``FLoRA-uncached``, ...).
        meter: the worker's :class:`~flora_lightning.callbacks.memory.PeakMemoryMeter`.
        runtime_bytes: what the process held before any model (subtracted from the peaks).

    Returns:
        ``{"noise_multiplier", "max_grad_norm", "refused": reason or None, "pairs": [...]}``;
        each pair is ``{"method", "plain", "dp", <RATIOS>}``.
    """
    from flora_lightning.methods import FLoRA

    reason = refusal(variant)
    out = {"noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM}
    out |= {"refused": reason, "pairs": []}
    if reason is not None:
        return out
    out["pairs"].append(_pair(fabric, module, batch, cfg, meter, runtime_bytes, variant))
    if isinstance(module, FLoRA) and not module.lora.freeze_a:
        # What lora.freeze_a does at setup (FLoRA.setup_trainable): A stops being trained.
        for name, param in module.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
        label = f"{variant} (freeze_a)"
        out["pairs"].append(_pair(fabric, module, batch, cfg, meter, runtime_bytes, label))
    return out


def _pair(fabric, module, batch, cfg, meter, runtime_bytes: int, label: str) -> dict:
    from flora_lightning.privacy import DPSGDStep

    dp_step = DPSGDStep(NOISE_MULTIPLIER, MAX_GRAD_NORM)
    dp_step.start_fit(cfg.seed)
    plain = measure_steps(fabric, module, batch, cfg, meter, runtime_bytes)
    dp = measure_steps(fabric, module, batch, cfg, meter, runtime_bytes, dp_step)
    pair = {"method": label, "plain": plain, "dp": dp}
    for ratio, key in RATIOS.items():
        pair[ratio] = dp[key] / plain[key] if plain[key] > 0 else None
    return pair


def measure_steps(fabric, module, batch, cfg, meter, runtime_bytes: int, step_fn=None) -> dict:
    """Time ``step_fn`` (None: the plain step) on ``batch`` and meter its peak memory alone."""
    from flora_lightning.bench.timing import time_steps
    from flora_lightning.callbacks.memory import release_free_memory

    release_free_memory()
    meter.start()
    times = time_steps(fabric, module, batch, cfg.steps, cfg.warmup, cfg.min_timed_seconds, step_fn)
    memory = meter.stop()
    return {
        "step_seconds": times.seconds,
        "step_cpu_seconds": times.cpu_seconds,
        "timed_steps": times.timed_steps,
        "peak_memory_bytes": memory.peak_bytes,
        "peak_memory_excl_runtime_bytes": max(memory.peak_bytes - runtime_bytes, 0),
        "memory_growth_bytes": memory.growth_bytes,
    }


def markdown_section(rows: list[dict]) -> str:
    """The report's DP-SGD table from the methods' rows of ``bench.json`` (empty when no row
    carries a ``dp_sgd`` result, i.e. the bench ran without ``--dp_sgd``)."""
    results = [r["dp_sgd"] for r in rows if r.get("dp_sgd")]
    if not results:
        return ""
    pairs = [p for result in results for p in result["pairs"]]
    refused = [
        f"- {r['method']}: not measured ({r['dp_sgd']['refused']})"
        for r in rows
        if r.get("dp_sgd") and r["dp_sgd"]["refused"]
    ]
    return SECTION.format(
        noise_multiplier=results[0]["noise_multiplier"],
        max_grad_norm=results[0]["max_grad_norm"],
        rows="\n".join(_row(p) for p in pairs),
        refused="\n".join(refused) + "\n" if refused else "",
    )


def _mb(value: float) -> str:
    return f"{value / 1e6:,.0f}" if value >= 1e7 else f"{value / 1e6:,.2f}"


def _row(pair: dict) -> str:
    plain, dp = pair["plain"], pair["dp"]
    values = {k: pair[k] if pair[k] is not None else float("nan") for k in RATIOS}
    return ROW.format(
        **values,
        name=pair["method"],
        plain=plain,
        dp=dp,
        plain_peak=_mb(plain["peak_memory_bytes"]),
        dp_peak=_mb(dp["peak_memory_bytes"]),
        plain_excl=_mb(plain["peak_memory_excl_runtime_bytes"]),
        dp_excl=_mb(dp["peak_memory_excl_runtime_bytes"]),
    )
