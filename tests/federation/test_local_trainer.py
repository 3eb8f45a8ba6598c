"""LocalTrainer: the one local step, seeded client fits, per-client optimizer state."""

from __future__ import annotations

import lightning as L
import torch

from flora_lightning.federation.local_trainer import LocalTrainer, local_step


def setup(make_flora, datamodule, **kwargs):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    datamodule.setup("fit")
    model = make_flora()
    model.configure_task(datamodule.class_names, datamodule.template)
    datamodule.set_image_transform(model.image_transform)
    fabric.setup_module(model)
    return LocalTrainer(fabric, seed=42, **kwargs), model


def test_fit_is_seeded_by_round_and_client_and_keeps_optimizer_state(make_flora, datamodule):
    trainer, model = setup(make_flora, datamodule, max_local_steps=2)
    start = {k: v.clone() for k, v in model.communicated_state().items()}
    first = trainer.fit(model, datamodule, client=1, round_=1)
    assert first.client_id == 1
    assert first.num_samples == datamodule.num_samples(1)
    assert first.train_loss > 0
    assert set(trainer.optimizer_states) == {1}
    # Adam's step count: two capped steps, stored on CPU
    steps = [slots["step"] for slots in trainer.optimizer_states[1].values()]
    assert all(float(s) == 2.0 for s in steps)
    assert all(
        v.device.type == "cpu" for s in trainer.optimizer_states[1].values() for v in s.values()
    )

    # The same (round, client) from the same state and optimizer state: the same update.
    again_trainer, again_model = setup(make_flora, datamodule, max_local_steps=2)
    again_model.load_communicated_state(start)
    again = again_trainer.fit(again_model, datamodule, client=1, round_=1)
    for name, tensor in first.state.items():
        assert torch.equal(tensor, again.state[name])
    assert again.train_loss == first.train_loss

    # Round 2 resumes client 1's Adam state: its step count goes on from 2.
    trainer.fit(model, datamodule, client=1, round_=2)
    assert all(float(s["step"]) == 4.0 for s in trainer.optimizer_states[1].values())


def test_fit_without_kept_state_stores_nothing(make_flora, datamodule):
    trainer, model = setup(make_flora, datamodule, max_local_steps=1, keep_optimizer_state=False)
    trainer.fit(model, datamodule, client=0, round_=1)
    assert trainer.optimizer_states == {}


def test_seed_for_differs_per_round_client_and_stream():
    trainer = LocalTrainer(fabric=None, seed=42)
    seeds = {trainer.seed_for(r, c, s) for r in (1, 2) for c in (0, 1) for s in (0, 1)}
    assert len(seeds) == 8
    assert trainer.seed_for(1, 0) == LocalTrainer(fabric=None, seed=42).seed_for(1, 0)


def test_local_step_changes_only_trainable_parameters(make_flora, datamodule):
    trainer, model = setup(make_flora, datamodule)
    fabric = trainer.fabric
    optimizer = fabric.setup_optimizers(model.configure_optimizers())
    before = {k: v.clone() for k, v in model.communicated_state().items()}
    batch = datamodule.collate([datamodule.client_dataset(0)[i] for i in range(4)])
    model.train()
    loss = local_step(fabric, model, optimizer, batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    after = model.communicated_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)


def test_train_loss_is_the_sample_weighted_mean_of_the_batch_losses():
    """A last batch of 5 rows weighs 5/37 of the fit's loss, not half (batch losses 1 and 3
    over 32 and 5 rows: (32 + 15) / 37); a NaN batch loss makes the fit's loss NaN."""
    import math

    from flora_lightning.federation.local_trainer import MeanLoss

    meter = MeanLoss("cpu")
    meter.update(torch.tensor(1.0), 32)
    meter.update(torch.tensor(3.0), 5)
    assert meter.compute() == (32 * 1.0 + 5 * 3.0) / 37
    meter.update(torch.tensor(float("nan")), 1)
    assert math.isnan(meter.compute())
    assert math.isnan(MeanLoss("cpu").compute())  # no row seen
