"""Sample-level DP-SGD on the Flower ClientApp: the same Poisson batches and update as flora fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from test_client_app import context, task_identity, train_message  # noqa: E402, F401 (fixture)

from flora_lightning import cli  # noqa: E402
from flora_lightning.flower.app_config import FlowerRunConfig  # noqa: E402
from flora_lightning.flower.client_app import client_components, fit_message  # noqa: E402
from flora_lightning.flower.server_strategy import to_state  # noqa: E402
from flora_lightning.privacy import DPSGDStep  # noqa: E402
from flora_lightning.rundir.checkpoint import load_state  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
OVERRIDES = [
    "--data.partition.num_clients", "2", "--trainer.max_local_steps", "2",
    "--data.max_test_samples", "64",
    "--privacy.level", "sample", "--privacy.noise_multiplier", "1.0",
]  # fmt: skip
RUN = FlowerRunConfig(config=str(QUICKSTART), overrides=" ".join(OVERRIDES))


def test_client_app_fit_equals_flora_fit_with_poisson_batches(
    offline_assets, tmp_path, monkeypatch
):
    seen: dict[int, list[list[int]]] = {0: [], 1: []}
    original = DPSGDStep.__call__
    partition = {"id": 0}

    def spy(self, fabric, module, optimizer, batch, batch_idx):
        seen[partition["id"]].append(batch[1].tolist())
        return original(self, fabric, module, optimizer, batch, batch_idx)

    monkeypatch.setattr(DPSGDStep, "__call__", spy)

    # Round 1 on the Flower ClientApp, both partitions, from the config's initial state.
    replies, start = {}, None
    for client in (0, 1):
        partition["id"] = client
        ctx = context(partition=client)
        parts = client_components(RUN, ctx)
        start = start or parts.model.communicated_state()
        reply = fit_message(train_message(start, 1), ctx, RUN)
        replies[client] = (to_state(reply.content["arrays"]), reply.content["metrics"])

    # The batches are the Poisson draws of each fit's data-order seed, q = batch / n_k.
    loop, data = parts.loop, parts.data
    for client in (0, 1):
        n = data.num_samples(client)
        generator = torch.Generator().manual_seed(loop.local_trainer.seed_for(1, client, 1))
        labels = loop.feature_cache.features[str(client)][1]  # the partition's, in order
        expected = []
        for _ in range(2):  # trainer.max_local_steps
            drawn = (torch.rand(n, generator=generator) < data.batch_size / n).nonzero()
            expected.append(labels[drawn.flatten()].tolist())
        assert seen[client] == expected
        assert [len(b) for b in expected] != [data.batch_size] * 2  # not fixed-size batches

    # flora fit's round 1: FedAvg of the same updates (float64 sum weighted by n_k, as FedAvg).
    run_dir = tmp_path / "in_process"
    cli.run(["fit", "--config", str(QUICKSTART), "--trainer.rounds", "1",
             "--trainer.default_root_dir", str(run_dir), "--trainer.progress", "false",
             *OVERRIDES])  # fmt: skip
    in_process = load_state(run_dir / "checkpoints" / "round_001.safetensors")
    total = sum(int(metrics["num-examples"]) for _, metrics in replies.values())
    assert set(in_process) == set(start)
    for name, tensor in in_process.items():
        mean = sum(
            state[name].double() * int(metrics["num-examples"])
            for state, metrics in replies.values()
        )
        # The same float32 fits; the means differ only in the float64 -> float32 rounding.
        torch.testing.assert_close(tensor, (mean / total).float(), rtol=0, atol=1e-6)
    # Under DP the training loss stays on the node (outside epsilon; privacy.log_client_stats)
    assert all("train-loss" not in metrics for _, metrics in replies.values())
