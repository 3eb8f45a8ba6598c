"""MemoryProfiler: per-client peak memory of the local fit, CPU peak RSS via clear_refs/VmHWM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_run import fit_tiny

from flora_lightning.callbacks import MemoryProfiler
from flora_lightning.callbacks.memory import PeakMemoryMeter, release_free_memory

MB = 1 << 20
BIG = 256 * MB


def allocate(nbytes: int) -> torch.Tensor:
    """A tensor whose pages are all touched (so they count in the RSS)."""
    return torch.ones(nbytes // 4, dtype=torch.float32)


class RecordingFabric:
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log_dict(self, metrics: dict, step: int) -> None:
        self.logged.append((dict(metrics), step))


def test_cpu_meter_peak_grows_by_a_big_allocation():
    release_free_memory()
    meter = PeakMemoryMeter("cpu")
    meter.start()
    quiet = meter.stop()
    meter.start()
    big = allocate(BIG)
    del big
    loud = meter.stop()
    assert loud.measure == "cpu_peak_rss"  # /proc/self/clear_refs is writable on this Linux
    assert quiet.peak_bytes > 0 and quiet.growth_bytes < 32 * MB
    assert loud.growth_bytes >= 0.95 * BIG
    assert loud.peak_bytes >= loud.start_bytes + 0.95 * BIG


def test_profiler_logs_each_client_and_the_round_max():
    fabric = RecordingFabric()
    loop = SimpleNamespace(fabric=fabric, round=1, history=[])
    profiler = MemoryProfiler()
    profiler.on_fit_start(loop, model=None)
    profiler.on_round_start(loop, round=1, clients=[0, 1])
    release_free_memory()
    growth = {}
    for client, nbytes in ((0, 0), (1, BIG)):
        profiler.on_client_fit_start(loop, model=None, client_id=client)
        held = allocate(nbytes) if nbytes else None
        profiler.on_client_fit_end(loop, model=None, update=SimpleNamespace(client_id=client))
        growth[client] = fabric.logged[-1][0][f"memory/client_{client}_growth_bytes"]
        del held
        release_free_memory()

    assert [step for _, step in fabric.logged] == [1, 1]
    assert set(fabric.logged[1][0]) == {
        "memory/client_1_peak_bytes",
        "memory/client_1_growth_bytes",
    }
    assert growth[1] >= growth[0] + 0.9 * BIG
    peaks = {c: fabric.logged[c][0][f"memory/client_{c}_peak_bytes"] for c in (0, 1)}
    record = {"round": 1, **profiler.round_fields(loop, record={"round": 1})}
    assert record["peak_memory_bytes"] == max(peaks.values())
    assert record["peak_memory_growth_bytes"] == max(growth.values())
    assert record["client_peak_memory_bytes"] == {"0": peaks[0], "1": peaks[1]}

    summary = {"rounds": [{"round": 0}, record]}
    summary.update(profiler.summary_fields(loop, summary))
    assert summary["peak_memory_bytes"] == record["peak_memory_bytes"]
    assert summary["memory_measure"] == "cpu_peak_rss"


def test_profiler_in_the_loop_fills_records_and_summary(tmp_path):
    _, summary = fit_tiny(tmp_path, [MemoryProfiler()])
    row = summary["rounds"][1]
    assert set(row["client_peak_memory_bytes"]) == {"0", "1"}
    assert row["peak_memory_bytes"] == max(row["client_peak_memory_bytes"].values()) > 0
    assert summary["peak_memory_bytes"] == row["peak_memory_bytes"]
    assert summary["memory_measure"] == "cpu_peak_rss"
    assert "peak_memory_bytes" not in summary["rounds"][0]  # round 0 only evaluates


@pytest.mark.parametrize(
    "value",
    [
        "[{class_path: MemoryProfiler}]",
        "[{class_path: flora_lightning.callbacks.MemoryProfiler}]",
    ],
)
def test_callbacks_are_configurable_from_the_cli(value):
    from flora_lightning.callbacks import CommunicationLogger
    from flora_lightning.cli import build_parser

    parser = build_parser()
    config = parser.parse_args(["fit", "--trainer.callbacks", value])
    loop = parser.instantiate_classes(config).fit.trainer
    assert [type(c) for c in loop.callbacks] == [MemoryProfiler, CommunicationLogger]
