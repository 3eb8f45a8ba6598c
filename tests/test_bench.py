"""``flora bench``: options, ViT-B/32 counts, each method's worker, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flora_lightning.bench import (
    VARIANTS,
    BenchConfig,
    build_clip_bundle,
    config_from,
    main,
    measure_method,
)


def test_vit_b_32_parameter_counts_are_the_papers():
    from flora_lightning.methods import FLoRA
    from flora_lightning.methods.base import build_model_from_bundle

    with torch.device("meta"):  # shapes only: no memory, no init time
        bundle = build_clip_bundle("vit-b-32")
        assert sum(p.numel() for p in bundle.model.parameters()) == 151_277_313
        assert build_model_from_bundle(FLoRA("x"), bundle).num_trainable_parameters() == 24_576
    # The text config agrees with the offline tokenizer on EOS (pooling reads the real EOS).
    assert bundle.model.config.text_config.eos_token_id == bundle.tokenizer.eos_token_id


def test_flora_cli_dispatches_bench_and_canonicalises_methods():
    from flora_lightning.cli import build_parser

    config = build_parser().parse_args(
        ["bench", "--methods", "flora", "FEDFFT", "--arch", "tiny", "--steps", "3"]
    )
    assert config.subcommand == "bench"
    cfg, worker = config_from(config.bench)
    assert cfg.methods == ["FLoRA", "FedFFT"] and cfg.steps == 3 and worker is None
    assert cfg.steps_per_epoch == math.ceil(5000 / 128) == 40


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(methods=["LoRA"]), "choose from FLoRA, FLoRA-uncached"),
        (dict(steps=0), "--steps must be >= 1"),
        (dict(precision="16-mixed"), "needs --device cuda"),
    ],
)
def test_bad_options_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**kwargs)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("FLoRA", "FedFFT")])
def test_each_method_is_measured(variant, tmp_path):
    cfg = BenchConfig(arch="tiny", batch_size=4, steps=1, warmup=0, out=str(tmp_path))
    result = measure_method(cfg, variant)
    assert result["method"] == variant
    # Cached exactly when the loop would cache: a frozen image encoder, caching not turned off.
    assert result["cached"] == (result["image_encoder_frozen"] and variant != "FLoRA-uncached")
    if variant in ("FLoRA", "FLoRA-uncached", "FedFFT", "FedVMLC"):
        assert result["cached"] == (variant == "FLoRA")
    assert (result["encode_seconds_per_image"] > 0) == result["cached"]
    assert result["bytes_per_round_per_client"] == 4 * result["communicated_params"]
    assert result["step_seconds"] > 0 and result["peak_memory_bytes"] > 0


def test_tiny_bench_end_to_end(tmp_path):
    out = tmp_path / "bench"
    report = main(
        ["--arch", "tiny", "--batch_size", "8", "--steps", "1", "--client_samples", "32"]
        + ["--methods", "FLoRA", "FedFFT", "--out", str(out)]
    )
    saved = json.loads((out / "bench.json").read_text())
    assert saved["methods"] == report["methods"]
    assert set(saved) >= {"config", "machine", "wall_seconds", "loop_overhead", "targets"}
    flora, fft = (
        next(r for r in saved["methods"] if r["method"] == m) for m in ("FLoRA", "FedFFT")
    )
    assert (out / "workers" / "FLoRA.json").exists()  # measured in its own process

    # Tiny CLIP: LoRA on 2 text layers' out_proj (512 params) vs the whole model.
    assert flora["trainable_params"] == 512 and fft["trainable_params"] == 186_753
    assert flora["bytes_reduction_vs_fft"] == fft["trainable_params"] / flora["trainable_params"]
    assert fft["bytes_reduction_vs_fft"] == fft["round_speedup_vs_fft"] == 1.0
    # Extrapolations and ratios come from the measured numbers.
    assert saved["steps_per_epoch"] == 4
    assert flora["cached"] and not fft["cached"] and fft["caching_seconds_per_round"] == 0
    assert flora["round_seconds"] == pytest.approx(
        4 * flora["step_seconds"] + 32 * flora["encode_seconds_per_image"] / 50
    )
    # Training from pixels also pays preprocessing for every image of every epoch.
    assert fft["load_seconds_per_image"] > 0 and flora["load_seconds_per_image"] == 0
    assert fft["round_seconds"] == pytest.approx(
        4 * fft["step_seconds"] + 32 * fft["load_seconds_per_image"]
    )
    assert flora["round_speedup_vs_fft"] == pytest.approx(
        fft["round_seconds"] / flora["round_seconds"]
    )
    assert flora["memory_reduction_vs_fft"] == pytest.approx(
        fft["peak_memory_bytes"] / flora["peak_memory_bytes"]
    )
    assert flora["peak_memory_excl_runtime_bytes"] == (
        flora["peak_memory_bytes"] - flora["runtime_memory_bytes"]
    )
    assert 0 <= saved["loop_overhead"]["overhead_fraction"] < 1

    md = (out / "bench.md").read_text()
    assert "| FLoRA (cached) | 512 | 2,048 |" in md
    assert "| FedFFT | 186,753 | 747,012 |" in md
    assert "extrapolated" in md and "Loop overhead" in md
    # A tiny model cannot reach the ViT-B/32 target: the check says so.
    assert ">= 6,000x fewer bytes per round: 365x (NOT met; 512 vs 186,753 params)" in md
