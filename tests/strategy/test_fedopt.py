"""Server optimisers: one and two rounds against Reddi et al.'s Algorithm 2 by hand."""

from __future__ import annotations

import math

import pytest
import torch

from flora_lightning.strategy import (
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
)

SHAPES = {"layer.lora_A": (2, 8), "layer.lora_B": (8, 2), "scale": (3,)}
WEIGHTS = [10, 3, 250]
SPREAD = {"layer.lora_A": 0.01, "layer.lora_B": 1.0, "scale": 5.0}
"""Client change scale per tensor: small and large deltas exercise both of Yogi's signs."""


def random_state(seed: int, around: dict | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (0 if around is None else around[name])
        + SPREAD[name] * torch.randn(shape, generator=gen)
        for name, shape in SHAPES.items()
    }


def round_of(strategy, global_state, seed: int):
    """One round of ``strategy`` from ``global_state``; returns (client states, new state)."""
    states = [random_state(seed + k, around=global_state) for k in range(len(WEIGHTS))]
    strategy.begin(global_state)
    for k, (s, n) in enumerate(zip(states, WEIGHTS, strict=True)):
        assert strategy.add(ClientUpdate(client_id=k, state=s, num_samples=n, train_loss=0.0))
    return states, strategy.result()


def by_hand(kind: str, hp: dict, w: torch.Tensor, clients: list[torch.Tensor], m, v):
    """Algorithm 2 for one tensor in float64 plain torch: returns (w_next, m, v)."""
    w = w.double()
    delta = sum(n * (c.double() - w) for c, n in zip(clients, WEIGHTS, strict=True)) / sum(WEIGHTS)
    lr, tau = hp["server_lr"], hp.get("tau")
    if kind == "FedAvgM":
        m = hp["momentum"] * (m if m is not None else 0.0) + delta
        return w + lr * m, m, None
    beta_1 = hp["beta_1"]
    m = (1 - beta_1) * delta + (beta_1 * m if m is not None else 0.0)
    v = v if v is not None else torch.full_like(delta, tau**2)
    if kind == "FedAdagrad":
        v = v + delta * delta
    elif kind == "FedYogi":
        v = v - (1 - hp["beta_2"]) * delta * delta * torch.sign(v - delta * delta)
    else:  # FedAdam
        v = hp["beta_2"] * v + (1 - hp["beta_2"]) * delta * delta
    return w + lr * m / (torch.sqrt(v) + tau), m, v


