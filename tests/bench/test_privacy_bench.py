"""``flora bench --dp_sgd true``: DP-SGD's step timed and metered next to the plain step."""

from __future__ import annotations

import json

import pytest

from flora_lightning.bench import BenchConfig
from flora_lightning.bench.config import VARIANTS
from flora_lightning.bench.privacy import markdown_section, measure_dp_sgd, refusal
from flora_lightning.bench.run import main
from flora_lightning.bench.worker import measure_method
from flora_lightning.privacy.dpsgd import DPSGDStep, optimized_named_parameters


def test_only_fedfft_is_refused_and_it_is_not_measured(tmp_path):
    refused = {v: refusal(v) for v in VARIANTS}
    assert [v for v, reason in refused.items() if reason] == ["FedFFT"]
    assert "privacy.level=sample" in refused["FedFFT"] and "FedFFT" in refused["FedFFT"]
    # Refused before anything is built or timed (no Fabric, module or batch needed).
    result = measure_dp_sgd(None, None, None, BenchConfig(out=str(tmp_path)), "FedFFT", None, 0)
    assert result["refused"] == refused["FedFFT"] and result["pairs"] == []
    # Without --dp_sgd no row carries a result: the report has no DP section.
    assert markdown_section([{"method": "FLoRA"}]) == ""


def test_flora_dp_step_is_timed_beside_the_plain_one_also_with_freeze_a(tmp_path, monkeypatch):
    calls = []  # per DP step: the parameters it updated, and its noise
    original = DPSGDStep.__call__

    def spy(self, fabric, module, optimizer, batch, batch_idx):
        calls.append((sorted(optimized_named_parameters(module)), self.noise_multiplier))
        return original(self, fabric, module, optimizer, batch, batch_idx)

    monkeypatch.setattr(DPSGDStep, "__call__", spy)
    cfg = BenchConfig(
        arch="tiny",
        batch_size=4,
        steps=2,
        warmup=1,
        min_timed_seconds=0,
        dp_sgd=True,
        out=str(tmp_path),
    )
    result = measure_method(cfg, "FLoRA")
    dp = result["dp_sgd"]
    assert dp["refused"] is None and (dp["noise_multiplier"], dp["max_grad_norm"]) == (1.0, 1.0)
    assert [p["method"] for p in dp["pairs"]] == ["FLoRA", "FLoRA (freeze_a)"]
    for pair in dp["pairs"]:
        for step in (pair["plain"], pair["dp"]):
            assert step["timed_steps"] >= 2 and step["step_seconds"] > 0
            assert step["step_cpu_seconds"] > 0 and step["peak_memory_bytes"] > 0
        assert pair["step_ratio"] == pair["dp"]["step_seconds"] / pair["plain"]["step_seconds"]
        assert pair["memory_ratio"] == (
            pair["dp"]["peak_memory_bytes"] / pair["plain"]["peak_memory_bytes"]
        )
    # The DP step really ran: warm-up + timed steps of each pair, A and B first, then B alone.
    timed = [p["dp"]["timed_steps"] for p in dp["pairs"]]
    with_a = [names for names, _ in calls if any("lora_A" in n for n in names)]
    b_only = [names for names, _ in calls if not any("lora_A" in n for n in names)]
    assert len(with_a) >= 1 + timed[0] and len(b_only) >= 1 + timed[1]
    assert calls.index((b_only[0], 1.0)) == len(with_a)  # freeze_a's pair comes second
    assert {n.replace("lora_A", "lora_B") for n in with_a[0]} == set(b_only[0])
    # The method's own measurements (made first) are those of the unfrozen FLoRA.
    assert result["trainable_params"] == 512

    md = markdown_section([result])
    assert "| FLoRA (freeze_a) | " in md and "noise multiplier 1" in md
    assert f"| {dp['pairs'][0]['step_ratio']:.2f}x |" in md


def test_bench_option_writes_the_pairs_to_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    report = main(
        ["--arch", "tiny", "--batch_size", "4", "--steps", "1", "--client_samples", "8"]
        + ["--methods", "[FLoRA]", "--min_timed_seconds", "0.2", "--loop_overhead", "false"]
        + ["--dp_sgd", "true", "--out", str(out)]
    )
    assert report["config"]["dp_sgd"] is True
    saved = json.loads((out / "bench.json").read_text())
    (flora,) = saved["methods"]
    pairs = flora["dp_sgd"]["pairs"]
    assert [p["method"] for p in pairs] == ["FLoRA", "FLoRA (freeze_a)"]
    md = (out / "bench.md").read_text()
    assert "DP-SGD vs the plain local step" in md and "--dp_sgd true" in md
    for pair in pairs:
        row = next(line for line in md.splitlines() if line.startswith(f"| {pair['method']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) == pytest.approx(pair["plain"]["step_seconds"], rel=6e-3)
        assert float(cells[2]) == pytest.approx(pair["dp"]["step_seconds"], rel=6e-3)
        assert cells[3] == f"{pair['step_ratio']:.2f}x"
