"""experiments/privacy_tradeoff.py on a tiny grid: one epsilon, client level, one round."""

from __future__ import annotations

import json
import math

import yaml


def test_grid_writes_rows_table_and_plot(offline_assets, tmp_path, load_experiment):
    script = load_experiment("privacy_tradeoff")
    out = tmp_path / "privacy"
    extra = ["--data.max_test_samples", "64", "--data.partition.num_clients", "3"]
    rows = script.main(out=out, epsilons=[4.0, math.inf], levels=["client"], rounds=1,
                       max_local_steps=1, extra=extra, results=tmp_path / "results")  # fmt: skip

    assert [(r["variant"], r["target_epsilon"], r["clip_only"]) for r in rows] == [
        ("flora", 4.0, False), ("flora", math.inf, False), ("flora", math.inf, True),
        ("flora_freeze_a", 4.0, False), ("flora_freeze_a", math.inf, False),
        ("flora_freeze_a", math.inf, True),
        ("flora_adaptive", 4.0, False), ("flora_adaptive", math.inf, False),
        ("flora_adaptive", math.inf, True),
    ]  # fmt: skip
    clip_only = [r for r in rows if r["clip_only"]]
    for row in clip_only:
        summary = json.loads(
            (out / "client" / row["variant"] / "clip_only" / "summary.json").read_text()
        )
        assert summary["privacy"]["noise_multiplier"] == 0.0
        assert summary["privacy"]["epsilon"] == math.inf == row["epsilon"]
    for row in (r for r in rows if not r["clip_only"]):
        summary = json.loads(
            (out / (f"client/{row['variant']}/eps4" if math.isfinite(row["target_epsilon"])
                    else f"{script.NONPRIVATE_OF.get(row['variant'], row['variant'])}/nonprivate")
             / "summary.json").read_text()
        )  # fmt: skip
        assert row["final_test_acc"] == summary["final_test_acc"]
        if math.isfinite(row["target_epsilon"]):
            assert summary["privacy"]["level"] == "client"
            assert row["epsilon"] == summary["privacy"]["epsilon"] <= 4.0 + 1e-6
        else:
            assert "privacy" not in summary
    table = (out / "results.md").read_text()
    assert "| client | flora |" in table and "| client | flora_freeze_a |" in table
    assert "| client | flora_adaptive |" in table
    assert "clip only (sigma=0)" in table
    saved = yaml.safe_load((out / "client/flora_adaptive/eps4/config.yaml").read_text())
    assert saved["privacy"]["adaptive_clipping"] is True
    (dated,) = (tmp_path / "results").glob("*-privacy-tradeoff.md")
    assert dated.read_text().endswith(table)  # the dated file holds the same table
    assert dated.with_suffix(".png").stat().st_size > 0
    assert (out / "accuracy_vs_epsilon.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())[0]["variant"] == "flora"
