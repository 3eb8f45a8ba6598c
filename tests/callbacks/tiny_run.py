"""Shared by the callback tests: a real, tiny federated run."""

from __future__ import annotations

import torch

from flora_lightning.bench.workload import build_clip_bundle, synthetic_datamodule
from flora_lightning.federation.loop import FederatedLoop
from flora_lightning.methods import FLoRA
from flora_lightning.methods.base import build_model_from_bundle


def fit_tiny(tmp_path, callbacks, rounds=1, clients=2, per_client=16, batch_size=8):
    """FLoRA (cached) on a random-init tiny CLIP and synthetic data; returns (loop, summary)."""
    torch.manual_seed(0)
    data = synthetic_datamodule(
        tmp_path / "data", clients=clients, per_client=per_client, batch_size=batch_size
    )
    model = build_model_from_bundle(FLoRA("random-init/tiny"), build_clip_bundle("tiny"))
    loop = FederatedLoop(
        rounds=rounds,
        accelerator="cpu",
        callbacks=callbacks,
        default_root_dir=str(tmp_path / "run"),
        progress=False,
    )
    return loop, loop.fit(model, data)
