"""Personalised evaluation: the global model on every client's own local test set.

With ``data.local_test_fraction`` set, each client holds a local test set drawn from its own
(non-IID) partition. :func:`evaluate_clients` measures, for the global model currently loaded:

- ``local_acc``: the global model's accuracy on each client's local test set;
- ``personalized_acc`` (``finetune_steps`` k > 0): the accuracy after k local fine-tuning
  steps of that client from the global state, through :meth:`LocalTrainer.fit
  <flora_lightning.federation.local_trainer.LocalTrainer.fit>` (the one local step of every runtime), seeded by
  ``(seed, round, client)``.

Each comes with its spread over clients (unweighted: every client counts once)::

    acc_mean = 1/N Σ_c acc_c      acc_std = sqrt(1/N Σ_c (acc_c - acc_mean)²)

A personalisation never leaks into training: each fine-tune starts from the global state with
a fresh optimizer, keeps no optimizer state (the trainer's ``optimizer_states`` are not read
or written), adds no proximal term, the global state is loaded back bit for bit afterwards,
and the whole evaluation runs under a forked torch RNG.

Under sample-level DP (the run's trainer steps with DP-SGD) fine-tuning is refused: its steps
touch every client's training data at every evaluation, outside the planned steps the noise
was chosen for and the per-client accountant, and the personalised accuracies it yields are
released, so the run's epsilon would not cover them. ``finetune_steps: 0`` (the global model
on the local test sets) is unaffected.
"""

from __future__ import annotations

import numpy as np
import torch

from flora_lightning.clip.feature_cache import FeatureCache
from flora_lightning.federation.evaluation import evaluate_loader
from flora_lightning.federation.local_trainer import LocalTrainer


def evaluate_clients(
    fabric,
    model,
    source,
    clients: list[int],
    num_classes: int,
    trainer: LocalTrainer | None = None,
    finetune_steps: int = 0,
    round_: int = 0,
) -> dict:
    """Local (and, with ``finetune_steps``, personalised) accuracy of every client in ``clients``.

    Args:
        fabric: the launched Fabric (device, autocast).
        model: the method, set up with ``fabric``, holding the global state.
        source: what yields each client's batches (``client_test_dataloader(client)`` and,
            to fine-tune, ``client_dataloader(client, generator)``): the datamodule or a
            :class:`~flora_lightning.clip.feature_cache.FeatureCache` of it.
        clients: the clients to evaluate (usually all of them).
        num_classes: classes of the task.
        trainer: the run's :class:`~flora_lightning.federation.local_trainer.LocalTrainer` (its Fabric and
            seed); required when ``finetune_steps`` > 0.
        finetune_steps: k local optimizer steps on the client's training data before the
            personalised evaluation; 0: local accuracy only.
        round_: the round (seeds the fine-tuning).

    Returns:
        ``local_acc`` (client id -> top-1 accuracy, micro over its local test set) and
        ``local_acc_mean``, ``local_acc_min``, ``local_acc_max``, ``local_acc_std``
        (population std over clients); with k > 0 the same for ``personalized_acc``.
    """
    if not clients:
        raise ValueError("personalised evaluation needs at least one client (got none).")
    if finetune_steps < 0:
        raise ValueError(
            f"PersonalizedEvaluation.finetune_steps must be >= 0 (got {finetune_steps}); 0 "
            "evaluates the global model only."
        )
    if finetune_steps > 0 and trainer is not None and trainer.step_fn is not None:
        raise ValueError(refuse_private_finetuning(finetune_steps))
    if finetune_steps > 0 and trainer is None:
        raise ValueError(
            "PersonalizedEvaluation.finetune_steps > 0 needs the run's LocalTrainer to fine-tune "
            "with; pass trainer=..."
        )

    def accuracy(client: int) -> float:
        loader = source.client_test_dataloader(client)
        return evaluate_loader(fabric, model, loader, num_classes)["test_acc"]

    # Loaders and fits draw from the global torch RNG: fork it, so that evaluating (every n
    # rounds, or not at all) cannot change what the training after it draws.
    with torch.random.fork_rng(devices=[fabric.device] if fabric.device.type == "cuda" else []):
        local = {client: accuracy(client) for client in clients}
        result = {"local_acc": local, **spread("local_acc", local)}
        if finetune_steps > 0:
            personal = personalize(
                model, source, clients, trainer, finetune_steps, round_, accuracy
            )
            result |= {"personalized_acc": personal, **spread("personalized_acc", personal)}
    return result


def refuse_private_finetuning(finetune_steps: int) -> str:
    """The error for personalised fine-tuning in a sample-level DP run (see the module
    docstring)."""
    return (
        f"PersonalizedEvaluation.finetune_steps={finetune_steps} fine-tunes on the clients' "
        "training data without DP-SGD and outside the accountant, so privacy.level=sample "
        "could not cover the released personalised accuracy: set "
        "PersonalizedEvaluation.finetune_steps to 0 (local accuracy of the global model only) "
        "or train without privacy.level=sample."
    )


def personalize(model, source, clients, trainer, steps: int, round_: int, measure) -> dict:
    """``measure(client)`` after ``steps`` local steps of each client from the global state.

    The global state is restored after each client, also when a fit or ``measure`` fails.
    """
    data = source.data if isinstance(source, FeatureCache) else source
    # A throwaway trainer: the run's Fabric and seed, but its own (empty) optimizer states,
    # enough epochs to reach ``steps`` (each epoch has >= 1 batch), and the run's local step
    # without DP-SGD's.
    tuner = LocalTrainer(
        trainer.fabric,
        local_epochs=steps,
        max_local_steps=steps,
        keep_optimizer_state=False,
        seed=trainer.seed,
        capture=trainer.capture,  # the run's compiled step (compiled once)
    )
    global_state = model.communicated_state()  # detached copies
    scores = {}
    for client in clients:
        try:
            tuner.fit(model, data, client, round_, source=source)
            scores[client] = measure(client)
        finally:
            model.load_communicated_state(global_state)
    return scores


def spread(name: str, values: dict[int, float]) -> dict[str, float]:
    """``{name}_mean``, ``_min``, ``_max`` and ``_std`` (population) of per-client values."""
    array = np.asarray(list(values.values()), dtype=np.float64)
    return {
        f"{name}_mean": float(array.mean()),
        f"{name}_min": float(array.min()),
        f"{name}_max": float(array.max()),
        f"{name}_std": float(array.std()),
    }
