"""DPFedAvg: clipped client updates, their unweighted mean, seeded Gaussian noise, adaptive C."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flora_lightning.privacy import DPFedAvg
from flora_lightning.privacy.client_dp import adaptive_noise_params, noise_stddev, update_norm
from flora_lightning.strategy import ClientUpdate


def global_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "layer.lora_A.weight": torch.randn(2, 8, generator=gen),
        "layer.lora_B.weight": torch.randn(8, 2, generator=gen),
    }


def client_states(base, scales, seed=1):
    """Client states ``base + scale * direction``: update norms are exactly ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    states = []
    for scale in scales:
        direction = {k: torch.randn(v.shape, generator=gen) for k, v in base.items()}
        norm = update_norm(direction)
        states.append({k: base[k] + scale * direction[k] / norm for k in base})
    return states


def run_round(strategy, base, states, num_samples=None):
    strategy.begin(base)
    for client, state in enumerate(states):
        samples = num_samples[client] if num_samples else 10
        strategy.add(ClientUpdate(client, state, num_samples=samples, train_loss=0.0))
    return strategy.result()


def test_each_clipped_update_stays_within_the_bound():
    base = global_state()
    scales = [0.1, 0.9, 1.0, 1.5, 7.0, 40.0]
    for state, scale in zip(client_states(base, scales), scales, strict=True):
        # One client, no noise: the new global state minus the old one is its clipped update.
        strategy = DPFedAvg(noise_multiplier=0.0, clip_norm=1.0, num_sampled_clients=1)
        new = run_round(strategy, base, [state])
        clipped = {k: new[k].double() - base[k].double() for k in base}
        norm = update_norm(clipped)
        assert strategy.norms[0] == pytest.approx(scale, rel=1e-5)
        assert norm <= 1.0 + 1e-6
        assert norm == pytest.approx(min(scale, 1.0), rel=1e-5)
        # Clipping scales, it never turns the update.
        raw = {k: state[k].double() - base[k].double() for k in base}
        cosine = sum(float((raw[k] * clipped[k]).sum()) for k in base) / (scale * norm)
        assert cosine == pytest.approx(1.0, abs=1e-6)


def test_mean_is_unweighted_over_the_sampled_clients_and_matches_flower():
    dp = pytest.importorskip("flwr.supercore.differential_privacy")
    base = global_state()
    states = client_states(base, [0.5, 3.0, 10.0])
    strategy = DPFedAvg(noise_multiplier=0.0, clip_norm=2.0, num_sampled_clients=3)
    new = run_round(strategy, base, states, num_samples=[1, 50, 1000])
    # Flower's server-side clipping on the same arrays, then the unweighted mean.
    current = [v.double().numpy() for v in base.values()]
    flower = []
    for state in states:
        arrays = [v.double().numpy() for v in state.values()]
        dp.compute_clip_model_update(arrays, current, clipping_norm=2.0)
        flower.append(arrays)
    expected = [np.mean([c[i] for c in flower], axis=0) for i in range(len(current))]
    for tensor, reference in zip(new.values(), expected, strict=True):
        np.testing.assert_allclose(tensor.numpy(), reference, rtol=1e-5, atol=1e-6)
    assert noise_stddev(1.3, 2.0, 7) == dp.compute_stdv(1.3, 2.0, 7)
    assert adaptive_noise_params(1.0, 40, None) == pytest.approx(
        dp.compute_adaptive_noise_params(1.0, 40, None)
    )
    assert adaptive_noise_params(0.5, 10, 3.0) == pytest.approx(
        dp.compute_adaptive_noise_params(0.5, 10, 3.0)
    )


def test_rejected_update_keeps_the_fixed_denominator():
    base = global_state()
    good = client_states(base, [0.5, 0.5])
    bad = {k: torch.full_like(v, math.nan) for k, v in base.items()}
    strategy = DPFedAvg(noise_multiplier=0.0, clip_norm=1.0, num_sampled_clients=3)
    new = run_round(strategy, base, [good[0], bad, good[1]])
    assert strategy.rejected and strategy.accepted == [0, 2]
    for k in base:
        expected = base[k] + ((good[0][k] - base[k]) + (good[1][k] - base[k])) / 3
        torch.testing.assert_close(new[k], expected)


