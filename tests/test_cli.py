"""``flora fit|validate|test``: help, --print_config, errors, and re-running a saved config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from flora_lightning import cli

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
FAST = [
    "--trainer.rounds",
    "1",
    "--trainer.max_local_steps",
    "1",
    "--trainer.progress",
    "false",
    "--data.partition.num_clients",
    "3",
    # Small and uncached: these tests are about the command line, not about learning.
    "--data.max_test_samples",
    "64",
    "--trainer.cache_features",
    "false",
]


def fast_fit(run_dir, *extra: str) -> list[str]:
    """``flora fit`` on the quickstart, small and fast, into ``run_dir``, then ``extra``."""
    return [
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.default_root_dir",
        str(run_dir),
        *FAST,
        *extra,
    ]


def parse_exit(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``flora ARGS`` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["flora", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("stage", ["fit", "validate", "test"])
def test_help_lists_groups(stage, capsys):
    code, out, _ = parse_exit([stage, "--help"], capsys)
    assert code == 0
    for flag in (
        "--config",
        "--print_config",
        "--model ",
        "--model.help",
        "--data.dataset",
        "--data.partition.beta",
        "--data.partition.num_clients",
        "--trainer.rounds",
        "--trainer.join_ratio",
        "--trainer.default_root_dir",
        "--trainer.resume",
    ):
        assert flag in out, flag
    assert ("--ckpt_path" in out) == (stage != "fit")
    # Attribute docstrings become help text.
    assert "Dirichlet concentration" in out


def test_method_help_lists_lora_settings(capsys):
    code, out, _ = parse_exit(["fit", "--model.help", "FLoRA"], capsys)
    assert code == 0
    for flag in (
        "--model.name_or_path",
        "--model.lora.rank",
        "--model.lora.alpha",
        "--model.lora.targets",
        "--model.lora.tower",
        "--model.optimizer.lr",
    ):
        assert flag in out, flag
    assert "LoRA rank r." in out


def test_top_level_help_lists_stages(capsys):
    code, out, _ = parse_exit(["--help"], capsys)
    assert code == 0
    assert all(stage in out for stage in ("fit", "validate", "test"))


def test_print_config_applies_overrides(capsys):
    args = [
        "fit",
        "--config",
        QUICKSTART,
        "--model.lora.rank",
        "8",
        "--data.partition.beta",
        "1.0",
        "--trainer.rounds",
        "3",
        "--print_config",
    ]
    code, out, _ = parse_exit(args, capsys)
    assert code == 0
    config = yaml.safe_load(out)
    assert config["model"]["class_path"] == "flora_lightning.methods.FLoRA"
    assert config["model"]["init_args"]["lora"]["rank"] == 8
    assert config["model"]["init_args"]["lora"]["init"] == "paper"  # from the file
    assert config["model"]["init_args"]["lora"]["alpha"] is None  # default: scaling 32
    assert config["model"]["init_args"]["name_or_path"] == "flora-offline/tiny-clip"
    assert config["data"]["partition"]["beta"] == 1.0
    assert config["data"]["partition"]["num_clients"] == 5
    assert config["trainer"]["rounds"] == 3
    assert config["trainer"]["accelerator"] == "cpu"


def test_print_config_override_order(capsys):
    # Later arguments win, as in LightningCLI.
    args = ["fit", "--trainer.rounds", "7", "--config", QUICKSTART, "--print_config"]
    code, out, _ = parse_exit(args, capsys)
    assert code == 0
    assert yaml.safe_load(out)["trainer"]["rounds"] == 10


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--trainer.join_ratio", "1.5"], "trainer.join_ratio must be in (0, 1]"),
        (["--model.lora.rank", "0"], "model.lora.rank must be >= 1"),
        (["--data.partition.beta", "0"], "data.partition.beta must be > 0"),
        (["--data.image_column", "img"], "data.image_column='img' is not a column"),
    ],
)
def test_bad_value_exits_nonzero_and_writes_nothing(
    tmp_path, monkeypatch, capsys, offline_assets, override, message
):
    run_dir = tmp_path / "run"
    args = fast_fit(run_dir, *override)
    code, err = run_main(args, monkeypatch, capsys)
    assert code != 0
    assert message in err
    # Not even config.yaml, an empty TensorBoard folder or the run directory itself.
    assert not run_dir.exists(), sorted(run_dir.rglob("*"))


def test_unparsable_value_exits_nonzero(tmp_path, capsys):
    code, _, err = parse_exit(
        [
            "fit",
            "--config",
            QUICKSTART,
            "--trainer.rounds",
            "many",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    assert code != 0
    assert "trainer.rounds" in err
    assert not (tmp_path / "run").exists()


def test_saved_config_runs_again(tmp_path, offline_assets):
    first = tmp_path / "first"
    summary = cli.run(fast_fit(first))
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["trainer"]["rounds"] == 1
    assert saved["trainer"]["max_local_steps"] == 1
    assert saved["data"]["partition"]["num_clients"] == 3
    assert saved["trainer"]["default_root_dir"] == str(first)
    assert (
        json.loads((first / "summary.json").read_text())["final_test_acc"]
        == summary["final_test_acc"]
    )

    second = tmp_path / "second"
    again = cli.run(
        ["fit", "--config", str(first / "config.yaml"), "--trainer.default_root_dir", str(second)]
    )
    resaved = yaml.safe_load((second / "config.yaml").read_text())
    resaved["trainer"]["default_root_dir"] = str(first)
    assert resaved == saved
    # Same config, same seeds: the same run.
    assert again["final_test_acc"] == summary["final_test_acc"]
    assert [r["test_loss"] for r in again["rounds"]] == pytest.approx(
        [r["test_loss"] for r in summary["rounds"]], abs=1e-6
    )


def test_fit_into_existing_run_refused(tmp_path, monkeypatch, capsys, offline_assets):
    run_dir = tmp_path / "run"
    args = fast_fit(run_dir, "--trainer.rounds", "0")
    assert run_main(args, monkeypatch, capsys)[0] == 0
    config_before = (run_dir / "config.yaml").read_text()
    code, err = run_main(args, monkeypatch, capsys)
    assert code != 0
    assert "--trainer.resume" in err
    assert (run_dir / "config.yaml").read_text() == config_before
    assert not (run_dir / "config.resumed.yaml").exists()


def test_resume_with_another_method_shape_or_data_is_refused(
    tmp_path, monkeypatch, capsys, offline_assets
):
    run_dir = tmp_path / "run"
    assert run_main(fast_fit(run_dir), monkeypatch, capsys)[0] == 0
    files = sorted(p.name for p in run_dir.iterdir())
    changed = [
        "--trainer.resume",
        "true",
        "--model.lora.rank",
        "4",
        "--data.partition.beta",
        "0.5",
    ]
    code, err = run_main(fast_fit(run_dir, *changed), monkeypatch, capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"flora: error: trainer.resume: the run in {run_dir}")
    assert "model.lora.rank: 2 -> 4" in line and "data.partition.beta: 1.0 -> 0.5" in line
    assert "trainer.rounds" not in line
    assert sorted(p.name for p in run_dir.iterdir()) == files  # nothing written
    # Only what may change (here the rounds): the run continues.
    more = fast_fit(run_dir, "--trainer.resume", "true", "--trainer.rounds", "2")
    assert run_main(more, monkeypatch, capsys)[0] == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
