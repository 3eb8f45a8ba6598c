"""The real ``FederatedLoop``'s own overhead: a short cached-FLoRA run, timed from its summary."""

from __future__ import annotations

import tempfile
import time

from flora_lightning.bench.config import BenchConfig
from flora_lightning.bench.workload import build_clip_bundle, caption_words, synthetic_datamodule


def measure_loop_overhead(
    cfg: BenchConfig, clients: int = 2, per_client: int = 320, batch_size: int = 8
) -> dict:
    """2 rounds of cached FLoRA through the real loop on small synthetic data.

    ``per_client / batch_size`` = 40 local steps per client, the step count of the paper's
    epoch (5,000 samples at batch 128): a FLoRA step on cached features costs the same at
    batch 8 as at 128 (the text tower runs on the distinct captions), so rounds are as long
    as real ones while caching stays cheap (a few hundred images).

    Overhead is the part of a round that is neither local training nor evaluation: state
    copies, aggregation, sampling. ``overhead_fraction`` uses the loop's own round timings
    (``seconds``, which end before the round's logging and checkpoint); ``wall_overhead_fraction``
    uses the wall time from one round's start to the next, logging and checkpoints included.
    A real round has 10 clients, not 2, so per-client costs are the same share of it.
    """
    import torch

    from flora_lightning.callbacks.base import Callback
    from flora_lightning.federation.loop import FederatedLoop
    from flora_lightning.methods import FLoRA
    from flora_lightning.methods.base import build_model_from_bundle

    class RoundClock(Callback):
        def __init__(self) -> None:
            self.starts: dict[int, float] = {}
            self.end = 0.0

        def on_round_start(self, loop, round, clients) -> None:
            self.starts[round] = time.perf_counter()

        def on_fit_end(self, loop, model, summary) -> None:
            self.end = time.perf_counter()

    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="flora-bench-") as tmp:
        data = synthetic_datamodule(
            tmp,
            clients=clients,
            per_client=per_client,
            test_samples=16,
            batch_size=batch_size,
            num_classes=cfg.num_classes,
            input_size=cfg.input_size,
            seed=cfg.seed,
        )
        model = build_model_from_bundle(
            FLoRA(name_or_path=f"random-init/{cfg.arch}"),
            build_clip_bundle(cfg.arch, caption_words(cfg.num_classes)),
        )
        clock = RoundClock()
        loop = FederatedLoop(
            rounds=2,
            accelerator=cfg.device,
            precision=cfg.precision,
            callbacks=[clock],
            default_root_dir=f"{tmp}/run",
            progress=False,
            seed=cfg.seed,
        )
        summary = loop.fit(model, data)
    rounds = [r for r in summary["rounds"] if r["round"] > 0]
    walls = [clock.starts.get(r["round"] + 1, clock.end) - clock.starts[r["round"]] for r in rounds]
    busy = sum(r["train_seconds"] + r["eval_seconds"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    return {
        "rounds": len(rounds),
        "clients": clients,
        "samples_per_client": per_client,
        "batch_size": batch_size,
        "round_seconds": [r["seconds"] for r in rounds],
        "train_seconds": [r["train_seconds"] for r in rounds],
        "eval_seconds": [r["eval_seconds"] for r in rounds],
        "round_wall_seconds": walls,
        "overhead_fraction": (seconds - busy) / seconds,
        "wall_overhead_fraction": (sum(walls) - busy) / sum(walls),
        "feature_caching_seconds": summary["feature_caching_seconds"],
    }
