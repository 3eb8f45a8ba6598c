"""DPFedAvg driven by Flower's FloraFedAvg, alone or inside Flower's own DP wrappers (server- or
client-side clipping), gives what the in-process strategy gives, per round."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from flora_lightning.flower.server_strategy import FloraFedAvg, to_state  # noqa: E402
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


def make_dp(adaptive: bool = True) -> DPFedAvg:
    return DPFedAvg(
        noise_multiplier=0.8,
        clip_norm=1.0,
        num_sampled_clients=3,
        seed=11,
        adaptive=adaptive,
        clipped_count_stddev=1.0,
    )


def client_states(global_state, round_):
    gen = torch.Generator().manual_seed(round_)
    return [
        {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in global_state.items()}
        for scale in (0.05, 0.5, 2.0)
    ]


def in_process_round(dp: DPFedAvg, state: dict, states: list[dict]) -> dict:
    """What flora fit's loop does with the clients' states (client i trained 10 (i + 1))."""
    dp.begin(state)
    for i, client_state in enumerate(states):
        dp.add(ClientUpdate(i, client_state, num_samples=10 * (i + 1), train_loss=1.0))
    return dp.result()


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

        local_state = in_process_round(local, local_state, states)
        for name in start:
            torch.testing.assert_close(flower_state[name], local_state[name], rtol=0, atol=1e-6)
        assert flower.average.clip_norm == pytest.approx(local.clip_norm, rel=1e-12)
    assert flower.average.state_dict()["rounds_done"] == 3


def reply_to(message: Message, state: dict, client: int) -> Message:
    metrics = {"num-examples": 10 * (client + 1), "partition-id": client, "train-loss": 1.0}
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=message)


def on_node(message: Message, reply: Message, adaptive: bool) -> Message:
    """What a node's ClientApp sends with client-side clipping: Flower's mod around the fit."""
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    mod = adaptiveclipping_mod if adaptive else fixedclipping_mod
    return mod(message, None, lambda msg, context: reply)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("side", ["server", "client"])
def test_flower_dp_wrappers_equal_flora_fit(side, adaptive):
    """Flower's own DP wrappers (and client mods), seeded by round, give flora fit's rounds:
    same clipping, unweighted mean, noise (bit for bit once the mean agrees) and bound; also
    after the ServerApp is restarted (resumed) before round 3."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping as Adapt
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping as Fixed

    from flora_lightning.flower.dp import with_flower_dp

    start = {"a": torch.zeros(3, 4), "b": torch.ones(5)}
    inner = FloraFedAvg(min_available_nodes=3, min_train_nodes=3, average=make_dp(adaptive))
    flower = with_flower_dp(inner, inner.average, side)
    assert isinstance(flower, Adapt if adaptive else Fixed) == (side == "server")
    assert not inner.average.clip_and_noise  # Flower clips and noises
    local = make_dp(adaptive)
    flower_state, local_state = dict(start), dict(start)
    for round_ in (1, 2, 3):
        if round_ == 3:  # a resumed ServerApp: the restored DPFedAvg, Flower's round 1 is 3
            restored = make_dp(adaptive)
            restored.load_state_dict(inner.average.state_dict())
            inner = FloraFedAvg(min_available_nodes=3, min_train_nodes=3, average=restored,
                                round_offset=2)  # fmt: skip
            flower = with_flower_dp(inner, restored, side)
        server_round = round_ - inner.round_offset
        states = client_states(local_state, round_)
        sent = list(flower.configure_train(
            server_round, ArrayRecord(flower_state), ConfigRecord(), FakeGrid([7, 8, 9])
        ))  # fmt: skip
        replies = [reply_to(m, s, i) for i, (s, m) in enumerate(zip(states, sent, strict=True))]
        if side == "client":
            assert sent[0].content["config"]["clipping_norm"] == local.clip_norm
            replies = [on_node(m, r, adaptive) for m, r in zip(sent, replies, strict=True)]
        before = np.random.get_state()[1].copy()
        arrays, _ = flower.aggregate_train(server_round, list(reversed(replies)))
        assert np.array_equal(np.random.get_state()[1], before)  # global generator restored
        flower_state = to_state(arrays)

        local_state = in_process_round(local, local_state, states)
        for name in start:
            torch.testing.assert_close(flower_state[name], local_state[name], rtol=0, atol=1e-6)
        assert local.round_noise_std > 0.05  # the noise is there, and equal
        for key in ("round_clip_norm", "clip_norm", "round_noise_std"):
            assert getattr(inner.average, key) == pytest.approx(getattr(local, key), rel=1e-9)
    assert inner.average.state_dict()["rounds_done"] == 3


