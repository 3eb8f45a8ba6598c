"""Personalised evaluation: per-client local accuracy, fine-tuned accuracy, nothing leaks."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch

from flora_lightning.clip.feature_cache import FeatureCache
from flora_lightning.federation.client_evaluation import evaluate_clients
from flora_lightning.federation.local_trainer import LocalTrainer

CLIENTS = [0, 1, 2]


@pytest.fixture
def setup(make_flora, make_datamodule):
    """A CPU Fabric, FLoRA (lr 1e-2) holding a one-round trained state, a trainer, the data."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    data = make_datamodule(local_test_fraction=0.25)
    data.setup("fit")
    model = make_flora(lr=1e-2)
    model.configure_task(data.class_names, data.template)
    data.set_image_transform(model.image_transform)
    fabric.setup_module(model)
    trainer = LocalTrainer(fabric, max_local_steps=2, seed=42)
    update = trainer.fit(model, data, client=0, round_=1)  # leaves client 0's Adam state
    model.load_communicated_state(update.state)
    return fabric, model, trainer, data


def hand_accuracy(model, data, client: int) -> float:
    """Correct / total on the client's local test set, from the model's logits by hand."""
    rows = data.client_test_dataset(client)
    pixels, labels = data.collate([rows[i] for i in range(len(rows))])
    model.eval()
    with torch.no_grad():
        logits = model.evaluate_batch(pixels, model.class_embeddings())
    return (logits.argmax(dim=1) == labels).sum().item() / len(labels)


def test_local_accuracy_matches_a_hand_computation(setup):
    fabric, model, _, data = setup
    result = evaluate_clients(fabric, model, data, CLIENTS, num_classes=10)
    expected = {c: hand_accuracy(model, data, c) for c in CLIENTS}
    assert result["local_acc"] == pytest.approx(expected)
    values = np.array([expected[c] for c in CLIENTS])
    assert result["local_acc_mean"] == pytest.approx(values.mean())
    assert result["local_acc_min"] == pytest.approx(values.min())
    assert result["local_acc_max"] == pytest.approx(values.max())
    assert result["local_acc_std"] == pytest.approx(values.std())
    assert not any(key.startswith("personalized") for key in result)


def test_finetuning_restores_the_global_state_and_leaves_optimizer_states(setup):
    fabric, model, trainer, data = setup
    before = model.communicated_state()
    states = copy.deepcopy(trainer.optimizer_states)
    plain = evaluate_clients(fabric, model, data, CLIENTS, num_classes=10)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    result = evaluate_clients(
        fabric, model, data, CLIENTS, 10, trainer=trainer, finetune_steps=3, round_=2
    )
    after = model.communicated_state()
    assert set(after) == set(before)
    assert all(torch.equal(after[name], before[name]) for name in before)  # bit-identical
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert set(trainer.optimizer_states) == set(states) == {0}
    for slot, saved in states[0].items():
        for key, value in saved.items():
            kept = trainer.optimizer_states[0][slot][key]
            assert torch.equal(kept, value) if torch.is_tensor(value) else kept == value
    # The global model's local accuracy is the same with or without fine-tuning after it.
    assert result["local_acc"] == plain["local_acc"]


def test_personalised_accuracy_is_k_seeded_steps_then_evaluation(setup):
    fabric, model, trainer, data = setup
    global_state = model.communicated_state()
    result = evaluate_clients(
        fabric, model, data, CLIENTS, 10, trainer=trainer, finetune_steps=3, round_=2
    )
    # Independently: each client fits 3 steps from the global state, seeded by (42, 2, client).
    expected = {}
    for client in CLIENTS:
        fresh = LocalTrainer(fabric, max_local_steps=3, keep_optimizer_state=False, seed=42)
        fresh.fit(model, data, client, round_=2)
        expected[client] = hand_accuracy(model, data, client)
        model.load_communicated_state(global_state)
    assert result["personalized_acc"] == pytest.approx(expected)
    values = np.array([expected[c] for c in CLIENTS])
    assert result["personalized_acc_mean"] == pytest.approx(values.mean())
    assert result["personalized_acc_std"] == pytest.approx(values.std())
    # Fine-tuning does change what the clients see, and the same seed repeats it exactly.
    assert result["personalized_acc"] != result["local_acc"]
    again = evaluate_clients(
        fabric, model, data, CLIENTS, 10, trainer=trainer, finetune_steps=3, round_=2
    )
    assert again["personalized_acc"] == result["personalized_acc"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clients": []}, "at least one client"),
        ({"finetune_steps": -1}, "PersonalizedEvaluation.finetune_steps must be >= 0"),
        ({"finetune_steps": 2}, "needs the run's LocalTrainer"),
    ],
)
def test_bad_arguments_are_rejected(setup, kwargs, message):
    fabric, model, _, data = setup
    kwargs = {"clients": CLIENTS, **kwargs}
    with pytest.raises(ValueError, match=message):
        evaluate_clients(fabric, model, data, num_classes=10, **kwargs)


