"""The Flower app folder and run config: components resolve, keys match, bad keys are named."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

from flora_lightning.flower.app_config import FlowerRunConfig  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "flower_app" / "pyproject.toml"


def test_app_components_and_run_config_keys():
    flwr = tomllib.loads(APP.read_text())["tool"]["flwr"]["app"]
    kinds = {"serverapp": ServerApp, "clientapp": ClientApp}
    for component, kind in kinds.items():
        module, attribute = flwr["components"][component].split(":")
        assert isinstance(getattr(importlib.import_module(module), attribute), kind)
    run = FlowerRunConfig.from_run_config(flwr["config"])
    assert run == FlowerRunConfig()
    assert run.config_path().name == "quickstart.yaml"  # found relative to the repository


def test_run_config_overrides_and_errors():
    run = FlowerRunConfig.from_run_config(
        {"num-server-rounds": 3, "out-dir": "/tmp/x", "overrides": "--trainer.seed 1"},
        defaults={"min-clients": 2},
    )
    args = run.cli_args()
    assert args[2:] == [
        "--trainer.rounds",
        "3",
        "--trainer.default_root_dir",
        "/tmp/x",
        "--trainer.progress",
        "false",
        "--trainer.seed",
        "1",
    ]
    assert run.min_clients == 2
    with pytest.raises(ValueError, match=r"unknown Flower run-config key\(s\) \['num-rounds'\]"):
        FlowerRunConfig.from_run_config({"num-rounds": 3})
    with pytest.raises(ValueError, match="num-server-rounds must be >= 0"):
        FlowerRunConfig(num_server_rounds=-1)
    with pytest.raises(FileNotFoundError, match="absolute path"):
        FlowerRunConfig(config="nowhere.yaml").config_path()


def test_resume_and_node_wait_seconds():
    run = FlowerRunConfig.from_run_config({"resume": True, "node-wait-seconds": 5})
    assert run.node_wait_seconds == 5
    args = run.cli_args()
    assert args[args.index("--trainer.resume") + 1] == "true"
    assert "--trainer.resume" not in FlowerRunConfig().cli_args()
    with pytest.raises(ValueError, match="node-wait-seconds must be >= 0"):
        FlowerRunConfig(node_wait_seconds=-1)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_node_wait_seconds_must_be_finite(value):
    """TOML reads ``nan`` as a float: ``nan < 0`` was False, and the round's wait for a missing
    node then never ended (``now >= start + nan`` is never true)."""
    run_config = tomllib.loads(f"node-wait-seconds = {value}")
    with pytest.raises(
        ValueError, match=rf"^node-wait-seconds must be a finite number \(got {value}\)"
    ):
        FlowerRunConfig.from_run_config(run_config)


def test_dp_clipping_side():
    assert FlowerRunConfig().dp_clipping == "server"
    assert FlowerRunConfig.from_run_config({"dp-clipping": "client"}).dp_clipping == "client"
    with pytest.raises(ValueError, match="dp-clipping must be 'server' or 'client'"):
        FlowerRunConfig.from_run_config({"dp-clipping": "node"})


@pytest.mark.parametrize("key", ["resume", "one-partition-per-node"])
def test_boolean_keys_refuse_a_quoted_value(key):
    assert FlowerRunConfig.from_run_config({key: True})
    with pytest.raises(ValueError, match=f"{key} must be true or false, unquoted"):
        FlowerRunConfig.from_run_config({key: "false"})


@pytest.mark.parametrize(
    ("key", "value"),
    [("node-wait-seconds", '"nan"'), ("node-wait-seconds", "true"), ("num-server-rounds", "2.5")],
)
def test_number_keys_refuse_a_string_or_bool(key, value):
    """A quoted number is a TOML string: comparing it with 0 raised a TypeError before."""
    run_config = tomllib.loads(f"{key} = {value}")
    with pytest.raises(ValueError, match=rf"^{key} must be a (whole )?number, unquoted"):
        FlowerRunConfig.from_run_config(run_config)
