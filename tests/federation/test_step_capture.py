"""The compiled local step (``trainer.compile``) and the CUDA-graph plan (``trainer.cuda_graphs``)."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

from flora_lightning.federation import step_capture
from flora_lightning.federation.local_trainer import LocalTrainer
from flora_lightning.federation.setup import check_settings
from flora_lightning.federation.step_capture import CompiledStep, plan_capture


def test_plan_is_eager_on_cpu_unless_compiled_and_says_why(caplog):
    step_capture._logged.clear()
    with caplog.at_level(logging.INFO, logger=step_capture.__name__):
        assert plan_capture(torch.device("cpu"), "auto", False) is None
    assert "trainer.cuda_graphs=auto: off on cpu" in caplog.text
    compiled = plan_capture(torch.device("cpu"), "off", True)
    assert isinstance(compiled, CompiledStep) and not compiled.cuda_graphs
    assert compiled.mode is None
    graphs = plan_capture(torch.device("cuda"), "auto", False)  # planning needs no GPU
    assert graphs.cuda_graphs and graphs.mode == "reduce-overhead"
    assert plan_capture(torch.device("cuda"), "off", False) is None


@pytest.mark.parametrize(
    ("field", "value"), [("cuda_graphs", "on"), ("cuda_graphs", True), ("compile", "yes")]
)
def test_bad_capture_settings_name_the_field(field, value):
    settings = dict(
        rounds=1,
        local_epochs=1,
        max_local_steps=None,
        join_ratio=1.0,
        precision="32-true",
        resume_every_n_rounds=1,
        keep_last_checkpoints=None,
        on_client_error="skip",
    )
    with pytest.raises(ValueError, match=f"trainer.{field}"):
        check_settings(**settings, **{field: value})


def fits(make_flora, datamodule, capture, rounds=2, clients=(0, 1)):
    """Each client's (state, train loss) after each round's fit, float64, from one start."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    datamodule.setup("fit")
    model = make_flora(lr=1e-3).double()
    model.configure_task(datamodule.class_names, datamodule.template)
    datamodule.set_image_transform(model.image_transform)
    fabric.setup_module(model)
    trainer = LocalTrainer(fabric, max_local_steps=3, seed=42, capture=capture)
    start = model.communicated_state()
    out = []
    for round_ in range(1, rounds + 1):
        for client in clients:
            model.load_communicated_state(start)  # every fit from the same global state
            update = trainer.fit(model, datamodule, client, round_)
            out.append((update.state, update.train_loss))
    return out


def test_compiled_fits_equal_eager_fits_across_clients_and_rounds(make_flora, make_datamodule):
    """Two clients, two rounds, 3 steps each (batch 8 over partitions of >= 20: the partial
    batch is never reached, the full one is compiled once and reused by every fit): the
    compiled fits equal the eager fits, each client resuming its own Adam state in round 2.

    Tolerance (float64, u = 2**-53): the compiled kernels sum in another order, so a gradient
    entry differs by at most n*u relative, n <= 1e4 terms per reduction (rho ~ 1.1e-12).
    Adam's update m_hat/(sqrt(v_hat)+eps) is scale-invariant, so a relative gradient error rho
    moves an update by at most ~2*rho*lr; 3 steps and two rounds from a shared start give at
    most 6 such updates per parameter, bounded by 6 * 2 * rho * lr = 1.3e-14 before the
    feedback of changed parameters into later gradients; x100 for that feedback: 1.3e-12.
    """
    data = make_datamodule(batch_size=8)
    eager = fits(make_flora, data, None)
    data = make_datamodule(batch_size=8)
    compiled = fits(make_flora, data, CompiledStep())
    rho = 1e4 * 2.0**-53
    tol = 100 * 6 * 2 * rho * 1e-3
    for (e_state, e_loss), (c_state, c_loss) in zip(eager, compiled, strict=True):
        assert c_loss == pytest.approx(e_loss, rel=100 * rho)
        for name, tensor in e_state.items():
            assert torch.allclose(c_state[name], tensor, rtol=0, atol=tol), name
    # the fits differ from each other: the comparison is not of untrained states
    assert not torch.equal(next(iter(eager[0][0].values())), next(iter(eager[1][0].values())))
