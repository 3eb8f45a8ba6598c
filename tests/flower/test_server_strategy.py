"""FloraFedAvg on fabricated Flower replies: exclusion with reasons, min clients, bytes."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from flora_lightning.federation.engine import RoundEngine, RoundFailedError  # noqa: E402
from flora_lightning.flower.server_strategy import FloraFedAvg, array_record_bytes, to_state  # noqa: E402

SKIP = RoundEngine("skip")
"""A bare round engine whose too-few-updates policy is ``skip`` (the default raises)."""


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the run/task of the process; a test has to pretend one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


GLOBAL = {"a": torch.zeros(2, 3), "b": torch.ones(4)}


class FakeGrid:
    """Just what Flower's node sampling asks of a Grid."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


class AnsweringGrid(FakeGrid):
    """Nodes that answer the partition query: ``{node id: partition id or None (error)}``."""

    def __init__(self, partitions: dict[int, int | None]) -> None:
        super().__init__(list(partitions))
        self.partitions = partitions
        self.asked: list[int] = []

    def send_and_receive(self, messages, timeout=None):
        answers = []
        for message in messages:
            assert message.metadata.message_type == MessageType.QUERY
            node = message.metadata.dst_node_id
            self.asked.append(node)
            partition = self.partitions[node]
            if partition is None:
                answer = Message(Error(code=0, reason="boom"), reply_to=message)
            else:
                metrics = MetricRecord({"partition-id": partition})
                answer = Message(RecordDict({"metrics": metrics}), reply_to=message)
            answers.append(answer)
        return answers


def train_round(strategy: FloraFedAvg, nodes: list[int], server_round: int = 1) -> list[Message]:
    return list(
        strategy.configure_train(server_round, ArrayRecord(GLOBAL), ConfigRecord(), FakeGrid(nodes))
    )


def reply(to: Message, state: dict, num_examples: int, partition: int, loss: float = 1.0):
    metrics = MetricRecord(
        {"num-examples": num_examples, "partition-id": partition, "train-loss": loss}
    )
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=to)


def client_state(value: float) -> dict:
    return {"a": torch.full((2, 3), float(value)), "b": torch.full((4,), float(value))}


