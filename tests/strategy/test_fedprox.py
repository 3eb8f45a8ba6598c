"""FedProx: FedAvg on the server, the proximal term mu/2 ||w - w_global||^2 in the client fit."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from flora_lightning.federation.local_trainer import LocalTrainer, ProximalTerm, local_step
from flora_lightning.strategy import ClientUpdate, FedAvg, FedProx, Strategy


class Linear(torch.nn.Module):
    """A one-layer regression with a frozen bias: the smallest module ``local_step`` trains."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.layer.bias.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.layer(x).squeeze(-1) - y) ** 2).mean()


def sgd_step(module, batch, proximal, lr=0.1):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)
    return local_step(fabric, module, optimizer, batch, 0, proximal)


def test_proximal_term_adds_mu_times_the_drift_to_the_gradient():
    torch.manual_seed(0)
    batch = (torch.randn(4, 3), torch.randn(4))
    module, mu, lr = Linear(), 0.5, 0.1
    proximal = ProximalTerm(module, mu)  # w_global: the weights now
    w_global = module.layer.weight.detach().clone()
    drift = torch.tensor([[0.3, -0.2, 0.1]])
    with torch.no_grad():
        module.layer.weight.add_(drift)
    # The penalty's value: mu/2 * ||drift||^2 (the frozen bias is not in it).
    assert proximal().item() == pytest.approx(mu / 2 * 0.14, rel=1e-6)
    plain = Linear()
    plain.load_state_dict(module.state_dict())

    loss = sgd_step(module, batch, proximal, lr)
    plain_loss = sgd_step(plain, batch, None, lr)
    # The returned loss is the data loss alone; the weights differ by -lr * mu * drift exactly.
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-7)
    torch.testing.assert_close(
        module.layer.weight - plain.layer.weight, -lr * mu * drift, rtol=1e-5, atol=1e-7
    )
    assert torch.equal(module.layer.bias, plain.layer.bias)
    # The anchor is a detached snapshot, untouched by the step.
    torch.testing.assert_close(proximal.anchors[0][1], w_global, rtol=0, atol=0)


def test_strategy_carries_mu_and_aggregates_as_fedavg():
    assert FedAvg().proximal_mu == 0.0
    assert FedProx(mu=0.1).proximal_mu == 0.1
    assert isinstance(FedProx(), Strategy)
    gen = torch.Generator().manual_seed(0)
    glob = {"w": torch.zeros(5)}
    updates = [
        ClientUpdate(k, {"w": torch.randn(5, generator=gen)}, 2 + 7 * k, 0.0) for k in (0, 1)
    ]
    results = []
    for strategy in (FedProx(mu=1.0), FedAvg()):
        strategy.begin(glob)
        for update in updates:
            strategy.add(update)
        results.append(strategy.result()["w"])
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize(
    ("mu", "message"),
    [
        (-0.01, r"trainer.strategy.mu must be >= 0"),
        (float("nan"), r"trainer.strategy.mu must be a finite number \(got nan\)"),
        (float("inf"), r"trainer.strategy.mu must be a finite number \(got inf\)"),
    ],
)
def test_negative_mu_is_rejected_naming_the_field(mu, message):
    with pytest.raises(ValueError, match=message):
        FedProx(mu=mu)


def setup(make_flora, datamodule, **kwargs):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    datamodule.setup("fit")
    model = make_flora()
    model.configure_task(datamodule.class_names, datamodule.template)
    datamodule.set_image_transform(model.image_transform)
    fabric.setup_module(model)
    return LocalTrainer(fabric, seed=42, max_local_steps=3, **kwargs), model


def drift(update, start) -> float:
    return sum((update.state[k] - start[k]).pow(2).sum().item() for k in start) ** 0.5


def test_fit_with_mu_zero_is_plain_fit_and_mu_pulls_towards_the_global(make_flora, datamodule):
    fits = {}
    for label, kwargs in [
        ("plain", {}),
        ("zero", {"proximal_mu": 0.0}),
        ("prox", {"proximal_mu": 1e4}),
    ]:
        trainer, model = setup(make_flora, datamodule)
        start = {k: v.clone() for k, v in model.communicated_state().items()}
        fits[label] = trainer.fit(model, datamodule, client=1, round_=1, **kwargs)
    for name, tensor in fits["plain"].state.items():
        assert torch.equal(tensor, fits["zero"].state[name])
    assert fits["zero"].train_loss == fits["plain"].train_loss
    # A strong pull keeps the client closer to the global state than the plain fit.
    assert drift(fits["prox"], start) < 0.6 * drift(fits["plain"], start)  # 0.41 measured
    with pytest.raises(ValueError, match="trainer.strategy.mu must be >= 0"):
        trainer.fit(model, datamodule, client=1, round_=1, proximal_mu=-1.0)