CASES = [
    (FedAvgM, {"server_lr": 0.7, "momentum": 0.9}),
    (FedAdagrad, {"server_lr": 0.1, "beta_1": 0.5, "tau": 1e-2}),
    (FedYogi, {"server_lr": 0.03, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    (FedAdam, {"server_lr": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
]


@pytest.mark.parametrize(("cls", "hp"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_two_rounds_match_the_hand_computation(cls, hp):
    strategy = cls(**hp)
    glob = random_state(0)
    moments = {name: (None, None) for name in SHAPES}
    yogi_signs = set()
    for round_ in range(2):
        clients, result = round_of(strategy, glob, seed=10 * (round_ + 1))
        for name in SHAPES:
            m, v = moments[name]
            if cls is FedYogi and v is not None:
                delta = sum(
                    n * (c[name].double() - glob[name].double())
                    for c, n in zip(clients, WEIGHTS, strict=True)
                ) / sum(WEIGHTS)
                yogi_signs |= set(torch.sign(v - delta * delta).flatten().tolist())
            expected, m, v = by_hand(cls.__name__, hp, glob[name], [c[name] for c in clients], m, v)
            moments[name] = (m, v)
            assert result[name].dtype == torch.float32
            torch.testing.assert_close(result[name].double(), expected, rtol=1e-6, atol=1e-6)
            # The strategy keeps exactly these moments (float64) for the next round.
            torch.testing.assert_close(strategy.moments["m"][name], m, rtol=1e-12, atol=1e-12)
            if v is not None:
                torch.testing.assert_close(strategy.moments["v"][name], v, rtol=1e-12, atol=1e-12)
        glob = result
    if cls is FedYogi:
        assert yogi_signs >= {-1.0, 1.0}  # both branches of the sign were taken


def test_fedadam_first_round_by_the_numbers():
    # One scalar, two clients: w = 0, w_1 = 1 (n=1), w_2 = 3 (n=3) -> Delta = 2.5.
    strategy = FedAdam(server_lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    strategy.begin({"w": torch.zeros(1)})
    strategy.add(ClientUpdate(0, {"w": torch.ones(1)}, num_samples=1, train_loss=0.0))
    strategy.add(ClientUpdate(1, {"w": torch.full((1,), 3.0)}, num_samples=3, train_loss=0.0))
    m = 0.1 * 2.5
    v = 0.99 * 1e-6 + 0.01 * 2.5**2
    expected = 0.1 * m / (math.sqrt(v) + 1e-3)
    assert strategy.result()["w"].item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.0996, abs=1e-4)  # close to eta * sign(Delta)


def test_fedavgm_with_unit_lr_and_no_momentum_is_fedavg():
    fedavgm, fedavg = FedAvgM(server_lr=1.0, momentum=0.0), FedAvg()
    glob_m = glob_a = random_state(0)
    for seed in (10, 20):
        _, glob_m = round_of(fedavgm, glob_m, seed)
        _, glob_a = round_of(fedavg, glob_a, seed)
        for name in SHAPES:
            torch.testing.assert_close(glob_m[name], glob_a[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("cls", "hp"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_state_dict_resumes_the_same_trajectory(cls, hp):
    uninterrupted, first = cls(**hp), cls(**hp)
    glob = random_state(0)
    _, after_one = round_of(uninterrupted, glob, seed=10)
    round_of(first, glob, seed=10)
    saved = first.state_dict()
    slots = ["m"] if cls is FedAvgM else ["m", "v"]
    assert set(saved) == {f"{slot}.{name}" for slot in slots for name in SHAPES}
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in saved.values())
    resumed = cls(**hp)
    resumed.load_state_dict(saved)
    _, expected = round_of(uninterrupted, after_one, seed=20)
    _, got = round_of(resumed, after_one, seed=20)
    for name in SHAPES:
        assert torch.equal(got[name], expected[name])
    # A fresh strategy (no moments) takes a different second step.
    _, fresh = round_of(cls(**hp), after_one, seed=20)
    assert not torch.equal(fresh["layer.lora_B"], expected["layer.lora_B"])


def test_state_dict_is_a_copy():
    strategy = FedAdam()
    round_of(strategy, random_state(0), seed=10)
    saved = strategy.state_dict()
    saved["m.scale"].add_(1.0)
    assert not torch.equal(saved["m.scale"], strategy.moments["m"]["scale"])


def test_load_state_dict_refuses_foreign_state():
    with pytest.raises(ValueError, match=r"FedAvgM keeps moments \['m'\], not 'v.scale'"):
        FedAvgM().load_state_dict({"v.scale": torch.zeros(3)})
    strategy = FedAdam()
    strategy.load_state_dict({"m.other": torch.zeros(3), "v.other": torch.zeros(3)})
    with pytest.raises(ValueError, match="global state does not match"):
        strategy.begin(random_state(0))


def test_stateless_strategy_has_an_empty_state_dict():
    assert FedAvg().state_dict() == {}
    FedAvg().load_state_dict({})
    with pytest.raises(ValueError, match="FedAvg keeps no server state"):
        FedAvg().load_state_dict({"m.scale": torch.zeros(3)})


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (FedAdam, {"server_lr": 0.0}, "trainer.strategy.server_lr must be > 0 (got 0.0)"),
        (FedAvgM, {"server_lr": -1.0}, "trainer.strategy.server_lr must be > 0 (got -1.0)"),
        (FedYogi, {"server_lr": float("nan")}, "trainer.strategy.server_lr must be a finite"),
        (FedAdam, {"beta_1": 1.0}, "trainer.strategy.beta_1 must be in [0, 1) (got 1.0)"),
        (FedYogi, {"beta_1": -0.1}, "trainer.strategy.beta_1 must be in [0, 1) (got -0.1)"),
        (FedAdam, {"beta_2": 1.5}, "trainer.strategy.beta_2 must be in [0, 1) (got 1.5)"),
        (FedYogi, {"beta_2": 1.0}, "trainer.strategy.beta_2 must be in [0, 1)"),
        (FedAdagrad, {"beta_1": 1.0}, "trainer.strategy.beta_1 must be in [0, 1)"),
        (FedAvgM, {"momentum": 1.0}, "trainer.strategy.momentum must be in [0, 1) (got 1.0)"),
        (FedAdam, {"tau": 0.0}, "trainer.strategy.tau must be > 0 (got 0.0)"),
        (FedAdagrad, {"tau": -1e-3}, "trainer.strategy.tau must be > 0 (got -0.001)"),
        (FedYogi, {"min_clients": 0}, "trainer.strategy.min_clients must be >= 1"),
    ],
)
def test_bad_hyperparameters_are_rejected_naming_the_field(cls, kwargs, message):
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    assert message in str(err.value)


def test_fedavgm_help_says_why_its_momentum_default_differs_from_flowers(capsys):
    # Flower's FedAvgM defaults to server_momentum 0 (plain FedAvg at lr 1); ours keeps Hsu et
    # al.'s 0.9, and --help must say so (issue 19: follow the convention or say why not).
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(FedAvgM, "strategy")
    parser.print_help()
    text = " ".join(capsys.readouterr().out.split())
    assert "Flower's FedAvgM defaults to 0" in text
    assert FedAvgM().momentum == 0.9
