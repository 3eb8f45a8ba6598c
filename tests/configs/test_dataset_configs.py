"""``configs/datasets/*.yaml``: the paper's 16 datasets parse, instantiate and fail clearly offline.

The expected class counts below are an independent table taken from the hub dataset cards (and,
for the few copies whose card could not be read, from the dataset's definition); the configs'
class lists must match them. Nothing here downloads data or models.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "datasets"

# file stem -> number of classes of the chosen hub copy, in its label column.
EXPECTED_CLASSES = {
    "fmnist": 10,
    "cifar10": 10,
    "cifar100": 100,
    "tiny_imagenet": 200,
    "pets": 37,
    "flowers102": 102,
    "aircraft": 100,
    "cars": 196,
    "dtd": 47,
    "eurosat": 10,
    "fer2013": 7,
    "caltech101": 102,  # Donghyun99/Caltech-101 keeps BACKGROUND_Google (torchvision drops it: 101)
    "food101": 101,
    "country211": 211,
    "sun397": 397,
    "rendered_sst2": 2,
}

# Copies whose label order could not be checked against a card: class_names stays null so the
# datamodule reads the names from the ClassLabel column (see the comments in those files).
NAMES_FROM_CLASSLABEL = {"aircraft", "cars", "fer2013"}

TEMPLATES = {
    "pets": "a photo of a {}, a type of pet.",
    "flowers102": "a photo of a {}, a type of flower.",
    "aircraft": "a photo of a {}, a type of aircraft.",
    "food101": "a photo of {}, a type of food.",
    "dtd": "a photo of a {} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "fer2013": "a photo of a {} looking face.",
    "country211": "a photo i took in {}.",
    "rendered_sst2": "a {} review of a movie.",
}

NAMES = sorted(EXPECTED_CLASSES)


def config_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.yaml"


def raw_data(name: str) -> dict:
    return yaml.safe_load(config_path(name).read_text())["data"]


@pytest.fixture(scope="module")
def parser():
    from flora_lightning.cli import stage_parser

    return stage_parser("fit")


def test_all_sixteen_files_exist():
    missing = [name for name in NAMES if not config_path(name).is_file()]
    assert not missing, f"missing dataset configs: {missing}"
    assert len(NAMES) == 16


@pytest.mark.parametrize("name", NAMES)
def test_parses_and_instantiates(parser, name):
    cfg = parser.parse_args(["--config", str(config_path(name))])
    init = parser.instantiate_classes(cfg)
    data = init.data
    raw = raw_data(name)
    assert data.dataset == raw["dataset"]
    assert data.test_split == "pooled"
    assert data.pool_splits and len(set(data.pool_splits)) == len(data.pool_splits)
    assert data.test_fraction == pytest.approx(0.2)
    # The paper's main setting: 10 clients, Dirichlet(0.1) with the self-balancing rule.
    assert data.partition.kind == "dirichlet"
    assert data.partition.num_clients == 10
    assert data.partition.beta == pytest.approx(0.1)
    assert data.partition.self_balancing is True
    assert cfg.trainer.default_root_dir == f"runs/{name}"


@pytest.mark.parametrize("name", NAMES)
def test_class_names(parser, name):
    data = parser.instantiate_classes(parser.parse_args(["--config", str(config_path(name))])).data
    if name in NAMES_FROM_CLASSLABEL:
        assert data.class_names is None, f"{name}: names are meant to come from the ClassLabel"
        return
    names = data.class_names
    assert names is not None, f"{name}: class_names missing"
    assert all(isinstance(n, str) and n.strip() for n in names), f"{name}: non-string or empty name"
    assert len(names) == EXPECTED_CLASSES[name], (
        f"{name}: {len(names)} class names, the hub copy has {EXPECTED_CLASSES[name]} classes"
    )
    assert len(set(names)) == len(names), f"{name}: duplicate class names"


@pytest.mark.parametrize("name", NAMES)
def test_template(name):
    template = raw_data(name)["template"]
    assert template.count("{}") == 1
    assert template == TEMPLATES.get(name, "a photo of a {}.")


@pytest.mark.parametrize("name", NAMES)
def test_fails_fast_and_clearly_offline(name, tmp_path):
    """No hub (tests run with HF_HUB_OFFLINE=1): a clear error in seconds, naming the way out."""
    from flora_lightning.data.source import DatasetNotAvailableError, load_source

    raw = raw_data(name)
    dataset, data_dir = raw["dataset"], raw.get("data_dir")
    if data_dir is not None:
        # A local-folder recipe: point it at a folder that surely does not exist.
        data_dir = str(tmp_path / data_dir)
    start = time.monotonic()
    with pytest.raises(DatasetNotAvailableError) as info:
        load_source(dataset, raw.get("subset"), data_dir, raw.get("data_files"))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "data.dataset" in message
    assert dataset in message
    if data_dir is None:  # a hub id: the message says how to use a downloaded copy
        assert "--data.dataset DIR" in message