def test_sample_weighted_average_and_bytes():
    strategy = FloraFedAvg(min_clients=2, min_available_nodes=3, min_train_nodes=3)
    sent = train_round(strategy, [11, 12, 13])
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 12, 13]
    assert sent[0].content["config"]["server-round"] == 1
    replies = [
        reply(sent[i], client_state(v), n, i)
        for i, (v, n) in enumerate([(1, 10), (2, 30), (4, 60)])
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    result = to_state(arrays)
    expected = (1 * 10 + 2 * 30 + 4 * 60) / 100
    torch.testing.assert_close(result["a"], torch.full((2, 3), expected), rtol=0, atol=1e-7)
    assert result["a"].dtype == torch.float32 and set(result) == set(GLOBAL)
    report = strategy.reports[1]
    per_client = (6 + 4) * 4  # float32 numbers in a and b
    assert array_record_bytes(ArrayRecord(GLOBAL)) == per_client
    assert report.bytes_down == 3 * per_client
    assert report.bytes_up == 3 * per_client
    assert report.client_bytes_up == {0: per_client, 1: per_client, 2: per_client}
    assert report.accepted == [0, 1, 2] and report.rejected == {}
    assert metrics["num-accepted"] == 3


def test_failed_and_non_finite_clients_are_excluded_with_reasons(caplog):
    strategy = FloraFedAvg(min_clients=2, min_available_nodes=4, min_train_nodes=4, engine=SKIP)
    sent = sorted(train_round(strategy, [1, 2, 3, 4]), key=lambda m: m.metadata.dst_node_id)
    nan_state = client_state(1.0)
    nan_state["a"][0, 0] = float("nan")
    inf_state = client_state(1.0)
    inf_state["b"][1] = float("inf")
    replies = [
        reply(sent[0], client_state(1.0), 10, 0),
        Message(Error(code=0, reason="RuntimeError: CUDA out of memory"), reply_to=sent[1]),
        reply(sent[2], nan_state, 10, 2),
        reply(sent[3], inf_state, 10, 3),
    ]
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None  # 1 accepted < min_clients=2: the round does not change the state
    report = strategy.reports[1]
    assert report.accepted == [0] and not report.aggregated
    assert "CUDA out of memory" in report.rejected["node 2"]
    assert report.rejected["2"] == "tensor a holds NaN or Inf"
    assert report.rejected["3"] == "tensor b holds NaN or Inf"
    assert "node 2 excluded from aggregation: its ClientApp failed" in caplog.text
    assert "client 2 excluded from aggregation: tensor a holds NaN or Inf" in caplog.text
    assert "round 1 not aggregated" in caplog.text
    assert report.bytes_up == 3 * 40  # the failed node sent nothing


def test_round_completes_when_enough_clients_remain():
    strategy = FloraFedAvg(min_clients=2, min_available_nodes=3, min_train_nodes=3)
    sent = sorted(train_round(strategy, [1, 2, 3]), key=lambda m: m.metadata.dst_node_id)
    bad = client_state(5.0)
    bad["b"][0] = float("nan")
    replies = [
        reply(sent[0], client_state(1.0), 10, 0),
        reply(sent[1], client_state(3.0), 30, 1),
        reply(sent[2], bad, 1000, 2),  # would dominate if it were averaged
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    result = to_state(arrays)
    torch.testing.assert_close(result["b"], torch.full((4,), 2.5), rtol=0, atol=1e-7)
    assert np.isfinite(result["a"].numpy()).all()
    assert strategy.reports[1].rejected == {"2": "tensor b holds NaN or Inf"}


def test_global_state_never_modified():
    strategy = FloraFedAvg(min_clients=1, min_available_nodes=2, min_train_nodes=2)
    global_arrays = ArrayRecord(GLOBAL)
    before = {k: v.clone() for k, v in to_state(global_arrays).items()}
    sent = list(strategy.configure_train(1, global_arrays, ConfigRecord(), FakeGrid([1, 2])))
    wrong_shape = {"a": torch.ones(3, 2), "b": torch.ones(4)}
    arrays, _ = strategy.aggregate_train(
        1, [reply(sent[0], client_state(7.0), 5, 0), reply(sent[1], wrong_shape, 5, 1)]
    )
    torch.testing.assert_close(to_state(arrays)["a"], torch.full((2, 3), 7.0))
    for name, tensor in to_state(global_arrays).items():
        assert torch.equal(tensor, before[name])
    assert strategy.reports[1].rejected == {"1": "tensor a has shape (3, 2), not (2, 3)"}


def test_reply_without_num_examples_is_excluded():
    strategy = FloraFedAvg(min_clients=1, min_available_nodes=1, min_train_nodes=1, engine=SKIP)
    sent = train_round(strategy, [9])
    content = RecordDict(
        {"arrays": ArrayRecord(client_state(1.0)), "metrics": MetricRecord({"x": 1})}
    )
    arrays, _ = strategy.aggregate_train(1, [Message(content, reply_to=sent[0])])
    assert arrays is None
    assert strategy.reports[1].rejected == {"node 9": "its reply has no 'num-examples'"}
    assert MessageType.TRAIN == sent[0].metadata.message_type


def test_selected_partitions_train_and_partitions_are_asked_once(caplog):
    picks = {1: [0, 3], 2: [1, 2], 3: [2, 3]}
    strategy = FloraFedAvg(min_available_nodes=5, select_clients=picks.__getitem__)
    grid = AnsweringGrid({11: 2, 12: 0, 13: 3, 14: 1, 15: None})
    for server_round, wanted in picks.items():
        sent = strategy.configure_train(server_round, ArrayRecord(GLOBAL), ConfigRecord(), grid)
        nodes = [m.metadata.dst_node_id for m in sent]
        assert sorted(strategy.partitions[n] for n in nodes) == wanted
        assert all(m.metadata.message_type == MessageType.TRAIN for m in sent)
        assert all(m.content["config"]["server-round"] == server_round for m in sent)
        assert strategy.reports[server_round].bytes_down == len(wanted) * (6 + 4) * 4
    # Each node is asked once; the one whose answer failed is asked again, never sampled.
    assert sorted(grid.asked) == [11, 12, 13, 14, 15, 15, 15]
    assert 15 not in strategy.partitions
    assert "node 15 did not tell its partition (boom)" in caplog.text


def test_a_partition_held_by_two_nodes_trains_once(caplog):
    strategy = FloraFedAvg(min_available_nodes=3, select_clients=lambda round_: [0, 1])
    grid = AnsweringGrid({21: 0, 22: 1, 23: 0})
    sent = strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in sent) == [21, 22]
    assert "nodes 21 and 23 both hold partition 0" in caplog.text


def test_the_configured_flora_strategy_aggregates():
    """``average``: the YAML's trainer.strategy (here LoraProductAverage) runs inside Flower."""
    from flora_lightning.strategy import ClientUpdate, LoraProductAverage

    def lora_state(seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        return {
            "l.lora_A.w": torch.randn(2, 6, generator=gen),
            "l.lora_B.w": torch.randn(5, 2, generator=gen),
        }

    global_state = lora_state(0)
    strategy = FloraFedAvg(min_clients=2, min_available_nodes=2, average=LoraProductAverage())
    assert strategy.average.min_clients == 2
    sent = list(
        strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), FakeGrid([1, 2]))
    )
    states = [lora_state(1), lora_state(2)]
    replies = [reply(sent[i], states[i], n, i) for i, n in enumerate([10, 30])]
    arrays, _ = strategy.aggregate_train(1, replies)

    direct = LoraProductAverage()
    direct.begin(global_state)
    for i, n in enumerate([10, 30]):
        direct.add(ClientUpdate(client_id=i, state=states[i], num_samples=n, train_loss=1.0))
    expected = direct.result()
    result = to_state(arrays)
    for name, tensor in expected.items():
        torch.testing.assert_close(result[name], tensor, rtol=0, atol=0)


