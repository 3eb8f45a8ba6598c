"""``flora bench`` options: CLI dispatch, canonical method names, clear errors."""

from __future__ import annotations

import math

import pytest

from flora_lightning.bench import BenchConfig
from flora_lightning.bench.run import bench_parser, config_from


def test_flora_cli_dispatches_bench_and_canonicalises_methods():
    from flora_lightning.cli import build_parser

    config = build_parser().parse_args(
        ["bench", "--methods", "[flora, FEDFFT]", "--arch", "tiny", "--steps", "3"]
    )
    assert config.subcommand == "bench"
    cfg = config_from(config.bench)
    assert cfg.methods == ["FLoRA", "FedFFT"] and cfg.steps == 3
    assert cfg.steps_per_epoch == math.ceil(5000 / 128) == 40


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(methods=["LoRA"]), "choose from FLoRA, FLoRA-uncached"),
        (dict(steps=0), "--steps must be >= 1"),
        (dict(precision="16-mixed"), "needs --device cuda"),
    ],
)
def test_bad_options_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**kwargs)


def test_caching_is_timed_on_four_batches_by_default_and_never_less_than_one():
    assert BenchConfig().encoded_images == 4 * 128
    assert BenchConfig(encode_samples=10).encoded_images == 128
    assert BenchConfig(encode_samples=1000).encoded_images == 1000
    cfg = BenchConfig(client_samples=5000, batch_size=128)
    assert (cfg.steps_per_epoch, cfg.full_steps_per_epoch) == (40, 39)


def test_options_are_the_dataclass_fields_and_the_report_command_rebuilds_the_config():
    from dataclasses import fields

    parser = bench_parser()
    assert {f.name for f in fields(BenchConfig)} <= set(parser.get_defaults().as_dict())
    cfg = BenchConfig(arch="tiny", methods=["fedfft", "flora"], steps=3, encode_samples=64)
    assert cfg.to_argv()[:2] == ["--methods", "[FedFFT,FLoRA]"]
    assert config_from(parser.parse_args(cfg.to_argv())) == cfg
    with pytest.raises(Exception, match="steps"):
        parser.parse_args(["--steps", "many"])


def test_the_method_list_is_derived_from_methods(monkeypatch):
    from flora_lightning.bench.config import variants
    from flora_lightning.bench.workload import build_method
    from flora_lightning.methods import METHODS, FedLC

    class FedNew(FedLC):
        """A method defined here: registering it is all the bench needs."""

    assert variants() == ("FLoRA", "FLoRA-uncached", "FedFFT", "FedLC", "FedVMLC", "FedAA")
    monkeypatch.setitem(METHODS, "fednew", FedNew)
    assert BenchConfig().methods[-1] == "FedNew"
    assert BenchConfig(methods=["fednew", "flora"]).methods == ["FedNew", "FLoRA"]
    with pytest.raises(ValueError, match="choose from FLoRA, FLoRA-uncached, .*, FedAA, FedNew"):
        BenchConfig(methods=["FedOld"])
    module = build_method("FedNew", "tiny", num_classes=3)
    assert type(module) is FedNew and module.class_names[:3] == ["airplane", "automobile", "bird"]
