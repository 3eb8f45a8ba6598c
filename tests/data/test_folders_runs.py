"""``flora fit`` and ``flora sweep`` with ``data.partition.kind: folders`` (slow, end to end).

Each client brings its own imagefolder (written from disjoint digits subsets); the label table
a run writes must show, for client k, the files of client_dirs[k] (counted here from the
folders, by class folder), whatever the method, strategy or DP level.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flora_lightning import cli
from flora_lightning.offline.digits import CLASS_NAMES

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
LOG_STATS = ["--privacy.log_client_stats", "true"]


@pytest.fixture(scope="module")
def overlay(tmp_path_factory, offline_assets) -> tuple[Path, list[Path]]:
    """Three site folders (80 images each), the digits' test folder and an overlay naming them."""
    from flora_lightning.offline.site_folders import TEST_FOLDER, write_site_folders

    root = tmp_path_factory.mktemp("sites")
    sites = write_site_folders(root, 3, seed=11, max_per_site=80)
    config = {
        "data": {
            "class_names": CLASS_NAMES,
            "test_dataset": str(root / TEST_FOLDER),
            "max_test_samples": 100,
            "partition": {
                "kind": "folders",
                "num_clients": 3,
                "client_dirs": [str(s) for s in sites],
            },
        }
    }
    path = root / "folders.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, sites


def _expected_rows(sites: list[Path]) -> list[list[int]]:
    """Per site: total, then one count per class, from its class folders."""
    rows = []
    for site in sites:
        counts = [len(list((site / name).glob("*.png"))) for name in CLASS_NAMES]
        rows.append([sum(counts), *counts])
    return rows


def _table_rows(run_dir: Path) -> list[list[int]]:
    lines = (run_dir / "label_table.txt").read_text().splitlines()
    body = [line.split() for line in lines[1:] if line.split() and line.split()[0].isdigit()]
    return [[int(x) for x in cells[1:]] for cells in body]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--config", str(REPO / "configs" / "methods" / "fedlc.yaml")],
        ["--trainer.strategy", "FedAdam"],
        # log_client_stats: a DP run withholds the label table otherwise
        ["--privacy.level", "client", "--privacy.noise_multiplier", "0.5", *LOG_STATS],
        ["--privacy.level", "sample", "--privacy.noise_multiplier", "0.5", *LOG_STATS],
    ],
    ids=["flora", "fedlc", "fedadam", "client-dp", "sample-dp"],
)
def test_flora_fit_runs_the_folders_federation(overlay, tmp_path, extra):
    config, sites = overlay
    run_dir = tmp_path / "run"
    cli.run(
        ["fit", "--config", str(QUICKSTART), "--config", str(config), *extra]
        + ["--trainer.rounds", "1", "--trainer.progress", "false"]
        + ["--trainer.default_root_dir", str(run_dir)]
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert _table_rows(run_dir)[:3] == _expected_rows(sites)


@pytest.mark.slow
def test_a_one_cell_sweep_accepts_folders(overlay, tmp_path):
    config, sites = overlay
    spec = {
        "base": str(QUICKSTART),
        "overrides": ["--trainer.rounds", "1", "--trainer.progress", "false"],
        "datasets": {"digits": None},
        "methods": {"FLoRA": str(QUICKSTART)},
        "partitions": {"folders": str(config)},
        "seeds": [0],
    }
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    record = cli.run(["sweep", "--config", str(spec_path), "--out", str(out)])
    assert record["counts"] == {"done": 1}
    cell = out / "digits" / "folders" / "FLoRA" / "seed0"
    assert _table_rows(cell)[:3] == _expected_rows(sites)
