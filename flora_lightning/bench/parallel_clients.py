"""``flora bench --parallel_clients K``: one round of N cached-FLoRA clients, one after another
and K at a time, side by side in one process.

Both ways train the same clients from the same global state with their own LocalTrainer (own
optimizer-state store): sequentially through :meth:`LocalTrainer.fit`, batched through
:class:`~flora_lightning.federation.parallel.ParallelFit` in groups of K. Image features are
synthetic (random unit vectors, labels cycling through the classes) and cached, as a FLoRA run
with ``trainer.cache_features`` trains from them: only the text tower runs. A warm-up round
(not timed) runs first both ways; then ``rounds`` timed rounds, each client resuming its Adam
state; the two ways alternate which goes first. Reported per K: the fastest round's seconds
both ways (the least disturbed by other load), the speed-up, and the largest difference
of any client's adapter between the two ways (the equality the issue asks for, 1e-5 in fp32).

The FLOP floor (CPU): the matmul FLOPs of one round (torch's ``FlopCounterMode``, the same
both ways up to the tiny LoRA paths) over this CPU's best fp32 matmul rate (a 2048 x 2048
matmul, best of three, measured after each timed round: a shared CPU's speed drifts): no
schedule of the round's math runs faster, so each round's sequential time over the floor of
that moment caps any speed-up batching can give on this machine (reported: the median).

Where the time goes: one more round each way (largest K) runs under torch's profiler and the
operators' own CPU time is summed by kind (:data:`OP_KINDS`): it shows which part of the
step batching speeds up (on a CPU the frozen matmuls are already near their peak rate at one
client's shapes) and which it slows (elementwise ops over K clients' activations at once).
"""

from __future__ import annotations

import math
import time
from functools import partial

OP_KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention + softmax": ("softmax", "scaled_dot_product", "flash_attention"),
    "layer norm": ("layer_norm",),
    "copies + indexing": (
        "aten::copy_", "aten::clone", "aten::cat", "aten::stack", "aten::index", "aten::fill_",
        "aten::zero_", "aten::zeros", "aten::empty", "aten::contiguous",
    ),
    "elementwise": (
        "aten::mul", "aten::add", "aten::sub", "aten::div", "aten::sigmoid", "aten::neg",
        "aten::sqrt", "aten::pow", "aten::exp", "aten::where", "aten::addcmul", "aten::addcdiv",
        "aten::lerp", "aten::maximum", "aten::masked_fill", "aten::sum", "aten::mean",
    ),
}  # fmt: skip
"""Operator kinds of the profile (first matching kind by name prefix or substring); the
rest is "other" (Python, autograd, data loading)."""

ARCH_HELP = "tiny: the offline tiny CLIP; vit-b-32: a random-init CLIP of ViT-B/32 shapes"


class SyntheticShares:
    """What the local trainers read of a datamodule: each client's sample count, the batch."""

    def __init__(self, clients: int, per_client: int, batch_size: int) -> None:
        self.num_clients, self.per_client, self.batch_size = clients, per_client, batch_size

    def num_samples(self, client: int) -> int:
        return self.per_client


def synthetic_cache(fabric, model, shares: SyntheticShares, num_classes: int, seed: int):
    """A :class:`FeatureCache` holding random unit image features for every client."""
    import torch
    import torch.nn.functional as F

    from flora_lightning.clip.feature_cache import FeatureCache

    cache = FeatureCache(fabric, model, shares)
    dim = model.clip_model().config.projection_dim
    generator = torch.Generator().manual_seed(seed)
    for client in range(shares.num_clients):
        x = F.normalize(torch.randn(shares.per_client, dim, generator=generator), dim=-1)
        y = torch.arange(shares.per_client) % num_classes
        cache.features[str(client)] = (x.to(fabric.device), y.to(fabric.device))
    return cache


def op_kind(name: str) -> str:
    """The :data:`OP_KINDS` kind of a profiled operator ``name`` ("other" if none)."""
    for kind, patterns in OP_KINDS.items():
        for pattern in patterns:
            if name.startswith(pattern) if pattern.startswith("aten::") else pattern in name:
                return kind
    return "other"