def test_noise_std_is_sigma_clip_over_clients():
    base = {"w": torch.zeros(200_000)}
    strategy = DPFedAvg(noise_multiplier=1.5, clip_norm=0.8, num_sampled_clients=4, seed=3)
    # Clients that did not move: the new state is pure noise.
    noise = run_round(strategy, base, [dict(base)] * 4)["w"]
    expected = 1.5 * 0.8 / 4
    assert strategy.round_noise_std == expected
    assert noise.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean().item()) < 4 * expected / math.sqrt(noise.numel())
    # The next round draws fresh noise.
    again = run_round(strategy, base, [dict(base)] * 4)["w"]
    assert not torch.equal(noise, again)


def rounds(strategy, base, n, start=1):
    outs = []
    state = base
    for r in range(start, start + n):
        scales = [0.3 * r, 2.0, 5.0]
        state = run_round(strategy, state, client_states(state, scales, seed=r))
        outs.append(state)
    return outs


def make(seed=7, adaptive=True):
    return DPFedAvg(
        noise_multiplier=0.5,
        clip_norm=1.0,
        num_sampled_clients=3,
        seed=seed,
        adaptive=adaptive,
        clipped_count_stddev=1.0,
    )


def test_reproducible_by_seed_and_resumable_from_state():
    base = global_state()
    first, second = rounds(make(), base, 3), rounds(make(), base, 3)
    for a, b in zip(first, second, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])
    other = rounds(make(seed=8), base, 1)[0]
    assert not torch.equal(other["layer.lora_B.weight"], first[0]["layer.lora_B.weight"])

    # Stop after round 1, restore the state into a fresh strategy, run rounds 2 and 3.
    interrupted = make()
    after_one = rounds(interrupted, base, 1)[0]
    saved = interrupted.state_dict()
    assert saved["rounds_done"] == 1 and saved["clip_norm"] != 1.0  # adapted
    resumed = make()
    resumed.load_state_dict(saved)
    rest = rounds(resumed, after_one, 2, start=2)
    for a, b in zip(first[1:], rest, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])
    uninterrupted = make_and_run_three(base)
    assert {k: v.item() for k, v in resumed.state_dict().items()} == {
        k: v.item() for k, v in uninterrupted.items()
    }


def make_and_run_three(base):
    strategy = make()
    rounds(strategy, base, 3)
    return strategy.state_dict()


@pytest.mark.parametrize(("scales", "unclipped"), [([5.0, 6.0, 7.0, 8.0], 0), ([0.1] * 4, 4)])
def test_adaptive_clip_norm_moves_towards_the_quantile(scales, unclipped):
    # sigma = 0: the count is exact, so C' = C exp(-lr (unclipped / m - quantile)): all clipped
    # (norms above C = 1) grows C, none clipped shrinks it (Andrew et al., 2021, eq. for C).
    strategy = DPFedAvg(noise_multiplier=0.0, clip_norm=1.0, num_sampled_clients=4, adaptive=True)
    base = global_state()
    run_round(strategy, base, client_states(base, scales))
    assert strategy.round_clip_norm == 1.0
    assert strategy.clip_norm == pytest.approx(math.exp(-0.2 * (unclipped / 4 - 0.5)))
    assert (strategy.clip_norm > 1.0) == (unclipped == 0)


@pytest.mark.parametrize("start", [0.5, 50.0])
def test_adaptive_clip_norm_settles_at_the_median_from_either_side(start):
    # Four clients with update norms 2, 4, 6, 8 every round, sigma = 0, eta = 0.2, gamma = 0.5:
    # the share at or below C is 1/2 exactly for C in [4, 6), so C must end there (the issue's
    # measurement of the old sign: 0.00017 from 0.5, 149,047 from 50).
    strategy = DPFedAvg(0.0, start, num_sampled_clients=4, adaptive=True, clip_norm_lr=0.2)
    base = global_state()
    for round_ in range(80):
        base = run_round(strategy, base, client_states(base, [2.0, 4.0, 6.0, 8.0], seed=round_))
    assert 4.0 <= strategy.clip_norm < 6.0


