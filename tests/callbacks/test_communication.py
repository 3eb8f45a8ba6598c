"""CommunicationLogger: per-round, per-client and cumulative bytes, logged once (it is default)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_run import fit_tiny

from flora_lightning.callbacks import CommunicationLogger
from flora_lightning.federation.loop import FederatedLoop

# Tiny CLIP text tower: 2 layers, out_proj 64x64, LoRA r=2: 2 * (64*2 + 2*64) fp32 values.
LORA_BYTES = 2 * (64 * 2 + 2 * 64) * 4


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("comm")
    loop, summary = fit_tiny(tmp_path, callbacks=None, rounds=2, clients=2)
    return loop, summary, tensorboard_scalars(tmp_path / "run")


def test_the_loop_adds_exactly_one_logger():
    assert [type(c) for c in FederatedLoop(callbacks=None).callbacks] == [CommunicationLogger]
    mine = CommunicationLogger()
    assert FederatedLoop(callbacks=[mine]).callbacks == [mine]


def test_cumulative_bytes_are_the_sum_of_the_rounds(two_rounds):
    _, summary, _ = two_rounds
    rows = summary["rounds"]
    for direction in ("up", "down"):
        per_round = [r[f"bytes_{direction}"] for r in rows]
        totals = [r[f"bytes_{direction}_total"] for r in rows]
        assert totals == list(np.cumsum(per_round))
        assert [r[f"mb_{direction}_total"] for r in rows] == [t / 1e6 for t in totals]
        assert summary[f"bytes_{direction}_total"] == totals[-1] == 2 * 2 * LORA_BYTES
    assert summary["mb_up_total"] == 4 * LORA_BYTES / 1e6


def test_per_client_bytes_add_up_to_the_round(two_rounds):
    _, summary, _ = two_rounds
    assert summary["rounds"][0]["client_bytes_up"] == {}  # round 0 only evaluates
    for row in summary["rounds"][1:]:
        assert row["client_bytes_up"] == {"0": LORA_BYTES, "1": LORA_BYTES}
        assert sum(row["client_bytes_up"].values()) == row["bytes_up"]
        assert row["bytes_down"] == 2 * LORA_BYTES


def test_tensorboard_gets_each_comm_scalar_once_per_round(two_rounds):
    _, summary, scalars = two_rounds
    rows = summary["rounds"]
    for key in ("bytes_up", "bytes_down", "bytes_up_total", "bytes_down_total", "mb_up_total"):
        assert scalars[f"comm/{key}"] == [(r["round"], pytest.approx(r[key])) for r in rows]
    assert scalars["comm/client_1_bytes_up"] == [(1, LORA_BYTES), (2, LORA_BYTES)]