def profile_by_kind(fn) -> dict[str, float]:
    """Seconds of operators' own CPU time by :func:`op_kind` while ``fn()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    kinds = dict.fromkeys([*OP_KINDS, "other"], 0.0)
    for event in prof.key_averages():
        kinds[op_kind(event.key)] += event.self_cpu_time_total / 1e6
    return kinds


def peak_matmul_gflops(device, size: int = 2048, repeats: int = 5) -> float:
    """The best fp32 matmul rate (GFLOP/s) of ``device`` on a ``size``-square matmul."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = math.inf
    for _ in range(repeats + 1):  # the first call warms up
        t0 = time.perf_counter()
        a @ b
        if a.device.type == "cuda":
            torch.cuda.synchronize(a.device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def matmul_flops(fn) -> int:
    """The FLOPs of the matmul-like operators (mm, bmm, addmm, attention) ``fn()`` runs,
    forward and backward, as torch's ``FlopCounterMode`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure_parallel_round(
    arch: str = "tiny",
    clients: int = 10,
    parallel_clients: tuple[int, ...] = (10,),
    per_client: int = 64,
    batch_size: int = 32,
    num_classes: int = 10,
    rounds: int = 1,
    accelerator: str = "cpu",
    seed: int = 0,
    cuda_graphs: str = "auto",
    compile: bool = False,
) -> dict:
    """Time ``rounds`` round(s) (at least 1) of ``clients`` FLoRA clients sequentially and K at
    a time for each K in ``parallel_clients``; a dict of the settings and one result row per K.
    The sequential fits run the local step as ``cuda_graphs``/``compile`` say (on CUDA with
    ``auto``: captured in CUDA graphs, the issue's baseline); the batched fits run eager."""
    import lightning as L
    import torch

    from flora_lightning.bench.workload import build_method
    from flora_lightning.federation.local_trainer import LocalTrainer
    from flora_lightning.federation.parallel import ParallelFit
    from flora_lightning.federation.step_capture import plan_capture

    torch.manual_seed(seed)
    model = build_method("FLoRA", arch, num_classes)
    fabric = L.Fabric(accelerator=accelerator, devices=1)
    fabric.setup_module(model)
    shares = SyntheticShares(clients, per_client, batch_size)
    cache = synthetic_cache(fabric, model, shares, num_classes, seed)
    start = model.communicated_state()
    ids = list(range(clients))

    def sequential(trainer, round_):
        updates = []
        for client in ids:
            model.load_communicated_state(start)
            updates.append(trainer.fit(model, shares, client, round_, cache))
        return updates

    def batched(trainer, round_, k):
        model.load_communicated_state(start)
        updates = []
        for i in range(0, clients, k):
            updates += ParallelFit(trainer).fit(model, shares, ids[i : i + k], round_, cache)
        return updates

    def sync():
        if fabric.device.type == "cuda":
            torch.cuda.synchronize(fabric.device)

    rows, profile = [], {}
    for k in parallel_clients:
        capture = plan_capture(fabric.device, cuda_graphs, compile)
        seq_trainer = LocalTrainer(fabric, seed=seed, capture=capture)
        par_trainer = LocalTrainer(fabric, seed=seed)
        sequential(seq_trainer, 0), batched(par_trainer, 0, k)  # warm-up, not timed
        seq_s, par_s, peaks, diff = [], [], [], 0.0
        for round_ in range(1, rounds + 1):
            # alternate which way goes first: a shared machine's load drifts within a round
            out = {}
            for name in ("seq", "par") if round_ % 2 else ("par", "seq"):
                sync()
                t0 = time.perf_counter()
                if name == "seq":
                    out[name] = sequential(seq_trainer, round_)
                else:
                    out[name] = batched(par_trainer, round_, k)
                sync()
                (seq_s if name == "seq" else par_s).append(time.perf_counter() - t0)
            for a, b in zip(out["seq"], out["par"], strict=True):
                diff = max(diff, max(float((a.state[n] - b.state[n]).abs().max()) for n in a.state))
            if accelerator == "cpu":  # the machine's matmul rate now: a CPU's speed drifts
                peaks.append(peak_matmul_gflops(fabric.device, repeats=3))
        if k == max(parallel_clients) and accelerator == "cpu":
            last = rounds + 1
            profile = {
                "parallel_clients": k,
                "sequential": profile_by_kind(partial(sequential, seq_trainer, last)),
                "parallel": profile_by_kind(partial(batched, par_trainer, last, k)),
            }
            flops = matmul_flops(partial(sequential, seq_trainer, last + 1))
            # each timed round's sequential time over the floor at the rate measured right
            # after it: the two taken close together, so a drift of the CPU's speed cancels
            caps = sorted(t * p * 1e9 / flops for t, p in zip(seq_s, peaks, strict=True))
            profile["floor"] = {
                "matmul_gflop_per_round": flops / 1e9,
                "batched_matmul_gflop_per_round": matmul_flops(
                    partial(batched, par_trainer, last + 1, k)
                )
                / 1e9,
                "peak_matmul_gflops": peaks,
                "floor_s_per_round": [flops / (p * 1e9) for p in peaks],
                "speedup_caps": caps,
                "speedup_cap": caps[len(caps) // 2],
            }
        rows.append(
            {
                "parallel_clients": k,
                "sequential_s_per_round": min(seq_s),
                "parallel_s_per_round": min(par_s),
                "speedup": min(seq_s) / min(par_s),
                "max_adapter_diff": diff,
            }
        )
    return {
        "arch": arch,
        "clients": clients,
        "per_client": per_client,
        "batch_size": batch_size,
        "local_steps_per_client": math.ceil(per_client / batch_size),
        "num_classes": num_classes,
        "device": str(fabric.device),
        "torch_threads": torch.get_num_threads(),
        "sequential_step": "eager" if capture is None else capture.what,
        "rows": rows,
        "profile": profile,
    }


def markdown(result: dict) -> str:
    """The result as a Markdown table."""
    head = (
        f"FLoRA cached, {result['arch']}, {result['clients']} clients x {result['per_client']} "
        f"samples (batch {result['batch_size']}, {result['local_steps_per_client']} local "
        f"steps), {result['num_classes']} classes, {result['device']}, "
        f"{result['torch_threads']} threads; one at a time the local step runs "
        f"{result.get('sequential_step', 'eager')}, K at a time eager\n\n"
        "| K | sequential s / round | K at a time s / round | speed-up | max adapter diff |\n"
        "|--:|--:|--:|--:|--:|\n"
    )
    table = head + "".join(
        f"| {r['parallel_clients']} | {r['sequential_s_per_round']:.3f} | "
        f"{r['parallel_s_per_round']:.3f} | {r['speedup']:.2f}x | {r['max_adapter_diff']:.1e} |\n"
        for r in result["rows"]
    )
    profile = result.get("profile")
    if not profile:
        return table
    seq, par = profile["sequential"], profile["parallel"]
    lines = [
        f"\nWhere a round's CPU time goes (profiled round, operators' own time, "
        f"K = {profile['parallel_clients']}):\n",
        "| operators | one at a time s | K at a time s | ratio |",
        "|---|--:|--:|--:|",
    ]
    for kind in [*seq, "total"]:
        a = sum(seq.values()) if kind == "total" else seq[kind]
        b = sum(par.values()) if kind == "total" else par[kind]
        ratio = f"{a / b:.2f}x" if b > 0 else "-"
        lines.append(f"| {kind} | {a:.3f} | {b:.3f} | {ratio} |")
    floor = profile.get("floor")
    if floor:
        peaks, floors, caps = (
            floor["peak_matmul_gflops"],
            floor["floor_s_per_round"],
            floor["speedup_caps"],
        )
        lines += [
            "",
            f"FLOP floor: a round's matmuls are {floor['matmul_gflop_per_round']:.1f} GFLOP "
            f"one at a time ({floor['batched_matmul_gflop_per_round']:.1f} batched). This "
            f"device's best fp32 matmul rate (2048 x 2048, best of 3), measured after each "
            f"timed round, was {min(peaks):.0f}-{max(peaks):.0f} GFLOP/s, so no schedule runs "
            f"a round in under {min(floors):.3f}-{max(floors):.3f} s. Each round's sequential "
            f"time over the floor at that moment caps the speed-up batching can give: "
            f"median **{floor['speedup_cap']:.2f}x** (rounds: "
            + ", ".join(f"{c:.2f}x" for c in caps)
            + ").",
        ]
    return table + "\n".join(lines) + "\n"
