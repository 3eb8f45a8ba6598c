"""``flora bench --clients``: the clients scan on the tiny CLIP (4 and 16 clients)."""

from __future__ import annotations

import json

import pytest

from flora_lightning.bench import clients, clients_worker
from flora_lightning.bench.config import BenchConfig

# FLoRA's default LoRA on the tiny CLIP: 512 trainable parameters in 4 tensors (A and B of 2
# text layers' out_proj). Adam keeps exp_avg and exp_avg_sq (fp32) and a 4-byte step per tensor.
ADAM_BYTES_PER_CLIENT = 2 * 4 * 512 + 4 * 4
# Per client: 2 int64 partition indices, one int64 label count per class (10), and the cached
# features of its 2 images: 64 fp32 dims (the tiny CLIP's projection) and an int64 label each.
INDEX_BYTES, COUNT_BYTES, FEATURE_BYTES = 2 * 8, 10 * 8, 2 * (64 * 4 + 8)


def test_scan_of_4_and_16_clients(tmp_path, monkeypatch):
    # In this process (the library imports once; `flora bench` runs each point in a fresh one).
    monkeypatch.setattr(clients, "run_worker", clients_worker.measure)
    out = tmp_path / "bench"
    cfg = BenchConfig(arch="tiny", clients=[4, 16], out=str(out))
    report = clients.run_client_scan(cfg)

    saved = json.loads((out / "clients" / "clients.json").read_text())
    assert saved["rows"] == report["rows"]
    assert (out / "clients" / "clients.png").stat().st_size > 0
    text = (out / "clients" / "clients.md").read_text()
    rows = {(r["clients"], r["store"]): r for r in report["rows"]}
    assert set(rows) == {(n, s) for n in (4, 16) for s in ("memory", "disk")}
    for (n, store), row in rows.items():
        assert f"| {n} | {store} |" in text
        assert row["rounds"] == 2 and len(row["round_seconds"]) == 2
        # a client-round is its local fit plus its share of the loop's own work
        assert row["seconds_per_client_round"] > row["fit_seconds_per_client"] > 0
        assert row["overhead_ms_per_client"] > 0
        assert row["meets_overhead_target"] == (row["overhead_ms_per_client"] <= 5.0)
        assert row["peak_rss_mb"] >= row["start_rss_mb"] > 0
    for n in (4, 16):
        memory, disk = rows[(n, "memory")], rows[(n, "disk")]
        assert memory["state_bytes_per_client"] == ADAM_BYTES_PER_CLIENT
        assert memory["state_bytes_in_ram_per_client"] == ADAM_BYTES_PER_CLIENT
        # on disk: the same tensors plus each file's safetensors header; none of it in RAM
        assert disk["state_bytes_per_client"] > ADAM_BYTES_PER_CLIENT
        assert disk["state_bytes_in_ram_per_client"] == 0
        for row, optimizer in ((memory, ADAM_BYTES_PER_CLIENT), (disk, 0)):
            kept = row["kept_bytes_per_client"]
            assert kept["optimizer_state"] == optimizer
            assert kept["partition_indices"] == INDEX_BYTES
            assert kept["label_counts"] == COUNT_BYTES
            assert kept["cached_features"] == FEATURE_BYTES
            assert kept["round_records"] > 0
            assert kept["total"] == sum(v for k, v in kept.items() if k != "total")
            # 2 feature tensors per client; Adam's exp_avg, exp_avg_sq and step for 4 tensors
            # packed into one fp32 buffer
            assert row["kept_objects_per_client"]["cached_features"] == 2
            assert row["kept_objects_per_client"]["optimizer_state"] == (1 if optimizer else 0)
        assert disk["store_ms_per_client"] > 0
        files = list((out / "clients" / f"loop_disk_{n}" / "client_states").iterdir())
        assert len(files) == n
        # the same seeded run whichever store: the same accuracy and round count
        for name in ("memory", "disk"):
            summary = out / "clients" / f"loop_{name}_{n}" / "run" / "summary.json"
            assert len(json.loads(summary.read_text())["rounds"]) == 3
    assert rows[(4, "memory")]["growth_mb"] == rows[(4, "disk")]["growth_mb"] == 0
    assert rows[(4, "memory")]["growth_bytes_per_added_client"] is None
    for store in ("memory", "disk"):  # the end-of-run RSS growth by kind (Linux: both read)
        assert rows[(4, store)]["end_anon_growth_bytes_per_added_client"] is None
        for kind in ("anon", "file"):
            grown = rows[(16, store)][f"end_{kind}_growth_bytes_per_added_client"]
            start, end = (rows[(n, store)][f"end_rss_{kind}_mb"] for n in (4, 16))
            assert grown == pytest.approx((end - start) * 2**20 / 12)
    assert rows[(16, "memory")]["growth_bytes_per_added_client"] == pytest.approx(
        rows[(16, "memory")]["growth_mb"] * 2**20 / 12
    )


def test_scan_with_clients_side_by_side_keeps_each_clients_state(tmp_path, monkeypatch):
    """``--client_scan_parallel 3``: the loop trains 3 clients at a time (its config says so,
    the report too) and still keeps one Adam state per client, nothing more."""
    import yaml

    monkeypatch.setattr(clients, "run_worker", clients_worker.measure)
    out = tmp_path / "bench"
    cfg = BenchConfig(arch="tiny", clients=[6], out=str(out), client_scan_parallel=3,
                      results=str(tmp_path / "results"))  # fmt: skip
    report = clients.run_client_scan(cfg)
    from datetime import date

    dated = tmp_path / "results" / f"{date.today().isoformat()}-clients-scan-tiny-k3.md"
    assert dated.read_text() == (out / "clients" / "clients.md").read_text()
    config = yaml.safe_load((out / "clients" / "loop_memory_6" / "config.yaml").read_text())
    assert config["trainer"]["parallel_clients"] == 3
    assert "3 client(s) at a time" in (out / "clients" / "clients.md").read_text()
    memory = next(r for r in report["rows"] if r["store"] == "memory")
    assert memory["state_bytes_per_client"] == ADAM_BYTES_PER_CLIENT
    assert memory["kept_bytes_per_client"]["optimizer_state"] == ADAM_BYTES_PER_CLIENT


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clients": [0, 10]}, "bench --clients"),
        ({"clients": []}, "bench --clients"),
        ({"clients": [10], "flower_clients": [100]}, "bench --flower_clients"),
        ({"clients": [10], "client_rounds": 0}, "bench --client_rounds"),
        ({"clients": [10], "client_scan_parallel": 0}, "bench --client_scan_parallel"),
    ],
)
def test_bad_scan_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


@pytest.mark.slow
def test_scan_with_flower_side_by_side(tmp_path):
    pytest.importorskip("flwr")
    from flora_lightning.bench.run import main

    report = main(["--arch", "tiny", "--clients", "[4]", "--flower_clients", "[4]",
                   "--client_rounds", "1", "--out", str(tmp_path)])  # fmt: skip
    memory = next(r for r in report["rows"] if r["store"] == "memory")
    assert memory["flower_vs_loop"] == pytest.approx(
        memory["flower_seconds_per_client_round"] / memory["seconds_per_client_round"]
    )
    assert memory["flower_wall_seconds"] > 0
