"""Pins the private methods of Flower's DP wrappers that ``flower/dp.py`` overrides.

Flower 1.42 has no public hook for the clipping bound a round's noise is scaled by, nor for
the adaptive clipping step, so :mod:`flora_lightning.flower.dp` overrides
``_add_noise_to_aggregated_arrays``, ``_noisy_fraction`` and ``_geometric_update``. If a Flower
release renames them, stops calling them, or calls them by keyword, those overrides would do
nothing, silently; this test fails loudly instead.
"""

from __future__ import annotations

import inspect
import re

import pytest

strategy = pytest.importorskip("flwr.serverapp.strategy")

from flora_lightning.flower import dp  # noqa: E402

HOOKS = {
    "DifferentialPrivacyServerSideFixedClipping": ["_add_noise_to_aggregated_arrays"],
    "DifferentialPrivacyClientSideFixedClipping": ["_add_noise_to_aggregated_arrays"],
    "DifferentialPrivacyServerSideAdaptiveClipping": [
        "_add_noise_to_aggregated_arrays",
        "_noisy_fraction",
        "_geometric_update",
    ],
    "DifferentialPrivacyClientSideAdaptiveClipping": [
        "_add_noise_to_aggregated_arrays",
        "_noisy_fraction",
        "_geometric_update",
    ],
}
PARAMETERS = {
    "_add_noise_to_aggregated_arrays": 1,
    "_noisy_fraction": 2,  # (clipped count, total)
    "_geometric_update": 1,
}


def flower_source(cls) -> str:
    return "".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__.startswith("flwr"))


def calls(source: str, hook: str) -> list[str]:
    """The argument lists of ``self.<hook>(...)`` calls in ``source``."""
    return [m.group(1) for m in re.finditer(rf"self\.{hook}\(([^)]*)\)", source)]


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_flower_still_calls_the_overridden_hooks_positionally(name):
    cls = getattr(strategy, name)
    ours = next(c for c in vars(dp).values() if isinstance(c, type) and cls in c.__mro__[1:])
    source = flower_source(cls)
    for hook in HOOKS[name]:
        assert any(hook in vars(c) for c in ours.__mro__ if c.__module__ == dp.__name__), hook
        parameters = list(inspect.signature(getattr(cls, hook)).parameters)[1:]
        assert len(parameters) == PARAMETERS[hook], (name, hook, parameters)
        found = calls(source, hook)
        assert found, f"Flower's {name} no longer calls {hook}: flower/dp.py's override is dead"
        for args in found:
            args = [a.strip() for a in args.split(",") if a.strip()]
            assert len(args) == PARAMETERS[hook] and not any("=" in a for a in args), (hook, args)


def test_the_overridden_hooks_exist_only_where_flower_defines_them():
    for name, hooks in HOOKS.items():
        cls = getattr(strategy, name)
        for hook in hooks:
            assert callable(getattr(cls, hook, None)), f"{name}.{hook} is gone from Flower"
