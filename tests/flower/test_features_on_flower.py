"""Issue-12/13 features on the Flower runtime equal ``flora fit`` with the same seed.

Simulated unreliable clients (dropouts, stragglers: the ClientApp draws the same seeded
events), per-client LoRA ranks (each node trains and sends its own rank's slice), client-level
DP (Flower's own DP wrappers, server- or client-side clipping, noise seeded by round), the
accountant and personalised evaluation run through ``flwr run`` on a simulation SuperLink.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_deployment import QUICKSTART, federation, flower_env, flwr_run  # noqa: F401 (fixture)

from flora_lightning import cli

pytestmark = pytest.mark.slow

ROUNDS = 2
BASE = "--data.partition.num_clients 3 --trainer.max_local_steps 2 --data.max_test_samples 64"


def fit_in_process(run_dir: Path, overrides: str) -> dict:
    return cli.run(["fit", "--config", str(QUICKSTART), "--trainer.rounds", str(ROUNDS),
                    "--trainer.default_root_dir", str(run_dir), "--trainer.progress", "false",
                    *shlex.split(overrides)])  # fmt: skip


def assert_same(
    flower_dir: Path, reference: Path, keys: tuple[str, ...], atol: float = 1e-6
) -> dict:
    adapter = load_file(flower_dir / "final" / "adapter_model.safetensors")
    expected = load_file(reference / "final" / "adapter_model.safetensors")
    assert set(adapter) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(adapter[name], tensor, rtol=0, atol=atol)
    summary = json.loads((flower_dir / "summary.json").read_text())
    ref = json.loads((reference / "summary.json").read_text())
    for record, ref_record in zip(summary["rounds"], ref["rounds"], strict=True):
        for key in keys:
            assert record[key] == pytest.approx(ref_record[key], abs=1e-6), key
    return summary


def run_on_flower(tmp_path: Path, env: dict, overrides: str, more: str = "") -> Path:
    out_dir = tmp_path / "flower_run"
    with federation(tmp_path, env, num_nodes=3, simulation=True):
        result = flwr_run(tmp_path, env, out_dir, overrides, rounds=ROUNDS, more=more)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs}"
    (out_dir / "flower_output.log").write_text(result.stdout + result.stderr + logs)
    return out_dir


def test_unreliable_clients_dp_and_personalised_evaluation(tmp_path, flower_env):  # noqa: F811
    overrides = (
        f"{BASE} --trainer.availability '{{dropout: 0.3, straggler: 0.5}}'"
        " --privacy.level client --privacy.noise_multiplier 0.5 --privacy.clip_norm 1.0"
        " --data.local_test_fraction 0.2"
        " --trainer.callbacks '[{class_path: flora_lightning.callbacks.PersonalizedEvaluation}]'"
    )
    reference = tmp_path / "in_process"
    fit_in_process(reference, overrides)
    flower_dir = run_on_flower(tmp_path, flower_env, overrides)
    summary = assert_same(
        flower_dir,
        reference,
        ("test_acc", "accepted_clients", "dropped_clients", "straggler_clients",
         "privacy_epsilon", "local_acc_mean"),
    )  # fmt: skip
    assert summary["privacy"]["level"] == "client"
    log = (flower_dir / "flower_output.log").read_text()  # Flower's own server-side wrapper
    assert "Starting ServerSideFixedClipping strategy" in log, log[-3000:]
    assert "parameters are clipped by value" in log
    events = [r["dropped_clients"] or r["straggler_clients"] for r in summary["rounds"][1:]]
    assert any(events)  # the seed exercises the availability path


def test_client_side_adaptive_clipping_with_flowers_mods(tmp_path, flower_env):  # noqa: F811
    """dp-clipping = "client": Flower's client-side adaptive wrapper, adaptiveclipping_mod on
    every node; the same rounds, clip bounds, noise and epsilon as flora fit."""
    overrides = (
        f"{BASE} --privacy.level client --privacy.noise_multiplier 0.5 --privacy.clip_norm 0.05"
        " --privacy.adaptive_clipping true --privacy.clipped_count_stddev 1.0"
    )
    reference = tmp_path / "in_process"
    fit_in_process(reference, overrides)
    flower_dir = run_on_flower(tmp_path, flower_env, overrides, more='dp-clipping="client"')
    summary = assert_same(
        flower_dir,
        reference,
        ("test_acc", "accepted_clients", "privacy_epsilon", "privacy_clip_norm"),
    )
    clips = [r["privacy_clip_norm"] for r in summary["rounds"][1:]]
    assert clips[0] == 0.05 and clips[1] != 0.05  # adapted after round 1
    log = (flower_dir / "flower_output.log").read_text()
    assert "Starting ClientSideAdaptiveClipping strategy" in log, log[-3000:]  # Flower's wrapper
    assert "adaptiveclipping_mod: ndarrays are clipped by value" in log  # Flower's mod, on nodes


def test_heterogeneous_ranks(tmp_path, flower_env):  # noqa: F811
    overrides = f"{BASE} --trainer.client_ranks '[2, 1, 1]' --trainer.strategy ZeroPaddingAverage"
    reference = tmp_path / "in_process"
    fit_in_process(reference, overrides)
    summary = assert_same(
        run_on_flower(tmp_path, flower_env, overrides),
        reference,
        ("test_acc", "accepted_clients", "bytes_up", "bytes_down", "client_bytes_up"),
    )
    sent = summary["rounds"][1]["client_bytes_up"]
    assert sent["0"] == 2 * sent["1"] == 2 * sent["2"]  # rank 2 sends twice rank 1's bytes


def test_flora_fit_k_at_a_time_equals_flower(tmp_path, flower_env, monkeypatch):  # noqa: F811
    """``flora fit`` with trainer.parallel_clients 3 trains the round's 3 clients in one batched
    fit; the Flower nodes train one partition per call: the final adapters agree within the batched fit's 1e-5 bound
    (tests/federation/test_parallel.py: fp32 rounding of the same math, a different op
    order), the round records exactly."""
    from flora_lightning.federation.parallel import ParallelFit

    groups, fit = [], ParallelFit.fit

    def spy(self, model, data, clients, *args, **kwargs):
        groups.append(list(clients))
        return fit(self, model, data, clients, *args, **kwargs)

    monkeypatch.setattr(ParallelFit, "fit", spy)
    overrides = f"{BASE} --trainer.parallel_clients 3"
    reference = tmp_path / "in_process"
    fit_in_process(reference, overrides)
    assert groups and max(len(g) for g in groups) == 3  # flora fit did batch them
    flower_dir = run_on_flower(tmp_path, flower_env, overrides)
    assert_same(flower_dir, reference, ("accepted_clients", "bytes_up"), atol=1e-5)
