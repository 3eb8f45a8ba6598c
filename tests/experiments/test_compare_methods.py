"""``experiments/compare_methods.py`` on the offline quickstart: runs, table, CSV and plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def compare(load_experiment):
    return load_experiment("compare_methods")


def test_model_args_pick_the_method_settings(compare, tmp_path):
    assert compare.model_args("flora", QUICKSTART) == []  # the config's own model
    flag, spec = compare.model_args("fedlc", QUICKSTART)  # configs/quickstart_fedlc.yaml
    assert flag == "--model"
    assert json.loads(spec)["class_path"] == "flora_lightning.methods.FedLC"
    assert json.loads(spec)["init_args"]["optimizer"]["lr"] == 1e-3
    lone = tmp_path / "lone.yaml"
    lone.write_text(QUICKSTART.read_text())
    assert compare.model_args("fedaa", lone) == ["--model", "FedAA"]  # no sibling config


def test_options_come_from_the_typed_signature(compare, tmp_path, capsys):
    options = compare.build_parser().parse_args(["--methods", "[fedaa, flora]", "--rounds", "3"])
    assert options.methods == ("fedaa", "flora") and options.rounds == 3
    assert options.config == Path("configs/quickstart.yaml")  # the signature's default
    with pytest.raises(SystemExit):
        compare.build_parser().parse_args(["--methods", "[flora, lora]"])
    assert "Expected a typing.Literal['flora', 'fedfft'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--config", str(tmp_path / "missing.yaml"), "--", "--trainer.rounds", "1"])
    err = capsys.readouterr().err
    assert "config: " in err and "missing.yaml does not exist" in err


def test_runs_methods_and_writes_results(compare, tmp_path, offline_assets):
    out = tmp_path / "compare"
    rows = compare.main(
        [
            "--config",
            str(QUICKSTART),
            "--out",
            str(out),
            "--rounds",
            "1",
            "--methods",
            "[flora, fedlc]",
            "--",
            "--trainer.max_local_steps",
            "2",
            "--trainer.progress",
            "false",
            "--data.max_test_samples",
            "64",
            "--data.partition.num_clients",
            "2",
        ]
    )
    assert [r["method"] for r in rows] == ["FLoRA", "FedLC"]
    for short, row in zip(["flora", "fedlc"], rows, strict=True):
        summary = json.loads((out / short / "summary.json").read_text())
        assert [r["round"] for r in summary["rounds"]] == [0, 1]
        assert row["round0_acc"] == summary["rounds"][0]["test_acc"]
        assert row["final_acc"] == summary["final_test_acc"]
        assert row["seconds"] > 0
    # Tiny CLIP: FLoRA = 2 layers x 2 x (64 x 2) LoRA, FedLC = 65 x 10 head; fp32 bytes.
    assert [(r["trainable_params"], r["bytes_per_client_per_round"]) for r in rows] == [
        (512, 2048),
        (650, 2600),
    ]
    # FedLC's run used its own quickstart lr, FLoRA's config is the base one.
    assert "lr: 0.001" in (out / "fedlc" / "config.yaml").read_text()
    assert "FedLC" in (out / "fedlc" / "config.yaml").read_text()

    table = (out / "results.md").read_text().splitlines()
    header = [c.strip() for c in table[2].strip("|").split("|")]
    assert header[:7] == [
        "method",
        "trainable params",
        "bytes per round (per client, each way)",
        "round-0 acc",
        "final acc",
        "best acc",
        "best round",
    ]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[4:]]
    assert [c[:3] for c in cells] == [["FLoRA", "512", "2,048"], ["FedLC", "650", "2,600"]]
    assert cells[1][3] == f"{rows[1]['round0_acc']:.4f}"

    with (out / "results.csv").open() as f:
        saved = list(csv.DictReader(f))
    assert [r["method"] for r in saved] == ["FLoRA", "FedLC"]
    assert float(saved[1]["best_acc"]) == pytest.approx(rows[1]["best_acc"])
    assert int(saved[0]["trainable_params"]) == 512

    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
