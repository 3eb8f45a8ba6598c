"""Shared by the sweep tests: run directories written by hand, shaped as ``flora fit`` writes them."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def fake_run(
    run_dir: Path,
    accs: list[float],
    rounds: int | None = None,
    final: bool = True,
    resume: bool = False,
    seconds: float = 2.0,
    bytes_up: int = 4096,
    peak: int | None = None,
    growth: int = 0,
    partition: dict | None = None,
) -> dict:
    """A run directory whose summary holds ``accs`` as rounds 0..len-1; returns the summary.

    ``rounds`` is the configured ``trainer.rounds`` (default: the last round in ``accs``).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "trainer": {"rounds": len(accs) - 1 if rounds is None else rounds},
        "data": {"partition": partition or {"kind": "iid", "num_clients": 5}},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    history = [
        {
            "round": r,
            "test_acc": acc,
            "test_loss": 1.0,
            "bytes_up": 0 if r == 0 else bytes_up,
            "bytes_down": 0 if r == 0 else bytes_up,
            "seconds": 0.0 if r == 0 else seconds + r,
        }
        for r, acc in enumerate(accs)
    ]
    best = max(range(len(accs)), key=lambda i: accs[i])
    summary = {
        "method": "X",
        "trainable_params": 512,
        "feature_caching_seconds": 0.5,
        "bytes_per_client_per_direction": 2048,
        "final_test_acc": accs[-1],
        "best_test_acc": accs[best],
        "best_round": best,
        "rounds": history,
    }
    if peak is not None:
        summary.update(
            peak_memory_bytes=peak, peak_memory_growth_bytes=growth, memory_measure="cpu_peak_rss"
        )
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if final:
        (run_dir / "final").mkdir(exist_ok=True)
    if resume:
        (run_dir / "resume").mkdir(exist_ok=True)
        (run_dir / "resume" / "state.json").write_text(json.dumps({"round": len(accs) - 1}))
    return summary
