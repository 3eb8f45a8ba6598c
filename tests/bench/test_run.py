"""``flora bench`` end to end on a tiny CLIP: files, extrapolations, ratios and target checks."""

from __future__ import annotations

import json

import pytest

from flora_lightning.bench.report import markdown
from flora_lightning.bench.run import main


def test_tiny_bench_end_to_end(tmp_path):
    out = tmp_path / "bench"
    report = main(
        ["--arch", "tiny", "--batch_size", "8", "--steps", "1", "--client_samples", "36"]
        + ["--methods", "[FLoRA, FedFFT]", "--min_timed_seconds", "0.5", "--out", str(out)]
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
    # 36 samples at batch 8: 4 full steps and a last step on 4 samples, timed on its own.
    assert saved["steps_per_epoch"] == 5
    assert flora["last_batch_size"] == fft["last_batch_size"] == 4
    assert flora["last_step_seconds"] > 0 and fft["last_step_seconds"] > 0
    assert flora["cached"] and not fft["cached"] and fft["caching_seconds_per_round"] == 0
    assert flora["round_seconds"] == pytest.approx(
        4 * flora["step_seconds"]
        + flora["last_step_seconds"]
        + 36 * flora["encode_seconds_per_image"] / 50
    )
    # Training from pixels also pays preprocessing for every image of every epoch.
    assert fft["load_seconds_per_image"] > 0 and flora["load_seconds_per_image"] == 0
    assert fft["round_seconds"] == pytest.approx(
        4 * fft["step_seconds"] + fft["last_step_seconds"] + 36 * fft["load_seconds_per_image"]
    )
    # FLOPs: counted per step and per encoded image, combined as the round time is.
    assert fft["encode_flops_per_image"] == 0 < flora["encode_flops_per_image"]
    assert fft["step_flops"] > flora["step_flops"] > 0
    assert flora["flops_per_round"] == pytest.approx(
        4 * flora["step_flops"]
        + flora["last_step_flops"]
        + 36 * flora["encode_flops_per_image"] / 50
    )
    # FedFFT's last batch holds 4 of 8 images: its step costs about half a full one.
    assert 0.3 < fft["last_step_flops"] / fft["step_flops"] < 0.7
    assert flora["work_reduction_vs_fft"] == pytest.approx(
        fft["flops_per_round"] / flora["flops_per_round"]
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
    # The report is the saved data rendered with the template: bench.json alone rebuilds it.
    assert markdown(saved) == md
    assert "`flora bench --methods [FLoRA,FedFFT] --rounds 50 --client_samples 36 " in md
    # Steps timed with torch.utils.benchmark: at least `steps`, each block's per-step time kept.
    assert flora["timed_steps"] >= 1 and len(flora["step_seconds_all"]) >= 1
    assert min(flora["step_seconds_all"]) <= flora["step_seconds"] <= max(flora["step_seconds_all"])
    assert flora["step_cpu_seconds"] > 0


@pytest.mark.slow  # four worker processes, two of them compiling (minutes on 2 cores)
def test_compile_ab_measures_each_method_eager_and_compiled_side_by_side(tmp_path):
    """``--compile ab``: both arms in one run, each a full report; the A/B table's ratios come
    from the arms' rows; ``--results`` copies the report to a dated file."""
    from datetime import date

    from flora_lightning.bench.report import ab_rows

    out, results = tmp_path / "bench", tmp_path / "results"
    report = main(
        ["--arch", "tiny", "--batch_size", "8", "--steps", "1", "--client_samples", "36"]
        + ["--methods", "[FLoRA, FedFFT]", "--min_timed_seconds", "0", "--out", str(out)]
        + ["--compile", "ab", "--loop_overhead", "false", "--results", str(results)]
    )
    eager, compiled = (report["arms"][arm]["methods"] for arm in ("eager", "compiled"))
    assert [r["step_runner"] for r in eager] == ["eager", "eager"]
    assert [r["step_runner"] for r in compiled] == ["compiled", "compiled"]  # CPU: no graphs
    assert (out / "eager" / "workers" / "FLoRA.json").exists()
    assert (out / "compiled" / "workers" / "FedFFT.json").exists()
    rows = ab_rows(eager, compiled)
    flora = rows[0]
    assert flora["step_speedup"] == eager[0]["step_seconds"] / compiled[0]["step_seconds"]
    assert flora["compiled_share_of_flop_ratio"] == pytest.approx(
        compiled[0]["round_speedup_vs_fft"] / compiled[0]["work_reduction_vs_fft"]
    )
    text = (out / "bench.md").read_text()
    assert "| FLoRA | compiled |" in text and "`eager/bench.md`" in text
    name = f"{date.today().isoformat()}-bench-tiny-cpu-32-true-ab-FLoRA-FedFFT"
    assert (results / f"{name}.md").read_text() == text
    assert json.loads((results / f"{name}.json").read_text())["arms"]["eager"]["methods"] == eager
    for arm in ("eager", "compiled"):
        assert (results / f"{name}-{arm}.md").read_text() == (out / arm / "bench.md").read_text()
