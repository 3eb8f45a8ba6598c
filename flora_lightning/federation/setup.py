"""Setting up a federated run: the trainer settings' checks and the Fabric launch.

:func:`check_settings` validates ``trainer.*`` when the loop is built (before anything heavy
loads); :func:`setup_run` builds the Fabric, loads data and model in the order that fails fastest
on bad input, and gives the loop its :class:`~flora_lightning.federation.local_trainer.LocalTrainer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch

from flora_lightning.clip.hub import NotAvailableError
from flora_lightning.federation.local_trainer import LocalTrainer
from flora_lightning.federation.ranks import ClientRanks, check_client_ranks

Precision = Literal["32-true", "16-mixed", "bf16-mixed"]
OnClientError = Literal["skip", "raise"]
OnTooFewUpdates = Literal["raise", "skip"]
ON_TOO_FEW_UPDATES = ("raise", "skip")
"""Values of ``trainer.on_too_few_updates``."""


def check_settings(
    rounds: int,
    local_epochs: int,
    max_local_steps: int | None,
    join_ratio: float,
    precision: str,
    resume_every_n_rounds: int,
    keep_last_checkpoints: int | None,
    on_client_error: str,
    client_ranks: ClientRanks = None,
    client_state_dir: str | None = None,
    on_too_few_updates: str = "raise",
    **_: object,
) -> None:
    """Refuse bad ``trainer.*`` values, naming the field and the fix."""
    if rounds < 0:
        raise ValueError(f"trainer.rounds must be >= 0 (got {rounds}).")
    if local_epochs < 1:
        raise ValueError(f"trainer.local_epochs must be >= 1 (got {local_epochs}).")
    if max_local_steps is not None and max_local_steps < 1:
        raise ValueError(f"trainer.max_local_steps must be >= 1 or null (got {max_local_steps}).")
    if not 0 < join_ratio <= 1:
        raise ValueError(
            f"trainer.join_ratio must be in (0, 1] (got {join_ratio}); 1.0 means every "
            "client joins every round."
        )
    if precision not in ("32-true", "16-mixed", "bf16-mixed"):
        raise ValueError(
            f"trainer.precision must be 32-true, 16-mixed or bf16-mixed (got {precision!r})."
        )
    if resume_every_n_rounds < 1:
        raise ValueError(
            f"trainer.resume_every_n_rounds must be >= 1 (got {resume_every_n_rounds})."
        )
    if keep_last_checkpoints is not None and keep_last_checkpoints < 1:
        raise ValueError(
            f"trainer.keep_last_checkpoints must be >= 1 or null (got {keep_last_checkpoints})."
        )
    if on_client_error not in ("skip", "raise"):
        raise ValueError(
            f"trainer.on_client_error must be skip or raise (got {on_client_error!r})."
        )
    check_on_too_few_updates(on_too_few_updates)
    check_client_ranks(client_ranks)
    if client_state_dir is not None and Path(client_state_dir).is_file():
        raise ValueError(
            f"trainer.client_state_dir={client_state_dir!r} is a file; give a folder (created "
            "when missing) or null to keep the clients' optimizer states in memory."
        )


def check_on_too_few_updates(value: str) -> None:
    """Refuse a ``trainer.on_too_few_updates`` other than raise or skip, naming the field."""
    if value not in ON_TOO_FEW_UPDATES:
        raise ValueError(
            f"trainer.on_too_few_updates must be raise or skip (got {value!r}): raise stops the "
            "run at a round with fewer than trainer.strategy.min_clients accepted updates, skip "
            "records that round unaggregated and goes on."
        )


def setup_run(loop, model, data, loggers: list) -> None:
    """Fabric, data, model and ``loop.trainer`` for ``loop``'s settings.

    Sets ``loop.fabric``, ``loop.model``, ``loop.module`` (the Fabric-wrapped model),
    ``loop.datamodule`` and ``loop.trainer``.
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
    loop.trainer = LocalTrainer(
        fabric,
        local_epochs=loop.local_epochs,
        max_local_steps=loop.max_local_steps,
        keep_optimizer_state=loop.keep_client_optimizer_state,
        seed=loop.seed,
        client_state_dir=loop.client_state_dir,
    )
