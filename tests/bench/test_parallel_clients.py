"""The parallel-clients bench: one round both ways, timed, with the adapters' agreement."""

from __future__ import annotations

import pytest
import torch

from flora_lightning.bench.parallel_clients import markdown, measure_parallel_round


def test_a_round_both_ways_reports_times_and_agreement():
    result = measure_parallel_round(
        "tiny", clients=3, parallel_clients=(1, 3), per_client=10, batch_size=4, rounds=1
    )
    assert result["local_steps_per_client"] == 3  # 4 + 4 + 2 rows: a partial last batch
    assert [r["parallel_clients"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["sequential_s_per_round"] > 0 and row["parallel_s_per_round"] > 0
        assert row["speedup"] == row["sequential_s_per_round"] / row["parallel_s_per_round"]
        assert row["max_adapter_diff"] <= 1e-5  # the same clients' adapters both ways
    assert "| 3 |" in markdown(result)
    assert result["sequential_step"] == "eager"  # cuda_graphs auto: eager on a CPU
    assert "one at a time the local step runs eager, K at a time eager" in markdown(result)
    profile = result["profile"]
    assert profile["parallel_clients"] == 3
    for way in ("sequential", "parallel"):
        assert profile[way]["matmul"] > 0 and profile[way]["elementwise"] > 0
    assert "| matmul |" in markdown(result)
    floor = profile["floor"]
    assert floor["matmul_gflop_per_round"] > 0 and len(floor["peak_matmul_gflops"]) == 1
    flops = floor["matmul_gflop_per_round"]
    (peak,) = floor["peak_matmul_gflops"]
    assert floor["floor_s_per_round"] == [pytest.approx(flops / peak)]
    seq = result["rows"][-1]["sequential_s_per_round"]  # one timed round: its time is the min
    assert floor["speedup_caps"] == [pytest.approx(seq * peak / flops)]
    assert floor["speedup_cap"] == floor["speedup_caps"][0]
    assert "FLOP floor" in markdown(result)


def test_matmul_flops_counts_forward_and_backward():
    """A linear layer's matmuls, counted by hand: x [3, 4] @ W^T [4, 5] is 2*3*4*5 FLOPs
    forward; the backward's grad_x and grad_W are one such matmul each."""
    from flora_lightning.bench.parallel_clients import matmul_flops

    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    assert matmul_flops(lambda: torch.nn.functional.linear(x, w).sum().backward()) == 3 * 120
    assert matmul_flops(lambda: x.detach() @ w.detach().T) == 120


def test_op_kinds():
    from flora_lightning.bench.parallel_clients import op_kind

    assert op_kind("aten::mm") == op_kind("aten::addmm") == "matmul"
    assert op_kind("aten::mul") == op_kind("aten::sigmoid_backward") == "elementwise"
    assert op_kind("aten::_softmax") == "attention + softmax"
    assert op_kind("aten::native_layer_norm_backward") == "layer norm"
    assert op_kind("aten::copy_") == "copies + indexing"
    assert op_kind("Optimizer.step#Adam.step") == "other"


def test_flora_bench_parallel_clients_writes_the_table(tmp_path):
    """``flora bench --parallel_clients [K]`` runs the round both ways and writes its files."""
    import json

    from flora_lightning.bench.run import main

    out = tmp_path / "bench"
    result = main(
        ["--arch", "tiny", "--batch_size", "8", "--parallel_clients", "[2]"]
        + ["--parallel_round_clients", "2", "--out", str(out)]
    )
    assert [r["parallel_clients"] for r in result["rows"]] == [2]
    saved = json.loads((out / "parallel_clients.json").read_text())
    assert saved["rows"] == result["rows"] and saved["clients"] == 2
    assert "| 2 |" in (out / "parallel_clients.md").read_text()
