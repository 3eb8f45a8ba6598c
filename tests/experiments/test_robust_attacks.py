"""``experiments/robust_attacks.py`` on a 2-cell slice of configs/sweeps/robust_attacks.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "configs" / "sweeps" / "robust_attacks.yaml"


@pytest.fixture(scope="module")
def robust(load_experiment):
    return load_experiment("robust_attacks")


def test_spec_names_every_strategy_and_attack(robust):
    grid = robust.load_spec(SPEC)
    assert list(grid["strategies"]) == ["FedAvg", "Median", "TrimmedMean", "Krum", "MultiKrum"]
    assert list(grid["attacks"]) == [
        "none", "scale", "sign_flip", "gaussian", "num_samples", "label_flip"
    ]  # fmt: skip
    assert Path(grid["base"]).is_file()


def test_unknown_names_are_refused(robust, tmp_path):
    with pytest.raises(ValueError, match=r"only_strategies: unknown \['Nope'\]"):
        robust.measure(SPEC, tmp_path, tmp_path / "r.md", only_strategies=["Nope"])


@pytest.mark.slow
def test_two_cells_write_the_table_from_their_summaries(robust, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.md"
    quick = ["--trainer.rounds", "1", "--trainer.max_local_steps", "2",
             "--data.max_test_samples", "64"]  # fmt: skip
    robust.measure(SPEC, out, report, ["Median"], ["none", "sign_flip"], quick)
    text = report.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Median |"))
    for attack in ("none", "sign_flip"):
        summary = json.loads((out / "Median" / attack / "seed42" / "summary.json").read_text())
        assert f"{summary['final_test_acc']:.4f} ({summary['best_test_acc']:.4f})" in row
    attacked = json.loads((out / "Median" / "sign_flip" / "seed42" / "summary.json").read_text())
    assert len(attacked["rounds"][1]["attackers"]) == 1  # 0.2 of 5 clients
    assert "| strategy | none | sign_flip |" in text
    # a second call reads the finished cells back instead of running them again
    robust.measure(SPEC, out, report, ["Median"], ["none"], quick)
    assert "Read back from finished runs" in report.read_text()
