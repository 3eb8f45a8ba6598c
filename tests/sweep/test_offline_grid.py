"""The shipped offline grid, ``configs/sweeps/offline.yaml``, end to end (slow: 40 cells).

About 4 minutes on 2 idle CPU cores; far longer when other processes compete for them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from flora_lightning import cli

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["FLoRA", "FedFFT", "FedLC", "FedVMLC", "FedAA"]
PARTITIONS = ["iid", "dir0.1", "dir1.0", "pat16"]


@pytest.mark.slow
def test_offline_grid(tmp_path, offline_assets):
    out = tmp_path / "offline"
    record = cli.run(
        ["sweep", "--config", str(ROOT / "configs" / "sweeps" / "offline.yaml"), "--out", str(out)]
    )
    assert record["counts"] == {"done": 40}
    summaries = {
        (p, m, s): json.loads((out / "digits" / p / m / f"seed{s}" / "summary.json").read_text())
        for p in PARTITIONS
        for m in METHODS
        for s in (0, 1)
    }
    assert all([r["round"] for r in s["rounds"]] == list(range(6)) for s in summaries.values())
    assert all(s["peak_memory_bytes"] > 0 for s in summaries.values())
    report = out / "report"
    for partition in PARTITIONS:
        lines = (report / f"results_{partition}.md").read_text().splitlines()[4:]
        rows = {
            c[0]: c[1] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines)
        }
        assert list(rows) == METHODS
        for method in METHODS:
            accs = [summaries[(partition, method, s)]["best_test_acc"] for s in (0, 1)]
            mean, std = statistics.fmean(accs), statistics.stdev(accs)
            assert rows[method].strip("*") == f"{100 * mean:.2f} ± {100 * std:.2f}"
            # Best over rounds 0..5: never below the round-0 (zero-shot) accuracy.
            round0 = summaries[(partition, method, 0)]["rounds"][0]["test_acc"]
            assert accs[0] >= round0
        assert (report / f"accuracy_digits_{partition}.png").read_bytes()[:4] == b"\x89PNG"
    cost = (report / "cost.md").read_text()
    # FLoRA sends 2,048 bytes per client per round; FedFFT every parameter of the tiny CLIP.
    assert "| digits | FLoRA | 512 | 2,048 | 10,240 |" in cost
    assert "| digits | FedFFT | 186,753 | 747,012 | 3,735,060 |" in cost
    print(f"offline grid: {record['wall_seconds']:.0f} s")
