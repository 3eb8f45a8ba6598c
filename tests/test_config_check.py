"""The early config check reads the same fields as the full parser (no drift), from source.

:mod:`flora_lightning.config_check` builds its parser from signatures read from the source
files; these tests compare them with the real classes (imported here), so a field added,
renamed or retyped in ``FederatedLoop``, ``FederatedDataModule`` or a method cannot make the
early check refuse a good config or miss a bad one.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest

from flora_lightning.config_check import check_stage_args, early_parser, light_args
from flora_lightning.data.datamodule import FederatedDataModule
from flora_lightning.federation.loop import FederatedLoop
from flora_lightning.methods import METHODS
from flora_lightning.source_signature import source_signature, subclass_names
from flora_lightning.stages import stage_parser
from flora_lightning.strategy import Strategy

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [FederatedLoop, FederatedDataModule, *METHODS.values()]


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_source_signature_matches_the_class(cls):
    """Names, kinds, defaults and (where not opaque) types equal the imported ``__init__``'s."""
    read = source_signature(cls.__module__, cls.__name__)
    real = inspect.signature(cls.__init__).parameters
    stand_in = inspect.signature(read.function).parameters
    assert list(stand_in) == [name for name in real if name != "self"]
    hints = typing.get_type_hints(cls.__init__)
    for name, param in stand_in.items():
        assert param.default == real[name].default, name
        if name not in read.opaque:
            assert param.annotation == hints[name], name
    # opaque: only types that name a class of a heavy module (checked by the full parser)
    assert read.opaque <= {"strategy", "callbacks", "data_files"}, read.opaque


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_early_parser_has_the_full_parsers_fields_and_defaults(stage):
    full = stage_parser(stage).get_defaults()
    _, early_stage, opaque = early_parser(stage)
    early = early_stage.get_defaults()

    def plain(keys):
        return {k for k in keys if not any(k == f or k.startswith(f + ".") for f in opaque)}

    full_keys, early_keys = plain(full.keys()), plain(early.keys())
    assert "trainer.rounds" in early_keys and "data.partition.kind" in early_keys
    assert full_keys - {"config"} == early_keys - {"config"}
    for key in full_keys - {"config"}:
        assert early[key] == full[key], key


def test_subclass_names_are_the_imported_subclasses():
    """Read from source: the same public concrete classes Python sees after the imports."""

    def concrete(base):
        found, todo = set(), list(base.__subclasses__())
        while todo:
            cls = todo.pop()
            todo += cls.__subclasses__()
            if cls.__module__.startswith("flora_lightning") and not cls.__name__.startswith("_"):
                if not inspect.isabstract(cls):
                    found.add(cls.__name__)
        return found

    import flora_lightning.privacy.client_dp  # noqa: F401  (DPFedAvg)
    import flora_lightning.strategy.fedopt  # noqa: F401

    assert set(subclass_names("Strategy")) == concrete(Strategy)
    assert set(subclass_names("FederatedCLIPModule")) == set(c.__name__ for c in METHODS.values())


def test_light_args_drop_options_inside_opaque_fields():
    args = ["fit", "--model.lora.rank", "4", "--model.class_path=FedFFT", "--trainer.rounds", "2",
            "--trainer.strategy.init_args.mu", "0.1", "--trainer.strategy.class_path", "FedProx"]  # fmt: skip
    assert light_args(args, {"model", "trainer.strategy"}) == [
        "fit", "--model", "FedFFT", "--trainer.rounds", "2", "--trainer.strategy", "FedProx"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "config",
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml")),
)
def test_shipped_configs_pass(config):
    check_stage_args(["fit", "--config", str(ROOT / config)])


@pytest.mark.parametrize(
    "extra",
    [
        ["--model", "FedFFT"],
        ["--model", "flora_lightning.methods.flora.FLoRA", "--model.lora.alpha", "16"],
        ["--trainer.strategy", "FedProx", "--trainer.strategy.mu", "0.1"],
        ["--trainer.strategy", "{class_path: FedAdam, init_args: {server_lr: 0.1}}"],
        ["--trainer.client_ranks", "[1, 2, 2, 1, 2]"],
        ["--data.partition.kind", "fewshot", "--data.partition.shots", "4"],
        ["--config", "configs/methods/fedaa.yaml", "--config", "configs/partitions/iid.yaml"],
    ],
)
def test_good_settings_pass(extra, monkeypatch):
    monkeypatch.chdir(ROOT)
    check_stage_args(["fit", "--config", "configs/quickstart.yaml", *extra])
