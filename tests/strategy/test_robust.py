"""Median, TrimmedMean, Krum, MultiKrum against independent numpy recomputations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from flora_lightning.strategy import ClientUpdate, Krum, Median, MultiKrum, TrimmedMean

SHAPES = {"layer.lora_A.default.weight": (2, 8), "layer.lora_B.default.weight": (8, 2),
          "scale": (3,)}  # fmt: skip
WEIGHTS = [10, 3, 250, 37, 5, 60]

# float32 results of float64 math: one rounding to float32, so a relative 2**-24 (6e-8) per
# value; 1e-6 leaves room for the summation order of a mean of <= 6 values in float64.
RTOL, ATOL = 1e-6, 1e-7


def random_state(seed: int, offset: float = 0.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) + offset for n, s in SHAPES.items()}


def make_updates(count: int, byzantine: int = 0) -> list[ClientUpdate]:
    """``count`` honest updates near 0, then ``byzantine`` far ones (offset 100)."""
    return [
        ClientUpdate(k, random_state(k + 1, 100.0 if k >= count else 0.0), WEIGHTS[k], 1.0)
        for k in range(count + byzantine)
    ]


def run(strategy, updates, order=None):
    strategy.begin(random_state(0))
    for i in order or range(len(updates)):
        assert strategy.add(updates[i])
    return strategy.result()


def stack(updates, name) -> np.ndarray:
    return np.stack([u.state[name].numpy().astype(np.float64) for u in updates])


@pytest.mark.parametrize("n", [5, 6])
def test_median_is_numpys_coordinate_median_unweighted(n):
    updates = make_updates(n)
    result = run(Median(), updates)
    for name in SHAPES:
        expected = np.median(stack(updates, name), axis=0)  # even n: mean of the middle two
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=RTOL, atol=ATOL)
        assert result[name].dtype == torch.float32


def test_median_ignores_one_far_update():
    updates = make_updates(4, byzantine=1)
    result = run(Median(), updates)
    for name in SHAPES:  # every coordinate stays within the honest values' range
        honest = stack(updates[:4], name)
        assert (result[name].numpy() <= honest.max(0) + 1e-6).all()
        assert (result[name].numpy() >= honest.min(0) - 1e-6).all()


@pytest.mark.parametrize(("beta", "n"), [(0.2, 6), (0.34, 6), (0.0, 5), (0.49, 5)])
def test_trimmed_mean_matches_sorting_by_hand(beta, n):
    updates = make_updates(n)
    result = run(TrimmedMean(beta=beta), updates)
    k = int(np.floor(beta * n))
    for name in SHAPES:
        values = np.sort(stack(updates, name), axis=0)
        expected = values[k : n - k].mean(axis=0)
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=RTOL, atol=ATOL)


def test_trimmed_mean_beta_refused():
    for beta in (0.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"trainer.strategy.beta must be in \[0, 0.5\)"):
            TrimmedMean(beta=beta)


def numpy_krum_scores(updates, f: int) -> np.ndarray:
    """Blanchard et al.'s score, by hand: flattened whole updates, n - f - 2 nearest."""
    flat = np.stack(
        [
            np.concatenate([u.state[n].numpy().astype(np.float64).ravel() for n in SHAPES])
            for u in updates
        ]  # fmt: skip
    )
    n = len(updates)
    scores = []
    for i in range(n):
        d = sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return np.array(scores)


def test_krum_picks_the_update_numpy_picks_and_drops_the_attacker():
    updates = make_updates(5, byzantine=1)
    scores = numpy_krum_scores(updates, f=1)
    pick = updates[int(np.argmin(scores))]
    result = run(Krum(f=1), updates)
    assert pick.client_id < 5  # an honest one
    for name in SHAPES:  # exactly the chosen update (float64 round trip of one value)
        torch.testing.assert_close(result[name], pick.state[name], rtol=0, atol=0)


@pytest.mark.parametrize("m", [None, 1, 3])
def test_multikrum_weighted_mean_of_the_m_best(m):
    updates = make_updates(4, byzantine=2)  # n = 6, f = 1 (more attackers than f: m best)
    scores = numpy_krum_scores(updates, f=1)
    keep = np.argsort(scores, kind="stable")[: (len(updates) - 1) if m is None else m]
    chosen = [updates[i] for i in keep]
    weights = np.array([u.num_samples for u in chosen], dtype=np.float64)
    result = run(MultiKrum(f=1, m=m), updates)
    for name in SHAPES:
        expected = np.tensordot(weights / weights.sum(), stack(chosen, name), axes=1)
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=RTOL, atol=ATOL)
    if m == 3:
        assert all(u.client_id < 4 for u in chosen)  # the far two score worst


def test_results_do_not_depend_on_arrival_order():
    updates = make_updates(5)
    for strategy_cls in (Median, TrimmedMean, Krum, MultiKrum):
        first = run(strategy_cls(), updates)
        for order in itertools.islice(itertools.permutations(range(5)), 1, 4):
            again = run(strategy_cls(), updates, list(order))
            for name in SHAPES:
                torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)


