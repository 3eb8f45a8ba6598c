"""Communicated parameters at ViT-B/32 match the paper's table (random weights, no download)."""

from __future__ import annotations

import copy

import pytest
import torch

from flora_lightning.clip.backbone import CLIPBundle
from flora_lightning.methods import METHODS, FederatedCLIPModule, LoraSettings
from flora_lightning.methods.base import build_model_from_bundle

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def vit_b32() -> CLIPBundle:
    """``CLIPModel(CLIPConfig())``: the ViT-B/32 architecture, random weights, built once."""
    from transformers import CLIPConfig, CLIPModel

    from flora_lightning.offline.tiny_clip import build_tokenizer

    torch.manual_seed(0)
    return CLIPBundle(CLIPModel(CLIPConfig()), build_tokenizer(), None)


def build(short: str, bundle: CLIPBundle, classes: list[str] = CIFAR10) -> FederatedCLIPModule:
    """A method on the shared model; every baseline's _attach refreezes all of CLIP first.

    The caption is the bare class name: the text forward that initialises heads stays short.
    """
    module = build_model_from_bundle(METHODS[short]("random-init/vit-b-32"), bundle)
    module.configure_task(classes, "{}")
    return module


def communicated(module: FederatedCLIPModule) -> int:
    return sum(t.numel() for t in module.communicated_state().values())


def test_towers_match_the_paper(vit_b32):
    clip = vit_b32.model
    assert clip.config.projection_dim == 512
    assert sum(p.numel() for p in clip.text_model.parameters()) == 63_165_952
    assert sum(p.numel() for p in clip.vision_model.parameters()) == 87_456_000
    assert clip.text_projection.weight.numel() == 262_144
    assert clip.visual_projection.weight.numel() == 393_216


@pytest.mark.parametrize(
    ("short", "expected"),
    [
        ("fedfft", 151_277_313),
        ("fedlc", 513 * 10),
        ("fedvmlc", 87_456_000 + 513 * 10),
        ("fedaa", 525_312),
    ],
)
def test_baseline_counts(vit_b32, short, expected):
    module = build(short, vit_b32)
    assert module.num_trainable_parameters() == expected
    state = module.communicated_state()
    assert sum(t.numel() for t in state.values()) == expected
    assert {t.dtype for t in state.values()} == {torch.float32}  # 4 bytes each way per param


@pytest.mark.parametrize("short", ["fedlc", "fedvmlc"])
def test_head_grows_with_the_classes(vit_b32, short):
    classes = [str(i) for i in range(100)]
    base = 87_456_000 if short == "fedvmlc" else 0
    assert communicated(build(short, vit_b32, classes)) == base + 513 * 100


def test_flora_count(vit_b32):
    # peft wraps layers in place: FLoRA gets its own copy of the shared model.
    bundle = CLIPBundle(copy.deepcopy(vit_b32.model), vit_b32.tokenizer, None)
    module = build_model_from_bundle(
        METHODS["flora"]("random-init/vit-b-32", LoraSettings()), bundle
    )
    assert communicated(module) == 12 * (512 * 2 + 2 * 512) == 24_576
