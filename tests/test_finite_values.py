"""NaN and infinity are refused in every float setting, naming the field (issue 25).

The float fields are found from the classes' type hints (not listed by hand), so a float field
added later without a finite check fails here. Each bad value must raise a ``ValueError`` that
names the field as the user writes it (``model.optimizer.eps``, ``node-wait-seconds``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing

import numpy as np
import pytest

import flora_lightning.strategy as strategies
from flora_lightning.bench.config import BenchConfig
from flora_lightning.finite_values import check_finite, check_finite_fields, is_non_finite
from flora_lightning.methods.settings import LoraSettings, OptimizerConfig
from flora_lightning.privacy.config import PrivacyConfig
from flora_lightning.strategy import FedProx, Strategy

BAD = [math.nan, math.inf, -math.inf]


def _has_float(hint) -> bool:
    return hint is float or any(_has_float(arg) for arg in typing.get_args(hint))


def dataclass_configs() -> list[tuple[type, typing.Callable[[str], str]]]:
    configs = [
        (OptimizerConfig, lambda f: f"model.optimizer.{f}"),
        (LoraSettings, lambda f: f"model.lora.{f}"),
        (PrivacyConfig, lambda f: f"privacy.{f}"),
        (BenchConfig, lambda f: f"bench --{f}"),
    ]
    try:
        from flora_lightning.flower.app_config import FlowerRunConfig
        from flora_lightning.flower.secagg_config import SecAggConfig
    except ImportError:  # no Flower installed: its configs are not checked here
        return configs
    return configs + [
        (FlowerRunConfig, lambda f: f.replace("_", "-")),
        (SecAggConfig, lambda f: "secagg-" + f.replace("_", "-")),
    ]


def dataclass_cases():
    for cls, name in dataclass_configs():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if not _has_float(hints[field.name]):
                continue
            for bad in BAD:
                if typing.get_origin(hints[field.name]) is tuple:  # betas: one bad element
                    value = (bad, *field.default[1:])
                else:
                    value = bad
                yield pytest.param(
                    cls,
                    field.name,
                    value,
                    name(field.name),
                    id=f"{cls.__name__}.{field.name}={bad}",
                )


@pytest.mark.parametrize(("cls", "field", "value", "shown"), list(dataclass_cases()))
def test_every_float_field_of_a_config_refuses_nan_and_inf(cls, field, value, shown):
    with pytest.raises(ValueError, match=rf"^{re.escape(shown)} must be (a )?finite number"):
        cls(**{field: value})


def test_the_issues_examples_name_the_field():
    """Each passed the old range checks: ``eps <= 0``, ``weight_decay < 0``, ``alpha <= 0`` are
    False for NaN; ``lr > 0`` is True for infinity."""
    cases = [
        (lambda: OptimizerConfig(eps=math.nan), "model.optimizer.eps"),
        (lambda: OptimizerConfig(weight_decay=math.nan), "model.optimizer.weight_decay"),
        (lambda: OptimizerConfig(lr=math.inf), "model.optimizer.lr"),
        (lambda: LoraSettings(alpha=math.nan), "model.lora.alpha"),
    ]
    for build, shown in cases:
        with pytest.raises(ValueError, match=rf"^{re.escape(shown)} must be a finite number"):
            build()


STRATEGIES = [
    cls
    for cls in map(strategies.__dict__.get, strategies.__all__)
    if isinstance(cls, type) and issubclass(cls, Strategy) and not inspect.isabstract(cls)
]
"""Every strategy the package exports (a new one is covered without editing this file)."""


def strategy_cases():
    for cls in STRATEGIES:
        hints = typing.get_type_hints(cls.__init__)
        for name, hint in hints.items():
            if name != "return" and _has_float(hint):
                for bad in BAD:
                    yield pytest.param(cls, name, bad, id=f"{cls.__name__}.{name}={bad}")


@pytest.mark.parametrize(("cls", "field", "value"), list(strategy_cases()))
def test_every_float_argument_of_a_strategy_refuses_nan_and_inf(cls, field, value):
    shown = f"trainer.strategy.{field}"
    with pytest.raises(ValueError, match=rf"^{re.escape(shown)} must be "):
        cls(**{field: value})


def test_strategy_cases_cover_the_server_optimisers_settings():
    """The hint scan finds what it should (a scan that found nothing would pass vacuously)."""
    found = {(p.values[0].__name__, p.values[1]) for p in strategy_cases()}
    assert ("FedAdam", "server_lr") in found and ("FedAdam", "tau") in found
    assert ("FedYogi", "beta_2") in found and ("FedProx", "mu") in found
    assert ("FedAvgM", "momentum") in found
    fields = {p.values[3] for p in dataclass_cases()}
    assert {"model.optimizer.eps", "model.lora.alpha", "privacy.clip_norm"} <= fields


def test_min_clients_nan_is_refused():
    """``min_clients < 1`` was False for NaN: a round would then aggregate zero updates."""
    with pytest.raises(ValueError, match="trainer.strategy.min_clients must be >= 1"):
        FedProx(min_clients=math.nan)


def test_check_finite_shows_the_default_and_accepts_finite_values():
    check_finite({"a": 1.0, "b": 10**400, "c": None, "d": "x", "e": (0.9, 0.98), "f": True})
    with pytest.raises(ValueError, match=r"^x must be a finite number \(got nan\); e.g. 0.5 "):
        check_finite({"x": math.nan}, {"x": 0.5})
    with pytest.raises(ValueError, match=r"^y must be finite numbers \(got \(0.9, inf\)\)\.$"):
        check_finite({"y": (0.9, math.inf)})
    assert is_non_finite(np.float32("nan")) and is_non_finite(np.float64("-inf"))
    assert not is_non_finite(np.int64(3)) and not is_non_finite(1e308)


def test_check_finite_fields_names_a_null_default():
    @dataclasses.dataclass
    class Settings:
        rate: float | None = None

    with pytest.raises(ValueError, match=r"^s.rate must be a finite number \(got inf\); e.g. null"):
        check_finite_fields(Settings(rate=math.inf), lambda f: f"s.{f}")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["deadline", "speed_spread", "dropout", "straggler_fraction"])
def test_availability_refuses_non_finite_values(field, value):
    from flora_lightning.federation.availability import Availability

    with pytest.raises(ValueError, match=f"trainer.availability.{field}"):
        Availability(**{field: value})


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("field", ["noise_multiplier", "clip_norm", "clip_norm_lr"])
def test_dpfedavg_built_directly_refuses_non_finite_values(field, value):
    from flora_lightning.privacy.client_dp import DPFedAvg

    kwargs = dict(noise_multiplier=1.0, clip_norm=1.0, num_sampled_clients=2)
    with pytest.raises(ValueError, match=f"privacy.{field}"):
        DPFedAvg(**{**kwargs, field: value})


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_parallel_memory_budget_refuses_non_finite_values(value):
    from flora_lightning.federation.parallel_memory import check_parallel_settings

    with pytest.raises(ValueError, match="trainer.parallel_memory_mb must be a finite"):
        check_parallel_settings("auto", value)
