"""Setting up a federated run: the trainer settings' checks and the Fabric launch.

:func:`check_settings` (from the torch-free :mod:`flora_lightning.federation.settings`)
validates ``trainer.*`` when the loop is built, before anything heavy loads; :func:`setup_run`
builds the Fabric, loads data and model in the order that fails fastest on bad input, and gives the loop its :class:`~flora_lightning.federation.local_trainer.LocalTrainer`.
"""

from __future__ import annotations

import lightning as L
import torch

from flora_lightning.clip.hub import NotAvailableError
from flora_lightning.federation.local_trainer import LocalTrainer
from flora_lightning.federation.settings import (  # noqa: F401  (re-exported: the old import paths)
    ON_TOO_FEW_UPDATES,
    ClientRanks,
    CudaGraphs,
    OnClientError,
    OnTooFewUpdates,
    Precision,
    check_on_too_few_updates,
    check_settings,
)
from flora_lightning.federation.step_capture import plan_capture


def setup_run(loop, model, data, loggers: list) -> None:
    """Fabric, data, model and ``loop.local_trainer`` for ``loop``'s settings.

    Sets ``loop.fabric``, ``loop.model``, ``loop.module`` (the Fabric-wrapped model),
    ``loop.datamodule`` and ``loop.local_trainer``.
    """
    if loop.precision == "16-mixed" and not torch.cuda.is_available():
        raise ValueError("trainer.precision=16-mixed needs CUDA; use bf16-mixed or 32-true on CPU.")
    per_round = loop.clients_per_round(data.num_clients)
    if per_round < loop.strategy.min_clients:
        raise ValueError(
            f"trainer.join_ratio={loop.join_ratio} samples {per_round} client(s) per round, "
            f"fewer than trainer.strategy.min_clients={loop.strategy.min_clients}."
        )
    fabric = L.Fabric(
        accelerator=loop.accelerator,
        devices=1,
        precision=loop.precision,
        loggers=loggers,
        callbacks=loop.callbacks,
    )
    fabric.seed_everything(loop.seed, verbose=False)
    # Load data and model before any training; report both when both are unreachable.
    problems = []
    for load in (lambda: data.setup("fit"), model.configure_model):
        try:
            load()
        except NotAvailableError as err:
            problems.append(str(err))
    if problems:
        raise NotAvailableError("\n".join(problems))
    model.configure_task(data.class_names, data.template)
    data.set_image_transform(model.image_transform)
    loop.fabric = fabric
    loop.module = fabric.setup_module(model)
    loop.model = model
    loop.datamodule = data
    loop.local_trainer = LocalTrainer(
        fabric,
        local_epochs=loop.local_epochs,
        max_local_steps=loop.max_local_steps,
        keep_optimizer_state=loop.keep_client_optimizer_state,
        seed=loop.seed,
        client_state_dir=loop.client_state_dir,
        capture=plan_capture(fabric.device, loop.cuda_graphs, loop.compile),
    )
