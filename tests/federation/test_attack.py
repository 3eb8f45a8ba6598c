"""trainer.attack: the seeded attacker draw, each kind's update against a hand computation,
label flipping in the batches, the config checks, and a run that records its attackers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flora_lightning.federation.attack import ATTACK_STREAM, Attack, FlippedLabels
from flora_lightning.strategy import ClientUpdate

SHAPES = {"a": (2, 3), "b": (4,)}


def states(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}


def test_attackers_are_floor_fraction_of_the_sampled_seeded_and_repeatable():
    attack = Attack(kind="scale", fraction=0.4)
    clients = [7, 2, 9, 4, 5]
    drawn = attack.attackers(42, 3, clients)
    assert len(drawn) == 2 and set(drawn) <= set(clients) and drawn == sorted(drawn)
    assert attack.attackers(42, 3, list(reversed(clients))) == drawn  # order-free
    # the documented draw: default_rng([seed, round, ATTACK_STREAM]) over the sorted clients
    rng = np.random.default_rng([42, 3, ATTACK_STREAM])
    assert drawn == sorted(int(c) for c in rng.choice([2, 4, 5, 7, 9], size=2, replace=False))
    rounds = {tuple(attack.attackers(42, r, clients)) for r in range(1, 30)}
    assert len(rounds) > 1  # a fresh draw each round
    assert Attack(kind="scale", fraction=0.2).attackers(42, 1, [0, 1, 2, 3, 4]) != []
    assert Attack(kind="scale", fraction=0.1).attackers(42, 1, [0, 1, 2, 3, 4]) == []


@pytest.mark.parametrize("kind", ["scale", "sign_flip", "gaussian", "num_samples", "label_flip"])
def test_each_kind_sends_what_the_docs_say(kind):
    g, w = states(0), states(1)
    update = ClientUpdate(client_id=3, state=w, num_samples=40, train_loss=0.5)
    sent = Attack(kind=kind, fraction=0.5, scale=2.5).corrupt(update, g, seed=7, round_=4)
    for name in SHAPES:
        gn, wn = g[name].double().numpy(), w[name].double().numpy()
        if kind == "scale":
            expected = gn + 2.5 * (wn - gn)
        elif kind == "sign_flip":
            expected = gn - 2.5 * (wn - gn)
        elif kind == "gaussian":  # i-th tensor by name: default_rng([seed, round, client, 103, i])
            i = sorted(SHAPES).index(name)
            noise = np.random.default_rng([7, 4, 3, 103, i]).standard_normal(SHAPES[name])
            expected = gn + 2.5 * noise
        else:
            expected = wn
        # float32 arithmetic of at most 3 ops on values ~1: a few ulps (1e-6 relative)
        np.testing.assert_allclose(sent.state[name].numpy(), expected, rtol=1e-6, atol=1e-6)
        assert sent.state[name].dtype == torch.float32
    assert sent.num_samples == (100 if kind == "num_samples" else 40)
    assert sent.client_id == 3 and sent.train_loss == 0.5


def test_gaussian_noise_has_the_scale_as_std():
    g = {"x": torch.zeros(200, 200)}
    update = ClientUpdate(0, {"x": torch.ones(200, 200)}, 10, 0.0)
    sent = Attack(kind="gaussian", fraction=0.5, scale=3.0).corrupt(update, g, 1, 1)
    # 40,000 draws: the sample std is within 3 / sqrt(2 * 40000) * 5 (five standard errors)
    assert abs(float(sent.state["x"].std()) - 3.0) < 5 * 3.0 / (2 * 40000) ** 0.5


def test_flipped_labels_only_for_attackers():
    class Source:
        def client_dataloader(self, client, generator, batch_sampler=None):
            x = torch.arange(6.0).unsqueeze(1)
            y = torch.tensor([0, 1, 2, 3, 4, 9])
            return DataLoader(TensorDataset(x, y), batch_size=6)

        extra = "kept"

    flipped = FlippedLabels(Source(), attackers=[1], num_classes=10)
    (_, y_attacker), = list(flipped.client_dataloader(1, None))  # fmt: skip
    (_, y_honest), = list(flipped.client_dataloader(0, None))  # fmt: skip
    assert y_attacker.tolist() == [9, 8, 7, 6, 5, 0]  # y -> C - 1 - y
    assert y_honest.tolist() == [0, 1, 2, 3, 4, 9]
    assert flipped.extra == "kept"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "nope"}, "trainer.attack.kind must be one of scale, sign_flip"),
        ({"kind": "scale", "fraction": 0.0}, r"trainer.attack.fraction must be in \(0, 1\)"),
        ({"kind": "scale", "fraction": 1.0}, r"trainer.attack.fraction must be in \(0, 1\)"),
        ({"kind": "scale", "fraction": float("nan")}, "trainer.attack.fraction"),
        ({"kind": "scale", "scale": float("inf")}, "trainer.attack.scale must be a finite"),
        ({"kind": "gaussian", "scale": -1.0}, "trainer.attack.scale must be > 0 for kind gauss"),
    ],
)
def test_bad_attack_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Attack(**kwargs)


def test_early_config_check_refuses_a_bad_attack(tmp_path):
    from flora_lightning.config_check import check_stage_args

    with pytest.raises(Exception, match=r"trainer.attack.fraction must be in \(0, 1\)"):
        check_stage_args(
            [
                "fit",
                "--config",
                "configs/quickstart.yaml",
                "--trainer.attack",
                "{kind: scale, fraction: 1.5}",
            ]  # fmt: skip
        )


@pytest.mark.slow
def test_quickstart_records_attackers_and_the_attack_changes_the_run(tmp_path):
    """A 2-round in-process run: each round's drawn attackers are in summary.json, the attack
    is in the summary, and the sign-flipped run ends elsewhere than the clean one."""
    from flora_lightning import cli

    base = ["fit", "--config", "configs/quickstart.yaml", "--trainer.rounds", "2",
            "--trainer.max_local_steps", "2", "--data.max_test_samples", "64",
            "--trainer.progress", "false"]  # fmt: skip
    clean = cli.run([*base, "--trainer.default_root_dir", str(tmp_path / "clean")])
    attacked = cli.run(
        [
            *base,
            "--trainer.default_root_dir",
            str(tmp_path / "attacked"),
            "--trainer.attack",
            "{kind: sign_flip, fraction: 0.4, scale: 5.0}",
        ]  # fmt: skip
    )
    summary = json.loads((tmp_path / "attacked" / "summary.json").read_text())
    assert summary["attack"] == {"kind": "sign_flip", "fraction": 0.4, "scale": 5.0}
    expected = [Attack("sign_flip", 0.4).attackers(42, r, [0, 1, 2, 3, 4]) for r in (1, 2)]
    assert [r["attackers"] for r in summary["rounds"]] == [[], *expected]
    assert all(len(a) == 2 for a in expected)
    assert "attackers" not in clean["rounds"][1]
    assert attacked["rounds"][2]["test_loss"] != clean["rounds"][2]["test_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["true", "false"])
def test_label_flip_changes_only_the_attackers_fit(cache, tmp_path):
    """Cached features and uncached pixels: the attacker's training loss changes (it trains on
    flipped labels), every other client's fit is exactly the clean one."""
    from flora_lightning import cli

    base = ["fit", "--config", "configs/quickstart.yaml", "--trainer.rounds", "1",
            "--trainer.max_local_steps", "1", "--data.max_test_samples", "32",
            "--trainer.progress", "false", "--trainer.cache_features", cache]  # fmt: skip
    clean = cli.run([*base, "--trainer.default_root_dir", str(tmp_path / "clean")])
    flipped = cli.run([*base, "--trainer.default_root_dir", str(tmp_path / "flip"),
                       "--trainer.attack", "{kind: label_flip, fraction: 0.2}"])  # fmt: skip
    (attacker,) = flipped["rounds"][1]["attackers"]
    ours, theirs = (
        flipped["rounds"][1]["client_train_loss"],
        clean["rounds"][1]["client_train_loss"],
    )
    assert ours[str(attacker)] != theirs[str(attacker)]
    assert {k: v for k, v in ours.items() if k != str(attacker)} == {
        k: v for k, v in theirs.items() if k != str(attacker)
    }
