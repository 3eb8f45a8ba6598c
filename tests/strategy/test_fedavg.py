"""FedAvg: the sample-weighted mean of client states, with bad updates excluded."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from flora_lightning.strategy import ClientUpdate, FedAvg

SHAPES = {"layer.lora_A": (2, 8), "layer.lora_B": (8, 2), "scale": (3,)}
WEIGHTS = [10, 3, 250, 37]


def random_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


@pytest.fixture
def global_state():
    return random_state(0)


@pytest.fixture
def updates():
    return [
        ClientUpdate(client_id=k, state=random_state(k + 1), num_samples=n, train_loss=1.0)
        for k, n in enumerate(WEIGHTS)
    ]


def aggregate(global_state, updates, **kwargs) -> tuple[FedAvg, dict[str, torch.Tensor]]:
    strategy = FedAvg(**kwargs)
    strategy.begin(global_state)
    for update in updates:
        strategy.add(update)
    return strategy, strategy.result()


def numpy_weighted_mean(updates, name: str) -> np.ndarray:
    stacked = np.stack([u.state[name].numpy().astype(np.float64) for u in updates])
    weights = np.array([u.num_samples for u in updates], dtype=np.float64)
    return np.tensordot(weights / weights.sum(), stacked, axes=1)


def test_equals_numpy_sample_weighted_mean(global_state, updates):
    strategy, result = aggregate(global_state, updates)
    assert set(result) == set(SHAPES)
    for name, shape in SHAPES.items():
        assert result[name].shape == shape
        assert result[name].dtype == torch.float32
        np.testing.assert_allclose(
            result[name].numpy(), numpy_weighted_mean(updates, name), rtol=1e-6, atol=1e-7
        )
    assert strategy.accepted == [0, 1, 2, 3]
    assert strategy.rejected == {}


def test_unequal_weights_matter(global_state, updates):
    # The client with 250 samples dominates: not the plain mean of the four clients.
    _, result = aggregate(global_state, updates)
    plain = torch.stack([u.state["layer.lora_A"] for u in updates]).mean(0)
    assert not torch.allclose(result["layer.lora_A"], plain, atol=1e-3)


def test_single_client_returns_its_state(global_state, updates):
    _, result = aggregate(global_state, updates[2:3])
    for name in SHAPES:
        torch.testing.assert_close(result[name], updates[2].state[name], rtol=0, atol=0)


@pytest.mark.parametrize("order", list(itertools.permutations(range(4)))[::5])
def test_order_invariant(global_state, updates, order):
    _, reference = aggregate(global_state, updates)
    _, permuted = aggregate(global_state, [updates[i] for i in order])
    for name in SHAPES:
        assert torch.equal(reference[name], permuted[name])


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_client_excluded_with_reason(global_state, updates, bad_value):
    poisoned = ClientUpdate(
        client_id=7, state=random_state(99), num_samples=1000, train_loss=float("nan")
    )
    poisoned.state["layer.lora_B"][3, 1] = bad_value
    strategy, result = aggregate(global_state, updates[:2] + [poisoned] + updates[2:])
    _, clean = aggregate(global_state, updates)
    assert strategy.accepted == [0, 1, 2, 3]
    assert list(strategy.rejected) == [7]
    assert "layer.lora_B" in strategy.rejected[7]
    assert "NaN or Inf" in strategy.rejected[7]
    for name in SHAPES:
        assert torch.isfinite(result[name]).all()
        assert torch.equal(result[name], clean[name])


def test_fewer_than_min_clients_raises_and_global_unchanged(global_state, updates):
    before = {k: v.clone() for k, v in global_state.items()}
    poisoned = ClientUpdate(5, random_state(5), num_samples=10, train_loss=0.0)
    poisoned.state["scale"][0] = float("nan")
    strategy = FedAvg(min_clients=3)
    strategy.begin(global_state)
    for update in (updates[0], poisoned, updates[1]):
        strategy.add(update)
    with pytest.raises(RuntimeError, match=r"only 2 client update\(s\) accepted") as err:
        strategy.result()
    assert "trainer.strategy.min_clients=3" in str(err.value)
    assert "5" in str(err.value) and "NaN or Inf" in str(err.value)
    for name in SHAPES:
        assert torch.equal(global_state[name], before[name])


def test_no_client_at_all_raises(global_state):
    strategy = FedAvg()
    strategy.begin(global_state)
    with pytest.raises(RuntimeError, match="only 0 client"):
        strategy.result()


def test_min_clients_must_be_positive():
    with pytest.raises(ValueError, match="trainer.strategy.min_clients must be >= 1"):
        FedAvg(min_clients=0)


def test_begin_resets_the_round(global_state, updates):
    strategy = FedAvg()
    strategy.begin(global_state)
    strategy.add(updates[0])
    strategy.begin(global_state)
    strategy.add(updates[1])
    assert strategy.accepted == [1]
    for name in SHAPES:
        torch.testing.assert_close(strategy.result()[name], updates[1].state[name])


def mismatched(kind: str) -> ClientUpdate:
    state = random_state(3)
    if kind == "shape":
        state["layer.lora_A"] = torch.zeros(4, 8)  # rank 4 instead of 2
    elif kind == "missing":
        del state["scale"]
    elif kind == "extra":
        state["other.weight"] = torch.zeros(1)
    elif kind == "renamed":
        state["scale_renamed"] = state.pop("scale")
    return ClientUpdate(client_id=9, state=state, num_samples=5, train_loss=0.0)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("shape", "tensor layer.lora_A has shape (4, 8)"),
        ("missing", "tensor names differ"),
        ("extra", "tensor names differ"),
        ("renamed", "tensor names differ"),
    ],
)
def test_shape_or_name_mismatch_rejected(global_state, updates, kind, reason):
    strategy, result = aggregate(global_state, [updates[0], mismatched(kind), updates[1]])
    _, clean = aggregate(global_state, updates[:2])
    assert strategy.accepted == [0, 1]
    assert reason in strategy.rejected[9]
    assert set(result) == set(SHAPES)
    for name in SHAPES:
        assert torch.equal(result[name], clean[name])


def test_zero_sample_client_rejected(global_state, updates):
    empty = ClientUpdate(client_id=4, state=random_state(4), num_samples=0, train_loss=0.0)
    strategy, _ = aggregate(global_state, [updates[0], empty])
    assert strategy.rejected == {4: "it reports 0 samples"}


def test_result_keeps_global_dtype():
    global_state = {"w": torch.zeros(4, dtype=torch.bfloat16)}
    updates = [
        ClientUpdate(0, {"w": torch.full((4,), 1.0, dtype=torch.bfloat16)}, 1, 0.0),
        ClientUpdate(1, {"w": torch.full((4,), 2.0, dtype=torch.bfloat16)}, 3, 0.0),
    ]
    _, result = aggregate(global_state, updates)
    assert result["w"].dtype == torch.bfloat16
    assert torch.equal(result["w"], torch.full((4,), 1.75, dtype=torch.bfloat16))
