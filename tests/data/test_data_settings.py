"""``data.*`` checks (torch-free): finite floats, kind=folders paths, before the heavy imports."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from flora_lightning.config_check import check_stage_args
from flora_lightning.data.partition_config import PartitionConfig
from flora_lightning.data.settings import check_data_settings

REPO = Path(__file__).resolve().parents[2]
GOOD = dict(
    template="a photo of a {}.",
    test_fraction=0.2,
    batch_size=8,
    eval_batch_size=8,
    max_test_samples=None,
    local_test_fraction=None,
    num_workers=0,
    preprocess="device",
    test_split="test",
    pool_splits=("train", "test"),
)


def folders(dirs: list, **kwargs) -> PartitionConfig:
    """``kind=folders`` over ``dirs`` (one client per path)."""
    return PartitionConfig(kind="folders", num_clients=len(dirs), client_dirs=dirs, **kwargs)


@pytest.mark.parametrize(
    "field", ["test_fraction", "local_test_fraction", "max_unreadable_fraction"]
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_must_be_finite(field, value):
    with pytest.raises(ValueError, match=rf"^data\.{field} must be a finite number"):
        check_data_settings(**{**GOOD, field: value})


def test_max_unreadable_fraction_range():
    check_data_settings(**GOOD, max_unreadable_fraction=0.5)
    with pytest.raises(ValueError, match=r"data.max_unreadable_fraction must be in \[0, 1\)"):
        check_data_settings(**GOOD, max_unreadable_fraction=1.0)


def test_folder_paths_must_exist(tmp_path):
    (tmp_path / "a").mkdir()
    partition = folders([str(tmp_path / "a"), "hub:x/y"])
    check_data_settings(**GOOD, partition=partition, class_names=["cat"])
    missing = folders([str(tmp_path / "a"), "sites/none"])
    with pytest.raises(ValueError, match=r"data.partition.client_dirs\[1\]='sites/none': no such"):
        check_data_settings(**GOOD, partition=missing, class_names=["cat"])
    with pytest.raises(ValueError, match=r"data.test_dataset='nope': no such directory"):
        check_data_settings(**GOOD, partition=partition, class_names=["cat"], test_dataset="nope")


def test_folders_needs_class_names_and_one_kind_of_local_test(tmp_path):
    partition = folders([str(tmp_path)], client_test_dirs=[str(tmp_path)])
    with pytest.raises(ValueError, match="data.class_names is required with data.partition.kind"):
        check_data_settings(**GOOD, partition=partition)
    with pytest.raises(ValueError, match="data.local_test_fraction and data.partition.client_test"):
        check_data_settings(
            **{**GOOD, "local_test_fraction": 0.2}, partition=partition, class_names=["cat"]
        )


def test_test_dataset_must_exist_with_any_kind():
    with pytest.raises(ValueError, match="data.test_dataset='t': no such directory"):
        check_data_settings(**GOOD, partition=PartitionConfig(), test_dataset="t")


def _fit(*args: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), *args]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.partition.kind", "folders"], r"data.partition.kind=folders needs"),
        (
            ["--data.partition.kind", "folders", "--data.partition.client_dirs", "[]"],
            r"data.partition.client_dirs must be a non-empty list",
        ),
        (
            [
                "--data.partition.kind=folders",
                "--data.partition.num_clients=1",
                "--data.class_names=[a]",
                "--data.partition.client_dirs=[/no/such/site]",
            ],
            r"data.partition.client_dirs\[0\]='/no/such/site': no such directory",
        ),
        (["--data.test_fraction", ".nan"], r"data.test_fraction must be a finite number"),
        (["--data.partition.beta", "1e400"], r"data.partition.beta must be a finite number"),
    ],
)
def test_flora_reports_them_before_the_heavy_imports(args, message):
    # check_stage_args refuses torch, datasets, ... while it runs: the error comes first
    with pytest.raises(ValueError, match=message):
        check_stage_args(_fit(*args))
