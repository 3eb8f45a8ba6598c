"""``flora bench`` workers: the ViT-B/32 counts and each method measured in-process."""

from __future__ import annotations

import pytest
import torch

from flora_lightning.bench import BenchConfig
from flora_lightning.bench.config import VARIANTS
from flora_lightning.bench.worker import measure_method
from flora_lightning.bench.workload import build_clip_bundle


def test_vit_b_32_parameter_counts_are_the_papers():
    from flora_lightning.methods import FLoRA
    from flora_lightning.methods.base import build_model_from_bundle

    with torch.device("meta"):  # shapes only: no memory, no init time
        bundle = build_clip_bundle("vit-b-32")
        assert sum(p.numel() for p in bundle.model.parameters()) == 151_277_313
        assert build_model_from_bundle(FLoRA("x"), bundle).num_trainable_parameters() == 24_576
    # The text config agrees with the offline tokenizer on EOS (pooling reads the real EOS).
    assert bundle.model.config.text_config.eos_token_id == bundle.tokenizer.eos_token_id


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("FLoRA", "FedFFT")])
def test_each_method_is_measured(variant, tmp_path):
    cfg = BenchConfig(
        arch="tiny", batch_size=4, steps=1, warmup=0, min_timed_seconds=0.2, out=str(tmp_path)
    )
    result = measure_method(cfg, variant)
    assert result["method"] == variant
    # Cached exactly when the loop would cache: a frozen image encoder, caching not turned off.
    assert result["cached"] == (result["image_encoder_frozen"] and variant != "FLoRA-uncached")
    if variant in ("FLoRA", "FLoRA-uncached", "FedFFT", "FedVMLC"):
        assert result["cached"] == (variant == "FLoRA")
    assert (result["encode_seconds_per_image"] > 0) == result["cached"]
    assert result["bytes_per_round_per_client"] == 4 * result["communicated_params"]
    assert result["step_seconds"] > 0 and result["peak_memory_bytes"] > 0
