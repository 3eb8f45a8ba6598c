"""DPFedAvg driven by Flower's FloraFedAvg gives what the in-process strategy gives, per round."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from flora_lightning.flower.strategy import FloraFedAvg, to_state  # noqa: E402
from flora_lightning.privacy import DPFedAvg  # noqa: E402
from flora_lightning.strategy import ClientUpdate  # noqa: E402


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the run/task of the process; a test has to pretend one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """Just what Flower's node sampling asks of a Grid."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def make_dp() -> DPFedAvg:
    return DPFedAvg(
        noise_multiplier=0.8,
        clip_norm=1.0,
        num_sampled_clients=3,
        seed=11,
        adaptive=True,
        clipped_count_stddev=1.0,
    )


def client_states(global_state, round_):
    gen = torch.Generator().manual_seed(round_)
    return [
        {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in global_state.items()}
        for scale in (0.05, 0.5, 2.0)
    ]


def test_flower_rounds_equal_in_process_rounds():
    start = {"a": torch.zeros(3, 4), "b": torch.ones(5)}
    flower = FloraFedAvg(min_available_nodes=3, min_train_nodes=3, average=make_dp())
    local = make_dp()
    flower_state, local_state = dict(start), dict(start)
    for round_ in (1, 2, 3):
        states = client_states(local_state, round_)
        sent = list(
            flower.configure_train(
                round_, ArrayRecord(flower_state), ConfigRecord(), FakeGrid([7, 8, 9])
            )
        )
        replies = [
            Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord(state),
                        "metrics": MetricRecord(
                            {"num-examples": 10 * (i + 1), "partition-id": i, "train-loss": 1.0}
                        ),
                    }
                ),
                reply_to=message,
            )
            for i, (state, message) in enumerate(zip(states, sent, strict=True))
        ]
        arrays, _ = flower.aggregate_train(round_, list(reversed(replies)))  # other arrival order
        flower_state = to_state(arrays)

        local.begin(local_state)
        for i, state in enumerate(states):
            local.add(ClientUpdate(i, state, num_samples=10 * (i + 1), train_loss=1.0))
        local_state = local.result()
        for name in start:
            torch.testing.assert_close(flower_state[name], local_state[name], rtol=0, atol=1e-6)
        assert flower.average.clip_norm == pytest.approx(local.clip_norm, rel=1e-12)
    assert flower.average.state_dict()["rounds_done"] == 3