def test_error_and_dropped_replies_are_recorded_and_left_out():
    """Flower's wrapper would skip a round with an error reply; flora fit skips the client."""
    from flwr.app import Error

    from flora_lightning.flower.dp import with_flower_dp
    from flora_lightning.flower.nodes import DROPPED_KEY

    start = {"a": torch.zeros(3, 4), "b": torch.ones(5)}
    inner = FloraFedAvg(min_available_nodes=3, min_train_nodes=3, average=make_dp(False))
    flower = with_flower_dp(inner, inner.average, "server")
    sent = list(flower.configure_train(1, ArrayRecord(start), ConfigRecord(), FakeGrid([7, 8, 9])))
    states = client_states(start, 1)
    dropped = Message(
        RecordDict({"config": ConfigRecord({DROPPED_KEY: "dropout p=0.5"}),
                    "metrics": MetricRecord({"partition-id": 2})}), reply_to=sent[2],
    )  # fmt: skip
    failed = Message(Error(code=0, reason="boom"), reply_to=sent[1])
    arrays, _ = flower.aggregate_train(1, [reply_to(sent[0], states[0], 0), failed, dropped])
    assert arrays is not None
    report = inner.reports[1]
    assert report.accepted == [0] and report.dropped == {"2": "dropout p=0.5"}
    assert any("boom" in reason for reason in report.rejected.values())
    local = make_dp(False)
    local.begin(start)
    local.add(ClientUpdate(0, states[0], num_samples=10, train_loss=1.0))
    expected = local.result()  # one update over the fixed denominator m = 3, same noise
    for name, tensor in to_state(arrays).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)


def exact_norm_states(global_state: dict, norms, seed: int) -> list[dict]:
    """Client states whose updates from ``global_state`` have exactly the given L2 norms."""
    gen = torch.Generator().manual_seed(seed)
    states = []
    for norm in norms:
        direction = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
                     for k, v in global_state.items()}  # fmt: skip
        length = sum(float(d.pow(2).sum()) for d in direction.values()) ** 0.5
        states.append({k: (v.double() + norm * direction[k] / length).float()
                       for k, v in global_state.items()})  # fmt: skip
    return states


@pytest.mark.parametrize("start_clip", [0.5, 50.0])
@pytest.mark.parametrize("side", ["server", "client"])
def test_flower_adaptive_clipping_settles_at_the_median(side, start_clip):
    """Through Flower's own wrappers (and node mods): norms 2, 4, 6, 8 every round, sigma = 0,
    eta = 0.2, gamma = 0.5: the share at or below C is 1/2 exactly for C in [4, 6). Flower
    1.42's unpatched sign drives C to 0 from below and to infinity from above."""
    from flora_lightning.flower.dp import with_flower_dp

    dp = DPFedAvg(0.0, start_clip, num_sampled_clients=4, seed=3, adaptive=True)
    inner = FloraFedAvg(min_available_nodes=4, min_train_nodes=4, average=dp)
    flower = with_flower_dp(inner, dp, side)
    state = {"a": torch.zeros(3, 4), "b": torch.ones(5)}
    for round_ in range(1, 81):
        sent = list(flower.configure_train(
            round_, ArrayRecord(state), ConfigRecord(), FakeGrid([7, 8, 9, 10])
        ))  # fmt: skip
        states = exact_norm_states(state, (2.0, 4.0, 6.0, 8.0), seed=round_)
        replies = [reply_to(m, s, i) for i, (s, m) in enumerate(zip(states, sent, strict=True))]
        if side == "client":
            replies = [on_node(m, r, True) for m, r in zip(sent, replies, strict=True)]
        arrays, _ = flower.aggregate_train(round_, replies)
        state = to_state(arrays)
    assert 4.0 <= dp.clip_norm < 6.0
    assert flower.clipping_norm == dp.clip_norm
