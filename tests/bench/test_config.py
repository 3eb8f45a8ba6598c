"""``flora bench`` options: CLI dispatch, canonical method names, clear errors."""

from __future__ import annotations

import math

import pytest

from flora_lightning.bench import BenchConfig, config_from, encode_samples


def test_flora_cli_dispatches_bench_and_canonicalises_methods():
    from flora_lightning.cli import build_parser

    config = build_parser().parse_args(
        ["bench", "--methods", "flora", "FEDFFT", "--arch", "tiny", "--steps", "3"]
    )
    assert config.subcommand == "bench"
    cfg, worker = config_from(config.bench)
    assert cfg.methods == ["FLoRA", "FedFFT"] and cfg.steps == 3 and worker is None
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
    assert encode_samples(BenchConfig()) == 4 * 128
    assert encode_samples(BenchConfig(encode_samples=10)) == 128
    assert encode_samples(BenchConfig(encode_samples=1000)) == 1000
    cfg = BenchConfig(client_samples=5000, batch_size=128)
    assert (cfg.steps_per_epoch, cfg.full_steps_per_epoch) == (40, 39)
    assert BenchConfig(arch="tiny", methods=["fedfft"], steps=3).to_argv()[:2] == [
        "--methods",
        "FedFFT",
    ]


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
