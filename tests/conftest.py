"""Shared test setup: no hub, one offline-asset cache per session, tiny CLIP and data fixtures.

The hub switches are set at import time, before any test module imports ``transformers`` or
``datasets`` (both read them when first imported). ``FLORA_CACHE_DIR`` is respected when the
environment sets it (CI keeps the built offline assets between jobs); otherwise the session gets
a fresh cache and builds ``flora-offline/tiny-clip`` and ``flora-offline/digits`` once.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

TINY_CLIP = "flora-offline/tiny-clip"
DIGITS = "flora-offline/digits"
DIGITS_TEMPLATE = "a photo of the digit {}."


@pytest.fixture(scope="session", autouse=True)
def flora_cache_dir(tmp_path_factory) -> Iterator[Path]:
    """``$FLORA_CACHE_DIR`` if the environment sets it, else a cache for this session only."""
    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get("FLORA_CACHE_DIR"):
            patch.setenv("FLORA_CACHE_DIR", str(tmp_path_factory.mktemp("flora_cache")))
        yield Path(os.environ["FLORA_CACHE_DIR"])


@pytest.fixture(scope="session")
def offline_assets(flora_cache_dir) -> dict[str, Path]:
    """Build (or find) the offline model and dataset once; their local paths."""
    from flora_lightning.offline import digits_data_files, tiny_clip_path

    return {"tiny_clip": tiny_clip_path(), "digits": Path(digits_data_files()["train"]).parent}


@pytest.fixture(scope="session")
def tiny_clip(offline_assets):
    """The loaded tiny CLIP bundle. Never mutate it: use ``make_flora`` for a private copy."""
    from flora_lightning.clip.backbone import load_clip

    return load_clip(TINY_CLIP)


@pytest.fixture(scope="session")
def make_flora(tiny_clip) -> Callable:
    """Factory: a FLoRA module on a private copy of the tiny CLIP, LoRA init seeded."""
    from flora_lightning.clip.backbone import CLIPBundle
    from flora_lightning.methods import FLoRA, LoraSettings, OptimizerConfig
    from flora_lightning.methods.base import build_model_from_bundle

    def make(lora: LoraSettings | None = None, lr: float = 1e-3, seed: int = 0):
        bundle = CLIPBundle(
            copy.deepcopy(tiny_clip.model),
            tiny_clip.tokenizer,
            tiny_clip.image_transform,
            tiny_clip.device_preprocess,
        )
        module = FLoRA(TINY_CLIP, lora=lora or LoraSettings(), optimizer=OptimizerConfig(lr=lr))
        torch.manual_seed(seed)  # peft draws LoRA A from the global RNG
        return build_model_from_bundle(module, bundle)

    return make


@pytest.fixture(scope="session")
def make_datamodule(offline_assets) -> Callable:
    """Factory: a FederatedDataModule on flora-offline/digits (3 clients, batch 32 by default)."""
    from flora_lightning.data.datamodule import FederatedDataModule
    from flora_lightning.data.partition import PartitionConfig

    def make(num_clients: int = 3, **overrides):
        kwargs = dict(
            dataset=DIGITS,
            image_column="image",
            label_column="label",
            template=DIGITS_TEMPLATE,
            test_split="test",  # the digits' own test split, as the offline quickstart
            batch_size=32,
            partition=PartitionConfig(
                kind="dirichlet", num_clients=num_clients, beta=1.0, min_samples=20, seed=42
            ),
        )
        kwargs.update(overrides)
        return FederatedDataModule(**kwargs)

    return make


@pytest.fixture
def datamodule(make_datamodule):
    """3 clients (Dirichlet beta=1), batch 32."""
    return make_datamodule()


@pytest.fixture
def make_loop(tmp_path) -> Callable:
    """Factory: a CPU FederatedLoop without progress bars, writing under ``tmp_path``."""
    from flora_lightning.federation.loop import FederatedLoop

    def make(rounds: int = 1, run: str = "run", **overrides):
        kwargs = dict(
            rounds=rounds,
            max_local_steps=2,
            accelerator="cpu",
            default_root_dir=str(tmp_path / run),
            progress=False,
            seed=42,
        )
        kwargs.update(overrides)
        return FederatedLoop(**kwargs)

    return make
