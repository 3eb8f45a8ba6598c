"""grouped_lora: K clients' LoRA weights in one text-tower forward equal each client's own."""

from __future__ import annotations

import copy

import pytest
import torch

from flora_lightning.clip.backbone import CLIPBundle
from flora_lightning.federation.grouped_lora import (
    grouped_caption_features,
    grouped_lora,
    lora_linears,
)
from flora_lightning.methods import FLoRA, LoraSettings
from flora_lightning.methods.base import build_model_from_bundle

# The grouped and the plain forward do the same float32 arithmetic grouped differently (a
# batched matmul per client instead of one matmul); the caption features are normalised
# (|f| = 1), so each element differs by a few roundings: ~10 eps32.
TOL = 10 * torch.finfo(torch.float32).eps


def flora(tiny_clip, **lora):
    bundle = CLIPBundle(copy.deepcopy(tiny_clip.model), tiny_clip.tokenizer,
                        tiny_clip.image_transform, tiny_clip.device_preprocess)  # fmt: skip
    torch.manual_seed(0)
    model = build_model_from_bundle(
        FLoRA("flora-offline/tiny-clip", lora=LoraSettings(targets=["q_proj", "out_proj"], **lora)),
        bundle,
    )
    model.configure_task([str(i) for i in range(10)], "a photo of the digit {}.")
    return model


def client_weights(model, k: int, generator) -> dict[str, torch.Tensor]:
    """K clients' own random LoRA weights (B nonzero, so every path matters)."""
    return {
        n: torch.randn((k, *p.shape), generator=generator)
        for n, p in model.trainable_named_parameters()
    }


@pytest.mark.parametrize("freeze_a", [False, True])
def test_each_clients_captions_equal_its_own_forward(tiny_clip, freeze_a):
    model = flora(tiny_clip, freeze_a=freeze_a)
    weights = client_weights(model, 3, torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 4, 7, 9])
    with torch.no_grad():
        grouped = grouped_caption_features(model, lora_linears(model), weights, labels, 3)
        assert grouped.shape == (3, 4, model.clip_model().config.projection_dim)
        alone = []
        for k in range(3):
            model.load_communicated_state({n: w[k] for n, w in weights.items()})
            alone.append(model.class_text_features(labels))
    for k in range(3):
        torch.testing.assert_close(grouped[k], alone[k], rtol=0, atol=TOL)
    # the clients differ: a check that compares each with its own weights, not with one
    assert (alone[0] - alone[1]).abs().max() > 100 * TOL


def test_forward_restored_and_stray_weights_refused(tiny_clip):
    model = flora(tiny_clip)
    modules = lora_linears(model)
    assert modules and all("forward" not in vars(m) for m in modules.values())
    weights = client_weights(model, 2, torch.Generator().manual_seed(2))
    with grouped_lora(modules, weights, 2):
        assert all("forward" in vars(m) for m in modules.values())
    assert all("forward" not in vars(m) for m in modules.values())
    with pytest.raises(ValueError, match="not active LoRA weights"):
        with grouped_lora(modules, {"clip.logit_scale": torch.zeros(2)}, 2):
            pass
    assert all("forward" not in vars(m) for m in modules.values())  # restored after the error
