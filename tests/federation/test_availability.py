"""Availability: seeded per-(round, client) dropouts, stragglers and deadline drops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flora_lightning.federation.availability import Availability, Event

ROUNDS, CLIENTS = range(1, 101), range(200)  # 20,000 (round, client) draws


def tally(settings: Availability, seed: int = 42, steps: int = 10) -> dict[str, int]:
    counts = {"trained": 0, "straggler": 0, "dropped": 0}
    for r in ROUNDS:
        for c in CLIENTS:
            counts[settings.draw(seed, r, c, steps).kind] += 1
    return counts


def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_draws_are_a_pure_function_of_seed_round_and_client():
    settings = Availability(dropout=0.3, straggler=0.4, deadline=30.0)
    forward = [settings.draw(7, r, c, 12) for r in range(1, 4) for c in range(20)]
    again = Availability(dropout=0.3, straggler=0.4, deadline=30.0)
    backward = [again.draw(7, r, c, 12) for r in reversed(range(1, 4)) for c in reversed(range(20))]
    assert forward == backward[::-1]
    # Another seed or round changes the events (not every client the same fate).
    other_seed = [settings.draw(8, r, c, 12) for r in range(1, 4) for c in range(20)]
    assert [e.kind for e in forward] != [e.kind for e in other_seed]
    kinds_by_round = [[settings.draw(7, r, c, 12).kind for c in range(20)] for r in (1, 2)]
    assert kinds_by_round[0] != kinds_by_round[1]


def test_frequencies_match_the_probabilities():
    n = len(ROUNDS) * len(CLIENTS)
    counts = tally(Availability(dropout=0.3, straggler=0.2))
    assert within_binomial(counts["dropped"], n, 0.3)
    assert within_binomial(counts["straggler"], n, 0.7 * 0.2)
    assert within_binomial(counts["trained"], n, 0.7 * 0.8)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (Availability(), {"trained": 20_000, "straggler": 0, "dropped": 0}),
        (Availability(dropout=1.0), {"trained": 0, "straggler": 0, "dropped": 20_000}),
        (Availability(straggler=1.0), {"trained": 0, "straggler": 20_000, "dropped": 0}),
    ],
)
def test_probability_zero_and_one_are_exact(settings, expected):
    assert tally(settings) == expected


def test_dropout_draws_do_not_shift_with_the_straggler_probability():
    # The same uniform decides dropout whatever straggler is: raising straggler only turns
    # trained clients into stragglers.
    low, high = Availability(dropout=0.2, straggler=0.1), Availability(dropout=0.2, straggler=0.5)
    for c in range(300):
        a, b = low.draw(1, 3, c, 10), high.draw(1, 3, c, 10)
        assert a.dropped == b.dropped
        if a.kind == "straggler":
            assert b.kind == "straggler"


@pytest.mark.parametrize(
    ("fraction", "steps", "expected"),
    [
        (0.5, 10, 5),
        (0.3, 10, 3),
        (0.29, 100, 29),
        (0.5, 3, 1),
        (0.1, 3, 1),
        (1.0, 7, 7),
        (0.5, 0, 0),
    ],
)
def test_straggler_runs_the_floor_of_its_share_of_steps(fraction, steps, expected):
    settings = Availability(straggler=1.0, straggler_fraction=fraction, speed_spread=0.0)
    event = settings.draw(0, 1, 0, steps)
    assert event.kind == "straggler"
    assert event.steps == expected
    assert event.seconds == float(expected)  # one second per step without spread


def test_speed_is_fixed_per_client_and_log_normal():
    settings = Availability(speed_spread=0.5)
    speeds = np.array([settings.seconds_per_step(42, c) for c in range(4000)])
    logs = np.log(speeds)
    # mean 0 and std 0.5 of log-speed, with 5 standard errors' tolerance
    assert abs(logs.mean()) < 5 * 0.5 / math.sqrt(4000)
    assert abs(logs.std() - 0.5) < 5 * 0.5 / math.sqrt(2 * 4000)
    for c in (0, 17):
        per_round = {settings.draw(42, r, c, 10).seconds_per_step for r in range(1, 6)}
        assert per_round == {settings.seconds_per_step(42, c)}
    assert Availability(speed_spread=0.0).seconds_per_step(42, 3) == 1.0


def test_deadline_drops_exactly_the_clients_that_would_finish_late():
    settings = Availability(straggler=0.3, straggler_fraction=0.5, deadline=12.0)
    late = 0
    for c in range(2000):
        event = settings.draw(5, 2, c, 10)
        unlimited = Availability(straggler=0.3, straggler_fraction=0.5).draw(5, 2, c, 10)
        assert event.seconds == pytest.approx(unlimited.steps * unlimited.seconds_per_step)
        if unlimited.seconds > 12.0:
            late += 1
            assert (event.kind, event.reason, event.steps) == ("dropped", "deadline", 0)
        else:
            assert event == unlimited
    # Full fits (10 s at median speed) are late when log-speed > log(1.2) / 0.5; stragglers'
    # 5 steps when > log(2.4) / 0.5.
    tail = 0.5 * math.erfc(math.log(1.2) / 0.5 / math.sqrt(2))
    straggler_tail = 0.5 * math.erfc(math.log(2.4) / 0.5 / math.sqrt(2))
    p_late = 0.7 * tail + 0.3 * straggler_tail
    assert within_binomial(late, 2000, p_late)


def test_dropout_comes_before_the_deadline():
    event = Availability(dropout=1.0, deadline=1.0).draw(0, 1, 0, 100)
    assert event == Event(1, 0, "dropped", "dropout", 0, 0.0, event.seconds_per_step)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dropout": -0.1}, "trainer.availability.dropout must be a probability in [0, 1]"),
        ({"dropout": 1.5}, "trainer.availability.dropout must be a probability in [0, 1]"),
        ({"straggler": 2.0}, "trainer.availability.straggler must be a probability in [0, 1]"),
        ({"straggler": float("nan")}, "trainer.availability.straggler must be a finite number"),
        ({"straggler_fraction": 0.0}, "trainer.availability.straggler_fraction must be in (0, 1]"),
        ({"straggler_fraction": 1.2}, "trainer.availability.straggler_fraction must be in (0, 1]"),
        ({"deadline": 0.0}, "trainer.availability.deadline must be > 0"),
        ({"deadline": -5.0}, "trainer.availability.deadline must be > 0"),
        ({"speed_spread": -1.0}, "trainer.availability.speed_spread must be >= 0"),
    ],
)
def test_bad_settings_are_rejected_naming_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        Availability(**kwargs)
    assert message in str(err.value)
    assert f"(got {next(iter(kwargs.values()))})" in str(err.value)


def test_negative_draw_arguments_are_refused():
    with pytest.raises(ValueError, match="must be >= 0"):
        Availability().draw(0, 1, -1, 10)
