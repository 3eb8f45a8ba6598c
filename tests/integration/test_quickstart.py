"""The README quickstart, end to end and offline, through the installed ``flora`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flora_lightning import cli

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
ROUNDS = 10


def flora_command() -> list[str]:
    script = Path(sys.executable).with_name("flora")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flora_lightning"]


def flora(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [*flora_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"flora {' '.join(args)} failed:\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, offline_assets) -> Path:
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    flora("fit", "--config", str(QUICKSTART), "--trainer.default_root_dir", str(run_dir), cwd=REPO)
    return run_dir


def test_quickstart_learns(quickstart):
    summary = json.loads((quickstart / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    zero_shot, final = rounds[0]["test_acc"], summary["final_test_acc"]
    assert final == rounds[-1]["test_acc"]
    assert final > 0.5  # 10 digit classes: chance is 0.1
    assert final > zero_shot + 0.1  # measured: ~0.57 zero-shot -> ~0.86 after 10 rounds
    assert rounds[-1]["test_loss"] < rounds[0]["test_loss"]
    assert summary["method"] == "FLoRA"
    assert summary["trainable_params"] == 512  # 2 text out_proj x rank 2 x (64 + 64)
    assert rounds[1]["bytes_up"] == 5 * 512 * 4


def test_quickstart_outputs(quickstart):
    assert (quickstart / "config.yaml").is_file()
    assert (quickstart / "summary.json").is_file()
    assert len(list((quickstart / "tensorboard").glob("events.out.tfevents.*"))) == 1
    checkpoints = sorted(p.name for p in (quickstart / "checkpoints").glob("*.safetensors"))
    assert checkpoints == [f"round_{r:03d}.safetensors" for r in range(1, ROUNDS + 1)]
    assert (quickstart / "final" / "adapter_config.json").is_file()
    assert (quickstart / "final" / "adapter_model.safetensors").is_file()
    adapter = json.loads((quickstart / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["lora_alpha"] == 64
    assert "text_model" in adapter["target_modules"]


def test_test_stage_reproduces_round_10(quickstart, tmp_path):
    summary = json.loads((quickstart / "summary.json").read_text())
    out = tmp_path / "test"
    flora(
        "test",
        "--config",
        str(quickstart / "config.yaml"),
        "--ckpt_path",
        str(quickstart / "checkpoints" / f"round_{ROUNDS:03d}.safetensors"),
        "--trainer.default_root_dir",
        str(out),
        "--trainer.progress",
        "false",
        cwd=tmp_path,
    )
    result = json.loads((out / "test.json").read_text())
    assert result["stage"] == "test"
    assert result["test_acc"] == pytest.approx(summary["rounds"][ROUNDS]["test_acc"], abs=1e-6)
    assert result["test_loss"] == pytest.approx(summary["rounds"][ROUNDS]["test_loss"], rel=1e-4)


def test_validate_without_checkpoint_is_zero_shot(quickstart, tmp_path):
    summary = json.loads((quickstart / "summary.json").read_text())
    result = cli.run(
        [
            "validate",
            "--config",
            str(quickstart / "config.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path / "validate"),
            "--trainer.progress",
            "false",
        ]
    )
    assert result["stage"] == "validate"
    assert result["ckpt_path"] is None
    assert result["test_acc"] == pytest.approx(summary["rounds"][0]["test_acc"], abs=1e-6)
    assert json.loads((tmp_path / "validate" / "validate.json").read_text()) == result
