"""``experiments/parallel_rounds.py``: both arms run, the report's figures come from the runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def rounds(load_experiment):
    return load_experiment("parallel_rounds")


def test_bad_arguments_are_refused(rounds, tmp_path):
    with pytest.raises(ValueError, match="parallel_clients must be >= 2"):
        rounds.measure(CONFIG, 1, 1, tmp_path, tmp_path / "r.md")
    with pytest.raises(ValueError, match="config: .* does not exist"):
        rounds.measure(tmp_path / "nope.yaml", 2, 1, tmp_path, tmp_path / "r.md")


def test_both_arms_run_and_the_report_reads_their_summaries(rounds, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.md"
    quick = ["--trainer.rounds", "2", "--trainer.max_local_steps", "2"]
    results = rounds.measure(CONFIG, 3, 1, out, report, quick)
    for k in (1, 3):
        summary = json.loads((out / f"k{k}" / "rep0" / "summary.json").read_text())
        seconds = [r["seconds"] for r in summary["rounds"] if r["round"] > 0]
        assert results["round_seconds"][str(k)] == seconds
        assert results["final_test_acc"][str(k)] == summary["final_test_acc"]
    assert results["ratio"] == pytest.approx(
        results["median_round_seconds"]["3"] / results["median_round_seconds"]["1"]
    )
    # the two ways train the same adapters (fp32: the 1e-5)
    assert results["max_final_difference"] <= 1e-5
    text = report.read_text()
    assert f"**{results['ratio']:.2f}x**" in text
    assert json.loads(report.with_suffix(".json").read_text()) == json.loads(json.dumps(results))


def test_max_difference_names_mismatched_tensors(rounds):
    import torch

    with pytest.raises(ValueError, match="differ in names"):
        rounds.max_difference({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    assert rounds.max_difference({"a": torch.zeros(2)}, {"a": torch.tensor([0.0, -3.0])}) == 3.0