def test_krum_needs_more_than_2f_plus_2():
    with pytest.raises(ValueError, match=r"min_clients=3 .* n > 2f \+ 2 = 4"):
        Krum(f=1, min_clients=3)
    assert Krum(f=1).min_clients == 5 and MultiKrum(f=2).min_clients == 7
    with pytest.raises(ValueError, match="trainer.strategy.f must be an integer >= 0"):
        Krum(f=-1)
    with pytest.raises(ValueError, match="trainer.strategy.m must be an integer >= 1"):
        MultiKrum(m=0)
    # a runtime that lowers min_clients (Flower's min-clients) still cannot score 4 updates
    strategy = Krum(f=1)
    strategy.min_clients = 1
    with pytest.raises(RuntimeError, match=r"needs more than 2f \+ 2 = 4 updates and got 4"):
        run(strategy, make_updates(4))


def test_too_few_updates_for_min_clients_raise_before_aggregating():
    strategy = Krum(f=1)
    strategy.begin(random_state(0))
    for update in make_updates(4):
        strategy.add(update)
    with pytest.raises(RuntimeError, match="fewer than trainer.strategy.min_clients=5"):
        strategy.result()


def test_stateless_for_resume():
    for strategy in (Median(), TrimmedMean(), Krum(), MultiKrum()):
        assert strategy.state_dict() == {}
        strategy.load_state_dict({})
        with pytest.raises(ValueError, match="keeps no server state"):
            strategy.load_state_dict({"m.x": torch.zeros(1)})


def test_bad_updates_are_refused_before_they_are_kept():
    strategy = Median()
    strategy.begin(random_state(0))
    bad = make_updates(1)[0]
    bad.state["scale"] = torch.tensor([float("nan"), 0.0, 0.0])
    assert not strategy.add(bad)
    assert strategy.rejected == {0: "tensor scale holds NaN or Inf"}
    for update in make_updates(3):
        strategy.add(update)
    assert strategy.accepted == [0, 1, 2]
    result = strategy.result()
    assert all(torch.isfinite(t).all() for t in result.values())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["MultiKrum", "TrimmedMean"])
def test_resumed_run_equals_uninterrupted(strategy, tmp_path):
    """2 rounds, then ``--trainer.resume true`` to 3, under an attack: the same attackers,
    records and final adapters as 3 rounds in one go (the strategies keep no server state;
    everything else the run needs is the resume state)."""
    from safetensors.torch import load_file

    from flora_lightning import cli

    def fit(run_dir, rounds, *more):
        return cli.run(
            [
                "fit",
                "--config",
                "configs/quickstart.yaml",
                "--trainer.rounds",
                str(rounds),
                "--trainer.max_local_steps",
                "2",
                "--data.max_test_samples",
                "64",
                "--trainer.progress",
                "false",
                "--trainer.strategy",
                strategy,
                "--trainer.attack",
                "{kind: scale, fraction: 0.2, scale: 5.0}",
                "--trainer.default_root_dir",
                str(run_dir),
                *more,
            ]  # fmt: skip
        )

    whole = fit(tmp_path / "whole", 3)
    fit(tmp_path / "split", 2)
    resumed = fit(tmp_path / "split", 3, "--trainer.resume", "true")
    keys = ("test_acc", "test_loss", "accepted_clients", "attackers")
    for a, b in zip(resumed["rounds"], whole["rounds"], strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    final = load_file(tmp_path / "split" / "final" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "whole" / "final" / "adapter_model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "strategy", "attack"),
    [
        ("quickstart_fedfft.yaml", "Krum", "{kind: gaussian, fraction: 0.2, scale: 0.01}"),
        ("quickstart_fedlc.yaml", "TrimmedMean", "{kind: label_flip, fraction: 0.2}"),
        ("quickstart_fedaa.yaml", "Median", "{kind: sign_flip, fraction: 0.2}"),
    ],
)
def test_other_methods_aggregate_their_own_tensors(config, strategy, attack, tmp_path):
    """Any method's communicated state (FedFFT's whole model, FedLC's and FedAA's heads): one
    round changes the global state and every client is accepted."""
    from flora_lightning import cli

    summary = cli.run(
        [
            "fit",
            "--config",
            f"configs/{config}",
            "--trainer.rounds",
            "1",
            "--trainer.max_local_steps",
            "1",
            "--data.max_test_samples",
            "32",
            "--trainer.progress",
            "false",
            "--trainer.strategy",
            strategy,
            "--trainer.attack",
            attack,
            "--trainer.default_root_dir",
            str(tmp_path),
        ]  # fmt: skip
    )
    first = summary["rounds"][1]
    assert first["accepted_clients"] == [0, 1, 2, 3, 4] and first["rejected_clients"] == {}
    assert len(first["attackers"]) == 1
    assert first["test_loss"] != summary["rounds"][0]["test_loss"]  # the state moved


def test_max_num_samples_bounds_the_claims_of_every_robust_strategy():
    for strategy in (Median(max_num_samples=100), TrimmedMean(max_num_samples=100),
                     Krum(f=0, max_num_samples=100), MultiKrum(f=0, max_num_samples=100)):  # fmt: skip
        strategy.begin(random_state(0))
        assert not strategy.add(make_updates(3)[2])  # claims 250 samples
        assert "max_num_samples=100" in strategy.rejected[2]