def test_cached_features_give_the_same_accuracies(setup):
    fabric, model, trainer, data = setup
    cache = FeatureCache(fabric, model, data)
    cache.build(CLIENTS, test=False)
    kwargs = dict(trainer=trainer, finetune_steps=2, round_=3)
    cached = evaluate_clients(fabric, model, cache, CLIENTS, 10, **kwargs)
    uncached = evaluate_clients(fabric, model, data, CLIENTS, 10, **kwargs)
    for key in ("local_acc", "personalized_acc"):
        assert cached[key] == pytest.approx(uncached[key])


def test_personalized_evaluation_in_a_run_leaves_training_unchanged(
    make_flora, make_datamodule, make_loop
):
    from flora_lightning.callbacks import PersonalizedEvaluation

    plain = make_loop(rounds=2, run="plain").fit(
        make_flora(), make_datamodule(local_test_fraction=0.2)
    )
    loop = make_loop(
        rounds=2, run="pers", callbacks=[PersonalizedEvaluation(every=2, finetune_steps=2)]
    )
    summary = loop.fit(make_flora(), make_datamodule(local_test_fraction=0.2))

    assert [r["test_acc"] for r in summary["rounds"]] == [r["test_acc"] for r in plain["rounds"]]
    evaluated = [r["round"] for r in summary["rounds"] if "local_acc_mean" in r]
    assert evaluated == [0, 2]
    last = summary["rounds"][2]
    accs = list(last["client_local_acc"].values())
    assert sorted(last["client_local_acc"]) == ["0", "1", "2"]
    assert last["local_acc_mean"] == pytest.approx(sum(accs) / 3)
    assert last["local_acc_min"] == min(accs) and last["local_acc_max"] == max(accs)
    assert "personalized_acc_std" in last
    assert summary["personalized_acc_mean"] == last["personalized_acc_mean"]


def test_personalized_evaluation_needs_a_local_test_set(make_flora, make_datamodule, make_loop):
    from flora_lightning.callbacks import PersonalizedEvaluation

    loop = make_loop(rounds=1, callbacks=[PersonalizedEvaluation()])
    with pytest.raises(ValueError, match="data.local_test_fraction"):
        loop.fit(make_flora(), make_datamodule())


def test_finetuning_under_sample_level_dp_is_refused(make_flora, make_datamodule, make_loop):
    """Fine-tuning outside DP-SGD and its accountant would release a non-private result."""
    from flora_lightning.callbacks import PersonalizedEvaluation
    from flora_lightning.privacy import PrivacyConfig

    loop = make_loop(rounds=1, callbacks=[PersonalizedEvaluation(finetune_steps=2)])
    loop.use_privacy(PrivacyConfig(level="sample", noise_multiplier=1.0))
    data = make_datamodule(local_test_fraction=0.25)
    with pytest.raises(ValueError, match="PersonalizedEvaluation.finetune_steps=2.*privacy.level"):
        loop.fit(make_flora(), data)
    assert loop.history == []  # refused before round 0 was evaluated
    assert not loop.run_dir.exists()  # and before anything was written


def test_evaluate_clients_refuses_to_finetune_with_a_dp_trainer(setup):
    from flora_lightning.privacy import DPSGDStep

    fabric, model, _, data = setup
    private = LocalTrainer(fabric, seed=42, step_fn=DPSGDStep(1.0, 1.0))
    with pytest.raises(ValueError, match="PersonalizedEvaluation.finetune_steps.*privacy.level"):
        evaluate_clients(fabric, model, data, CLIENTS, 10, trainer=private, finetune_steps=1)
    # The global model on the local test sets needs no fine-tuning: still allowed.
    result = evaluate_clients(fabric, model, data, CLIENTS, 10, trainer=private)
    assert result["local_acc"] == pytest.approx({c: hand_accuracy(model, data, c) for c in CLIENTS})
