"""Accountant: epsilon equals Opacus' own computation, survives a resume, per-client bookkeeping."""

from __future__ import annotations

import json
import math

import pytest
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from flora_lightning.privacy import Accountant, ClientAccountants, local_steps, noise_for_target

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' RDP orders


def library_rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """Opacus' analysis functions called directly, not through an accountant object."""
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    eps, _ = rdp_analysis.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "delta"),
    [(0.01, 1.1, 1000, 1e-5), (0.25, 0.8, 40, 1e-5), (1.0, 2.0, 10, 1e-3), (0.5, 5.0, 1, 1e-6)],
)
def test_rdp_epsilon_equals_the_library(q, sigma, steps, delta):
    accountant = Accountant(q, sigma, delta, "rdp")
    accountant.step(steps // 2)
    accountant.step(steps - steps // 2)  # steps arrive in several calls (rounds)
    assert accountant.steps == steps
    assert accountant.epsilon() == pytest.approx(
        library_rdp_epsilon(q, sigma, steps, delta), abs=1e-6
    )


def test_prv_epsilon_equals_the_library():
    accountant = Accountant(0.05, 1.0, 1e-5, "prv")
    accountant.step(200)
    library = PRVAccountant()
    library.history = [(1.0, 0.05, 200)]
    assert accountant.epsilon() == pytest.approx(library.get_epsilon(delta=1e-5), abs=1e-6)
    # PRV is tighter than RDP for the same mechanism.
    assert accountant.epsilon() < library_rdp_epsilon(0.05, 1.0, 200, 1e-5)


def test_epsilon_before_any_step_and_without_noise():
    assert Accountant(0.1, 1.0, 1e-5).epsilon() == 0.0
    no_noise = Accountant(0.1, 0.0, 1e-5)
    no_noise.step()
    assert no_noise.epsilon() == math.inf
    more = Accountant(0.1, 1.0, 1e-5)
    more.step(10)
    eps10 = more.epsilon()
    more.step(10)
    assert more.epsilon() > eps10 > 0


def test_resume_gives_the_uninterrupted_epsilon_through_json():
    uninterrupted = Accountant(0.1, 1.3, 1e-5)
    uninterrupted.step(30)
    first = Accountant(0.1, 1.3, 1e-5)
    first.step(12)
    saved = json.loads(json.dumps(first.state_dict()))  # tuples become lists on disk
    resumed = Accountant(0.1, 1.3, 1e-5)
    resumed.load_state_dict(saved)
    assert resumed.steps == 12
    resumed.step(18)
    assert resumed.steps == 30
    assert resumed.epsilon() == uninterrupted.epsilon()


def test_resume_with_other_settings_is_refused():
    saved = Accountant(0.1, 1.3, 1e-5).state_dict()
    with pytest.raises(ValueError, match="noise_multiplier=1.3.*same privacy settings"):
        Accountant(0.1, 1.0, 1e-5).load_state_dict(saved)


def test_bad_sample_rate_is_refused():
    with pytest.raises(ValueError, match="sample rate must be in"):
        Accountant(0.0, 1.0, 1e-5)
    with pytest.raises(ValueError, match="sample rate must be in"):
        Accountant(1.5, 1.0, 1e-5)


def test_client_accountants_step_only_the_clients_that_trained():
    clients = ClientAccountants({0: 32 / 100, 1: 32 / 400, 2: 32 / 10}, 1.0, 1e-5)
    assert clients.accountants[2].sample_rate == 1.0  # batch larger than the partition
    clients.step(0, local_steps(100, 32, 1, None))  # 4 steps
    clients.step(1, local_steps(400, 32, 1, 5))  # capped at 5
    eps = clients.epsilons()
    assert eps[2] == 0.0  # never sampled: nothing spent
    assert eps[0] == pytest.approx(library_rdp_epsilon(0.32, 1.0, 4, 1e-5), abs=1e-6)
    assert eps[1] == pytest.approx(library_rdp_epsilon(0.08, 1.0, 5, 1e-5), abs=1e-6)
    assert clients.epsilon() == max(eps.values())

    resumed = ClientAccountants({0: 32 / 100, 1: 32 / 400, 2: 32 / 10}, 1.0, 1e-5)
    resumed.load_state_dict(json.loads(json.dumps(clients.state_dict())))
    assert resumed.epsilons() == eps
    with pytest.raises(ValueError, match="data.num_clients"):
        ClientAccountants({0: 0.5}, 1.0, 1e-5).load_state_dict(clients.state_dict())


def test_local_steps_counts_partial_batches_and_the_cap():
    assert local_steps(100, 32, 1, None) == 4
    assert local_steps(96, 32, 2, None) == 6
    assert local_steps(100, 32, 3, 5) == 5


def test_noise_for_target_is_the_library_search_and_reaches_the_target():
    sigma = noise_for_target(4.0, 0.1, 50, 1e-5)
    assert sigma == get_noise_multiplier(
        target_epsilon=4.0, target_delta=1e-5, sample_rate=0.1, steps=50, accountant="rdp"
    )
    accountant = Accountant(0.1, sigma, 1e-5)
    accountant.step(50)
    assert 4.0 - 0.01 <= accountant.epsilon() <= 4.0
    # A smaller budget needs more noise.
    assert noise_for_target(1.0, 0.1, 50, 1e-5) > sigma


def test_unreachable_target_names_the_field():
    with pytest.raises(ValueError, match="privacy.target_epsilon=0.001 cannot be reached"):
        noise_for_target(1e-3, 1.0, 1000, 1e-5)


def test_resolve_noise_multiplier_uses_the_given_one_or_the_target():
    from flora_lightning.privacy import PrivacyConfig, resolve_noise_multiplier

    given = PrivacyConfig(level="client", noise_multiplier=0.7)
    assert resolve_noise_multiplier(given, 0.5, 10) == 0.7
    target = PrivacyConfig(level="client", target_epsilon=4.0, delta=1e-5)
    assert resolve_noise_multiplier(target, 0.1, 50) == noise_for_target(4.0, 0.1, 50, 1e-5)
