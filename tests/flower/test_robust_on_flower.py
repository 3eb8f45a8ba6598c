"""The robust strategies and ``trainer.attack`` on the Flower runtime equal ``flora fit``.

Each robust strategy runs with one attack on a simulation SuperLink (3 nodes) and in-process
with the same seed: the same attackers, accepted clients and accuracy each round, and the same
final adapters. The attack runs on the client (the ClientApp and ``flora fit`` both go
through :func:`~flora_lightning.federation.client_runner.fit_client`), the strategy on the
server (the ServerApp's ``trainer.strategy``).
"""

from __future__ import annotations

import pytest
from test_deployment import federation, flower_env  # noqa: F401 (fixture)
from test_features_on_flower import BASE, assert_same, fit_in_process, run_on_flower

from flora_lightning.federation.attack import Attack

pytestmark = pytest.mark.slow

# 3 clients: Krum / MultiKrum with f = 0 (n > 2f + 2 = 2); one attacker a round (0.34 * 3)
CASES = {
    "Median": "--trainer.strategy Median --trainer.attack '{kind: scale, fraction: 0.34}'",
    "TrimmedMean": "--trainer.strategy TrimmedMean --trainer.strategy.beta 0.34"
    " --trainer.attack '{kind: sign_flip, fraction: 0.34, scale: 2.0}'",
    "Krum": "--trainer.strategy Krum --trainer.strategy.f 0"
    " --trainer.attack '{kind: gaussian, fraction: 0.34, scale: 0.1}'",
    "MultiKrum": "--trainer.strategy MultiKrum --trainer.strategy.f 0 --trainer.strategy.m 2"
    " --trainer.attack '{kind: label_flip, fraction: 0.34}'",
    "FedAvg": "--trainer.attack '{kind: num_samples, fraction: 0.34, scale: 100.0}'",
}


@pytest.mark.parametrize("case", list(CASES))
def test_strategy_under_attack_equals_flora_fit(case, tmp_path, flower_env):  # noqa: F811
    overrides = f"{BASE} {CASES[case]}"
    reference = tmp_path / "in_process"
    fit_in_process(reference, overrides)
    summary = assert_same(
        run_on_flower(tmp_path, flower_env, overrides),
        reference,
        ("test_acc", "accepted_clients", "attackers", "bytes_up"),
    )
    assert summary["attack"]["kind"] == Attack(**summary["attack"]).kind
    drawn = [r["attackers"] for r in summary["rounds"][1:]]
    assert all(len(a) == 1 for a in drawn), drawn
    if case != "FedAvg":  # the ServerApp ran the YAML's strategy
        config = (tmp_path / "flower_run" / "config.yaml").read_text()
        assert f"class_path: flora_lightning.strategy.{case}\n" in config
