"""Every method's offline quickstart learns: ``configs/quickstart*.yaml`` end above zero-shot.

A new user runs these first; one that ends below its round 0 reads as a broken method
(FedVM-LC's once went 0.569 -> 0.346). Each runs end to end through the ``flora`` command.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_quickstart import REPO, flora

# config file -> the method it runs (summary["method"])
QUICKSTARTS = {
    "quickstart.yaml": "FLoRA",
    "quickstart_fedaa.yaml": "FedAA",
    "quickstart_fedfft.yaml": "FedFFT",
    "quickstart_fedlc.yaml": "FedLC",
    "quickstart_fedvmlc.yaml": "FedVMLC",
}
MIN_GAIN = 0.05  # final test accuracy over round 0's (zero-shot), 10 digit classes


def test_every_quickstart_config_is_listed():
    assert sorted(p.name for p in (REPO / "configs").glob("quickstart*.yaml")) == sorted(
        QUICKSTARTS
    )


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(QUICKSTARTS))
def test_quickstart_learns(config: str, tmp_path: Path, offline_assets):
    run_dir = tmp_path / "run"
    flora(
        "fit",
        "--config",
        str(REPO / "configs" / config),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.progress",
        "false",
        cwd=REPO,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == QUICKSTARTS[config]
    accs = [r["test_acc"] for r in summary["rounds"]]
    assert summary["rounds"][0]["round"] == 0  # before any training: zero-shot
    assert summary["final_test_acc"] == accs[-1]
    assert accs[-1] >= accs[0] + MIN_GAIN, f"{config}: test_acc by round {accs}"
