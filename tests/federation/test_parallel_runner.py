"""resolve_parallel_clients: K for the run, refused or falling back where batching cannot apply;
the step shape the memory model reads from a method."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from flora_lightning.clip.backbone import CLIPBundle
from flora_lightning.clip.feature_cache import FeatureCache
from flora_lightning.federation.local_trainer import LocalTrainer
from flora_lightning.federation.parallel_memory import client_step_bytes
from flora_lightning.federation.parallel_runner import resolve_parallel_clients, step_shape
from flora_lightning.methods import FedLC, FLoRA, OptimizerConfig
from flora_lightning.methods.base import build_model_from_bundle

TINY_CLIP = "flora-offline/tiny-clip"
# as tests/federation/test_parallel.py (where they are derived): rounding of the same math
ADAPTER_TOL = 1e-5
LOSS_TOL = 4 * torch.finfo(torch.float32).eps * 100


def engine(tiny_clip, data, cls=FLoRA, cached=True, ranks=None):
    bundle = CLIPBundle(copy.deepcopy(tiny_clip.model), tiny_clip.tokenizer,
                        tiny_clip.image_transform, tiny_clip.device_preprocess)  # fmt: skip
    model = build_model_from_bundle(cls(TINY_CLIP, optimizer=OptimizerConfig()), bundle)
    model.configure_task(data.class_names, data.template)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    trainer = LocalTrainer(fabric)
    cache = FeatureCache(fabric, model, data) if cached else None
    return SimpleNamespace(local_trainer=trainer, model=model, fabric=fabric, datamodule=data,
                           ranks=ranks, feature_cache=cache)  # fmt: skip


@pytest.fixture(scope="module")
def data(make_datamodule):
    data = make_datamodule(num_clients=4, batch_size=64)
    data.setup("fit")
    return data


def test_explicit_k_is_capped_by_the_round(tiny_clip, data):
    e = engine(tiny_clip, data)
    assert resolve_parallel_clients(e, 1, None, 4) == 1
    assert resolve_parallel_clients(e, 3, None, 4) == 3
    assert resolve_parallel_clients(e, 8, None, 4) == 4


def test_auto_picks_k_from_the_budget(tiny_clip, data):
    e = engine(tiny_clip, data)
    per_client = client_step_bytes(step_shape(e.model, 64))
    assert resolve_parallel_clients(e, "auto", 2.5 * per_client / 2**20, 10) == 2
    assert resolve_parallel_clients(e, "auto", 0.5 * per_client / 2**20, 10) == 1
    assert resolve_parallel_clients(e, "auto", 1e6, 10) == 10


def test_step_shape_reads_the_text_tower_for_flora_only(tiny_clip, data):
    flora = step_shape(engine(tiny_clip, data).model, 64)
    text = tiny_clip.model.config.text_config
    assert (flora.layers, flora.width, flora.heads) == (
        text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
    )  # fmt: skip
    assert flora.captions == 10 and flora.trainable > 0
    head = step_shape(engine(tiny_clip, data, FedLC).model, 64)
    assert head.layers == 0 and head.trainable == 10 * (head.feature_dim + 1)


def test_refused_k_raises_and_auto_falls_back(tiny_clip, data, caplog):
    e = engine(tiny_clip, data, cached=False)
    with pytest.raises(ValueError, match="trainer.parallel_clients=4: .*Set trainer.parallel"):
        resolve_parallel_clients(e, 4, None, 4)
    with caplog.at_level(logging.WARNING):
        assert resolve_parallel_clients(e, "auto", 1e6, 4) == 1
    assert "trainer.parallel_clients=auto trains one client at a time" in caplog.text