class RecordingNormal:
    """An ``rng`` stand-in that returns the mean it is asked to noise (no noise drawn)."""

    def __init__(self) -> None:
        self.means: list[float] = []

    def normal(self, mean, std, shape=None):
        self.means.append(float(mean))
        return mean if shape is None else np.zeros(shape)


def test_adaptive_pair_spends_exactly_the_accountants_sigma():
    # m = 10, sigma_b = 0.5, sigma = 0.9 (the case). The count query's sensitivity is
    # measured by brute force: the noised quantity on every set of bits against the same set
    # with one client removed (add/remove adjacency). Then the two Gaussian queries compose to
    # one of multiplier (sigma_delta^-2 + (sigma_b / sensitivity)^-2)^-1/2, which must be the
    # sigma the accountant is given. (A raw count has sensitivity 1 and composes to 0.49.)
    m, sigma_b, sigma = 10, 0.5, 0.9
    strategy = DPFedAvg(sigma, 1.0, num_sampled_clients=m, adaptive=True,
                        clipped_count_stddev=sigma_b)  # fmt: skip
    sensitivity = 0.0
    for bits in np.ndindex(*(2,) * 6):  # 6 accepted updates, each clipped or not
        norms = [0.5 if b else 2.0 for b in bits]  # 0.5 <= C = 1: unclipped
        means = []
        for kept in (norms, norms[1:]):
            rng = RecordingNormal()
            strategy.norms = dict(enumerate(kept))
            strategy.round_clip_norm = strategy.clip_norm = 1.0
            strategy._release({}, rng)
            means.append(rng.means[0])
        sensitivity = max(sensitivity, abs(means[0] - means[1]))
    assert sensitivity == 0.5
    # The update's mean has sensitivity C / m and noise std sigma_delta C / m.
    sigma_delta = noise_stddev(strategy.update_noise_multiplier, 1.0, m) / (1.0 / m)
    composed = (sigma_delta**-2 + (sigma_b / sensitivity) ** -2) ** -0.5
    assert composed == pytest.approx(sigma, rel=1e-12)


def test_old_quantile_name_is_refused_with_the_reason():
    from flora_lightning.privacy import PrivacyConfig

    with pytest.raises(ValueError, match="privacy.target_clipped_quantile=0.2 is no longer"):
        PrivacyConfig(level="client", noise_multiplier=1.0, target_clipped_quantile=0.2)
    with pytest.raises(TypeError):  # the strategy's own argument is gone too
        DPFedAvg(1.0, 1.0, 4, target_clipped_quantile=0.5)


def test_adaptive_noise_split_needs_a_large_enough_count_stddev():
    with pytest.raises(ValueError, match="privacy.clipped_count_stddev=0.5"):
        DPFedAvg(1.0, 1.0, num_sampled_clients=10, adaptive=True)  # default 10 / 20
    strategy = DPFedAvg(1.0, 1.0, num_sampled_clients=10, adaptive=True, clipped_count_stddev=2)
    assert strategy.update_noise_multiplier == pytest.approx((1 - 1 / 16) ** -0.5)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="privacy.noise_multiplier"):
        DPFedAvg(-1.0, 1.0, 2)
    with pytest.raises(ValueError, match="privacy.clip_norm"):
        DPFedAvg(1.0, 0.0, 2)
    with pytest.raises(ValueError, match="trainer.join_ratio"):
        DPFedAvg(1.0, 1.0, 0)


def test_from_config_carries_the_privacy_settings():
    from flora_lightning.privacy import PrivacyConfig

    privacy = PrivacyConfig(
        level="client",
        noise_multiplier=1.0,
        clip_norm=0.3,
        adaptive_clipping=True,
        target_unclipped_quantile=0.7,
        clip_norm_lr=0.1,
        clipped_count_stddev=2.0,
    )
    strategy = DPFedAvg.from_config(privacy, 1.0, num_sampled_clients=5, seed=3, min_clients=2)
    assert (strategy.clip_norm, strategy.num_sampled_clients, strategy.seed) == (0.3, 5, 3)
    assert strategy.adaptive and strategy.min_clients == 2
    assert (strategy.target_unclipped_quantile, strategy.clip_norm_lr) == (0.7, 0.1)
    assert strategy.clipped_count_stddev == 2.0