def test_a_strategy_not_derived_from_fedavg_aggregates_with_rejections():
    from flora_lightning.strategy import Strategy

    class FirstAccepted(Strategy):
        def start_round(self, global_state):
            self.first = None

        def accumulate(self, update):
            self.first = self.first or update.state

        def aggregate(self):
            return dict(self.first)

    strategy = FloraFedAvg(min_clients=1, min_available_nodes=2, average=FirstAccepted())
    sent = train_round(strategy, [1, 2])
    replies = [
        reply(sent[0], client_state(float("nan")), 10, 0),
        reply(sent[1], client_state(3.0), 10, 1),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    torch.testing.assert_close(to_state(arrays)["a"], client_state(3.0)["a"])
    assert strategy.reports[1].accepted == [1]
    assert strategy.reports[1].rejected == {"0": "tensor a holds NaN or Inf"}
    assert metrics["num-accepted"] == 1 and metrics["num-rejected"] == 1


def test_round_start_is_announced_when_the_round_is_configured():
    started = []

    class Engine(RoundEngine):  # the loop's round engine, as the ServerApp passes it
        def begin_round(self, round_, clients):
            started.append(round_)
            return super().begin_round(round_, clients)

    strategy = FloraFedAvg(min_available_nodes=2, engine=Engine())
    train_round(strategy, [1, 2], server_round=3)
    assert started == [3]
    assert strategy.reports[3].started <= time.perf_counter()


class ChangingGrid(AnsweringGrid):
    """Nodes come and go: ``timeline[i]`` is the node list of the i-th look (the last one
    stays); ``partitions`` answers the queries of every node that ever appears."""

    def __init__(self, partitions: dict[int, int], timeline: list[list[int]]) -> None:
        super().__init__(partitions)
        self.timeline = timeline
        self.looks = 0

    def get_node_ids(self) -> list[int]:
        nodes = self.timeline[min(self.looks, len(self.timeline) - 1)]
        self.looks += 1
        return list(nodes)


def configure(strategy: FloraFedAvg, grid, server_round: int = 1) -> list[Message]:
    return list(strategy.configure_train(server_round, ArrayRecord(GLOBAL), ConfigRecord(), grid))


def test_a_missing_node_does_not_stall_the_round_and_is_recorded():
    strategy = FloraFedAvg(min_clients=1, select_clients=lambda r: [0, 1], node_wait_seconds=0)
    grid = ChangingGrid({11: 0, 12: 1}, [[11]])  # node 12 (partition 1) is gone
    sent = configure(strategy, grid)
    assert [m.metadata.dst_node_id for m in sent] == [11]
    report = strategy.reports[1]
    assert report.clients == [0]
    assert report.rejected["1"].startswith("node not connected: no connected SuperNode held "
                                           "partition 1 within node-wait-seconds=0")  # fmt: skip
    arrays, metrics = strategy.aggregate_train(1, [reply(sent[0], client_state(2.0), 10, 0)])
    torch.testing.assert_close(to_state(arrays)["a"], client_state(2.0)["a"])
    assert report.aggregated and report.accepted == [0]
    assert set(report.rejected) == {"1"} and metrics["num-rejected"] == 1
    assert report.bytes_down == 1 * (6 + 4) * 4  # one message sent


def test_a_round_waits_for_a_node_that_connects():
    strategy = FloraFedAvg(select_clients=lambda r: [0, 1], node_wait_seconds=3600)
    strategy.roster.poll_seconds = 0  # no sleeping in a unit test; the wait ends on arrival
    grid = ChangingGrid({11: 0, 12: 1}, [[11], [11], [11, 12]])
    sent = configure(strategy, grid)
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 12]
    assert strategy.reports[1].rejected == {} and grid.looks == 3


def test_too_few_nodes_alive_leaves_the_round_unaggregated(caplog):
    strategy = FloraFedAvg(
        min_clients=2, select_clients=lambda r: [0, 1], node_wait_seconds=0, engine=SKIP
    )
    sent = configure(strategy, ChangingGrid({11: 0, 12: 1}, [[11]]))
    with caplog.at_level(logging.ERROR):
        arrays, _ = strategy.aggregate_train(1, [reply(sent[0], client_state(2.0), 10, 0)])
    assert arrays is None  # Flower keeps the previous global arrays
    report = strategy.reports[1]
    assert not report.aggregated and report.accepted == [0]
    assert report.rejected["1"].startswith("node not connected")
    assert "round 1 not aggregated" in caplog.text


