"""FederatedEvaluation: the round's sampled clients' local test sets, weighted by test rows."""

from __future__ import annotations

import math

import pytest

from flora_lightning.callbacks import FederatedEvaluation, PersonalizedEvaluation
from flora_lightning.callbacks.federated import aggregate


def test_aggregate_weighs_by_test_rows():
    results = {0: (0.5, 2.0, 10), 3: (1.0, 1.0, 30)}
    fields = aggregate(results)
    assert fields["federated_test_acc"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert fields["federated_test_loss"] == pytest.approx((2.0 * 10 + 1.0 * 30) / 40)
    assert fields["federated_test_samples"] == 40
    assert fields["federated_test_clients"] == [0, 3]
    empty = aggregate({})
    assert math.isnan(empty["federated_test_acc"]) and empty["federated_test_samples"] == 0


def test_a_run_records_the_row_weighted_mean_of_the_clients_local_accuracy(
    make_flora, make_datamodule, make_loop
):
    """With every client sampled, federated_test_acc = sum_c n_c acc_c / sum_c n_c, where
    PersonalizedEvaluation (another code path: evaluate_clients) gives each acc_c and the
    datamodule each n_c."""
    data = make_datamodule(local_test_fraction=0.2)
    loop = make_loop(rounds=2, callbacks=[FederatedEvaluation(), PersonalizedEvaluation()])
    summary = loop.fit(make_flora(), data)
    assert "federated_test_acc" not in summary["rounds"][0]  # nobody sampled in round 0
    for record in summary["rounds"][1:]:
        rows = {c: len(data.client_test_indices[c]) for c in range(data.num_clients)}
        local = {int(c): acc for c, acc in record["client_local_acc"].items()}
        expected = sum(rows[c] * local[c] for c in rows) / sum(rows.values())
        assert record["federated_test_acc"] == pytest.approx(expected, abs=1e-9)
        assert record["federated_test_samples"] == sum(rows.values())
        assert record["federated_test_clients"] == sorted(rows)
        assert math.isfinite(record["federated_test_loss"])
    assert summary["federated_test_acc"] == summary["rounds"][-1]["federated_test_acc"]


def test_it_needs_local_test_sets_and_a_valid_every(make_flora, make_datamodule, make_loop):
    with pytest.raises(ValueError, match="FederatedEvaluation.every"):
        FederatedEvaluation(every=0)
    loop = make_loop(rounds=1, callbacks=[FederatedEvaluation()])
    with pytest.raises(ValueError, match="data.local_test_fraction"):
        loop.fit(make_flora(), make_datamodule())