def test_a_restarted_node_rejoins_and_a_dead_nodes_error_names_its_partition():
    strategy = FloraFedAvg(select_clients=lambda r: [0, 1], node_wait_seconds=0)
    # Round 1: both nodes; node 12 dies while training (Flower answers with an error).
    grid = ChangingGrid({11: 0, 12: 1, 13: 1}, [[11, 12]])
    sent = sorted(configure(strategy, grid), key=lambda m: m.metadata.dst_node_id)
    for i, message in enumerate(sent):  # what a Grid does when it pushes them
        message.metadata.__dict__["_message_id"] = f"id{i}"
    # The SuperLink answers for a node that stopped sending heartbeats: the error comes from
    # the SuperLink (node id 1), replying to the message sent to node 12.
    dead = Message(Error(code=0, reason="node went offline (heartbeat)"), reply_to=sent[1])
    dead.metadata.__dict__["_src_node_id"] = 1  # Metadata has no setter for it
    assert dead.metadata.reply_to_message_id == "id1"
    strategy.aggregate_train(1, [reply(sent[0], client_state(1.0), 10, 0), dead])
    assert strategy.reports[1].rejected == {
        "1": "its ClientApp failed (node 12): node went offline (heartbeat)"
    }
    # Round 2: node 12 is gone. Round 3: partition 1 is back as node 13 (a new id).
    grid.timeline, grid.looks = [[11]], 0
    assert [m.metadata.dst_node_id for m in configure(strategy, grid, 2)] == [11]
    assert strategy.reports[2].rejected["1"].startswith("node not connected")
    grid.timeline, grid.looks = [[11, 13]], 0
    sent = configure(strategy, grid, 3)
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 13]
    assert strategy.reports[3].clients == [0, 1] and strategy.reports[3].rejected == {}
    assert strategy.partitions == {11: 0, 12: 1, 13: 1}


def test_round_offset_numbers_rounds_as_the_run_does():
    """A resumed run: Flower counts from 1 again, the run (seeds, sampler, records) does not."""
    asked = []

    def select(round_):
        asked.append(round_)
        return [0]

    strategy = FloraFedAvg(select_clients=select, round_offset=3)
    sent = configure(strategy, ChangingGrid({11: 0}, [[11]]), server_round=1)
    assert asked == [4] and sent[0].content["config"]["server-round"] == 4
    assert set(strategy.reports) == {4}
    strategy.aggregate_train(1, [reply(sent[0], client_state(1.0), 10, 0)])
    assert strategy.reports[4].accepted == [0] and set(strategy.reports) == {4}


def test_node_wait_seconds_must_not_be_negative():
    with pytest.raises(ValueError, match="node-wait-seconds must be >= 0"):
        FloraFedAvg(node_wait_seconds=-1)


def test_too_few_updates_raise_by_default_and_skip_on_request(caplog):
    """``trainer.on_too_few_updates``: the engine's policy, raise as ``flora fit`` by default
    (Flower servers used to log and go on)."""
    for engine in (None, RoundEngine("raise")):
        strategy = FloraFedAvg(min_clients=2, min_available_nodes=2, engine=engine)
        sent = sorted(train_round(strategy, [1, 2]), key=lambda m: m.metadata.dst_node_id)
        nan_state = client_state(1.0)
        nan_state["b"][0] = float("nan")
        replies = [reply(sent[0], client_state(1.0), 10, 0), reply(sent[1], nan_state, 10, 1)]
        with pytest.raises(RoundFailedError) as info:
            strategy.aggregate_train(1, replies)
        message = str(info.value)
        assert message.startswith("round 1: 1 client update(s) accepted, fewer than ")
        assert "trainer.strategy.min_clients=2" in message
        assert "--trainer.on_too_few_updates skip" in message
        report = strategy.reports[1]
        assert report.accepted == [0] and not report.aggregated
        assert report.rejected == {"1": "tensor b holds NaN or Inf"}

    strategy = FloraFedAvg(min_clients=2, min_available_nodes=2, engine=RoundEngine("skip"))
    sent = sorted(train_round(strategy, [1, 2]), key=lambda m: m.metadata.dst_node_id)
    with caplog.at_level(logging.ERROR):
        arrays, metrics = strategy.aggregate_train(1, replies[:1])
    assert arrays is None and metrics["num-accepted"] == 1
    assert not strategy.reports[1].aggregated and "round 1 not aggregated" in caplog.text


def test_a_bad_too_few_updates_policy_names_the_field():
    with pytest.raises(ValueError, match="trainer.on_too_few_updates must be raise or skip"):
        RoundEngine("ignore")
