"""The ServerApp survives any train reply: each is read inside its own guard and refused with a
bounded reason; identity comes from the node a message was sent to; Flower's DP wrapper sees
only valid replies; sample counts are bounded."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)

from flora_lightning.federation.engine import RoundEngine  # noqa: E402
from flora_lightning.flower.reply_checks import MAX_REASON_CHARS  # noqa: E402
from flora_lightning.flower.server_strategy import FloraFedAvg, to_state  # noqa: E402

GLOBAL = {"a": torch.zeros(2, 3), "b": torch.ones(4)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the run/task of the process; a test has to pretend one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class AnsweringGrid:
    """Nodes that answer the partition query: ``{node id: partition id}``."""

    def __init__(self, partitions: dict[int, object]) -> None:
        self.partitions = partitions
        self.nodes = list(partitions)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        answers = []
        for message in messages:
            metrics = MetricRecord({"partition-id": 0})
            raw(metrics, "partition-id", self.partitions[message.metadata.dst_node_id])
            answers.append(Message(RecordDict({"metrics": metrics}), reply_to=message))
        return answers


def raw(record, key: str, value) -> None:
    """Store ``value`` as it would arrive from a hostile peer (bypassing Flower's type check)."""
    record._data[key] = value


def client_state(value: float) -> dict:
    return {"a": torch.full((2, 3), float(value)), "b": torch.full((4,), float(value))}


def reply(to: Message, arrays=None, metrics: dict | None = None, config: dict | None = None):
    """A reply to ``to``; ``metrics`` values are stored raw (any type)."""
    content = {}
    if arrays is not None:
        content["arrays"] = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    if metrics is not None:
        record = MetricRecord({})
        for key, value in metrics.items():
            raw(record, key, value)
        content["metrics"] = record
    if config is not None:
        record = ConfigRecord({})
        for key, value in config.items():
            raw(record, key, value)
        content["config"] = record
    return Message(RecordDict(content), reply_to=to)


def good(partition: int, n: int = 10) -> dict:
    return {"num-examples": n, "partition-id": partition, "train-loss": 1.0, "train-seconds": 0.5}


def selected_round(strategy: FloraFedAvg, grid: AnsweringGrid, server_round: int = 1) -> dict:
    """Configure a round; node id -> its train message."""
    sent = strategy.configure_train(server_round, ArrayRecord(GLOBAL), ConfigRecord(), grid)
    return {m.metadata.dst_node_id: m for m in sent}


def array_with(dtype: str, shape: tuple, data: bytes | None = None) -> Array:
    """An Array whose metadata says ``dtype`` and ``shape`` (``data`` defaults to a real
    array of that dtype and shape where NumPy can make one)."""
    if data is None:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(shape, dtype=dtype), allow_pickle=False)
        data = buffer.getvalue()
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def malformed(sent: Message, partition: int) -> dict[str, Message]:
    """Every kind of reply the issue lists (and a few more) that must be refused."""
    ok = client_state(1.0)
    cases = {
        "straggler without partition-id": reply(
            sent, ok, {"num-examples": 10, "straggler-steps": 3, "train-loss": 1.0}
        ),
    }
    for key in ("num-examples", "partition-id", "train-seconds", "train-loss", "straggler-steps"):
        for label, value in (
            ("NaN", float("nan")),
            ("Inf", float("inf")),
            ("-Inf", float("-inf")),
            ("bool", True),
            ("list", [1, 2]),
            ("string", "x" * 5000),
            ("dict", {"a": 1}),
            ("None", None),
        ):
            metrics = good(partition)
            metrics[key] = value
            cases[f"{key} as {label}"] = reply(sent, ok, metrics)
    for label, n in (("zero", 0), ("negative", -5), ("fraction", 2.5), ("huge", 10**30)):
        metrics = good(partition)
        metrics["num-examples"] = n
        cases[f"num-examples {label}"] = reply(sent, ok, metrics)
    for dtype in (">f4", "<U2", "object", "float64", "int64", "bool"):
        arrays = ArrayRecord({"a": array_with(dtype, (2, 3), b"x" if dtype == "object" else None),
                              "b": Array(np.ones(4, dtype=np.float32))})  # fmt: skip
        cases[f"array dtype {dtype}"] = reply(sent, arrays, good(partition))
    lying = ArrayRecord({"a": array_with("float32", (2, 3), data=b"garbage" * 20),
                         "b": Array(np.ones(4, dtype=np.float32))})  # fmt: skip
    cases["array bytes that do not decode"] = reply(sent, lying, good(partition))
    shorter = ArrayRecord({"a": array_with("float32", (2, 3), _npy(np.ones(5, np.float32))),
                           "b": Array(np.ones(4, dtype=np.float32))})  # fmt: skip
    cases["array bytes that disagree with the metadata"] = reply(sent, shorter, good(partition))
    cases["fewer arrays"] = reply(sent, {"a": torch.ones(2, 3)}, good(partition))
    cases["more arrays"] = reply(sent, {**ok, "c": torch.ones(1)}, good(partition))
    cases["shape (1,)"] = reply(sent, {"a": torch.ones(1), "b": torch.ones(4)}, good(partition))
    cases["transposed"] = reply(sent, {"a": torch.ones(3, 2), "b": torch.ones(4)}, good(partition))
    cases["no arrays"] = reply(sent, None, good(partition))
    cases["no metrics"] = reply(sent, ok, None)
    cases["dropped without metrics"] = reply(sent, None, None, {"dropped": 7})
    cases["another partition claimed"] = reply(sent, ok, good(partition + 1))
    return cases


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_every_malformed_reply_is_refused_with_a_bounded_reason():
    """On the old code these raised (ValueError, TypeError, KeyError, OverflowError) out of
    aggregate_train, which ended the ServerApp."""
    grid = AnsweringGrid({11: 0, 12: 1})
    strategy = FloraFedAvg(select_clients=lambda r: [0, 1], node_wait_seconds=0,
                           engine=RoundEngine("skip"))  # fmt: skip
    sent = selected_round(strategy, grid)
    for name, bad in malformed(sent[12], 1).items():
        strategy.reports.clear()
        strategy.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord(), grid)
        arrays, _ = strategy.aggregate_train(1, [reply(sent[11], client_state(2.0), good(0)), bad])
        report = strategy.reports[1]
        if name == "straggler without partition-id":  # the partition is the one node 12 holds
            assert report.accepted == [0, 1] and report.stragglers == {"1": 3}, name
            continue
        if name == "dropped without metrics":  # its node's partition is known: a dropout...
            assert "1" in report.rejected, name  # ...whose reason is not text: refused
            continue
        assert report.accepted == [0], name
        assert "1" in report.rejected, (name, report.rejected)
        assert 0 < len(report.rejected["1"]) <= MAX_REASON_CHARS, name
        torch.testing.assert_close(to_state(arrays)["a"], torch.full((2, 3), 2.0))


def test_identity_is_the_node_sent_to_and_a_second_reply_is_refused():
    grid = AnsweringGrid({11: 0, 12: 1})
    strategy = FloraFedAvg(select_clients=lambda r: [0, 1], node_wait_seconds=0)
    sent = selected_round(strategy, grid)
    # node 12 (partition 1) replies for itself, then again; no partition-id at all is fine
    replies = [
        reply(sent[11], client_state(1.0), {"num-examples": 10}),
        reply(sent[12], client_state(3.0), {"num-examples": 10}),
        reply(sent[12], client_state(100.0), {"num-examples": 10}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.reports[1].accepted == [0, 1]
    assert "already replied" in strategy.reports[1].rejected["1"]
    torch.testing.assert_close(to_state(arrays)["a"], torch.full((2, 3), 2.0))


def test_a_later_node_claiming_a_held_partition_does_not_push_the_first_out(caplog):
    """The old roster let the lowest node id win: node 5, connecting in round 2 and claiming
    partition 0, replaced node 30, which had held it since round 1."""
    grid = AnsweringGrid({30: 0, 31: 1})
    strategy = FloraFedAvg(select_clients=lambda r: [0, 1], node_wait_seconds=0)
    assert set(selected_round(strategy, grid)) == {30, 31}
    grid.partitions[5] = 0
    grid.nodes = [5, 30, 31]
    assert set(selected_round(strategy, grid, 2)) == {30, 31}
    assert "node 30 claimed it first" in caplog.text


def test_a_bad_query_answer_is_not_sampled():
    grid = AnsweringGrid({11: 0, 12: float("nan"), 13: [1, 2], 14: 1})
    strategy = FloraFedAvg(select_clients=lambda r: [0, 1], node_wait_seconds=0)
    assert sorted(selected_round(strategy, grid)) == [11, 14]


def test_sample_counts_are_bounded_and_checked_against_known_partitions():
    from flora_lightning.strategy import FedAvg

    grid = AnsweringGrid({11: 0, 12: 1})
    strategy = FloraFedAvg(select_clients=lambda r: [0, 1], node_wait_seconds=0,
                           average=FedAvg(max_num_samples=1000), engine=RoundEngine("skip"))  # fmt: skip
    sent = selected_round(strategy, grid)
    arrays, _ = strategy.aggregate_train(1, [
        reply(sent[11], client_state(1.0), good(0, 10)),
        reply(sent[12], client_state(9.0), good(1, 10**18)),
    ])  # fmt: skip
    assert "above the bound 1000" in strategy.reports[1].rejected["1"]
    torch.testing.assert_close(to_state(arrays)["a"], torch.full((2, 3), 1.0))

    strategy = FloraFedAvg(select_clients=lambda r: [0, 1], node_wait_seconds=0,
                           engine=RoundEngine("skip"), known_num_samples=lambda c: 10)  # fmt: skip
    sent = selected_round(strategy, grid)
    strategy.aggregate_train(1, [
        reply(sent[11], client_state(1.0), good(0, 10)),
        reply(sent[12], client_state(9.0), good(1, 11)),
    ])  # fmt: skip
    assert strategy.reports[1].rejected == {"1": "it reports 11 samples; partition 1 holds 10"}


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize(
    "bad",
    [
        {"a": torch.ones(2, 3)},
        {"a": torch.ones(3, 2), "b": torch.ones(4)},
        {"a": torch.ones(1), "b": torch.ones(4)},
    ],  # fmt: skip
    ids=["fewer arrays", "not broadcastable", "broadcastable (1,)"],
)
def test_flower_dp_wrappers_only_see_valid_replies(side, bad):
    """Old code: server-side clipping ran before flora's checks (IndexError, ValueError, or a
    (1,) array silently broadcast and accepted)."""
    from flora_lightning.flower.dp import with_flower_dp
    from flora_lightning.privacy import DPFedAvg

    dp = DPFedAvg(noise_multiplier=0.0, clip_norm=100.0, num_sampled_clients=2, seed=1)
    grid = AnsweringGrid({11: 0, 12: 1})
    inner = FloraFedAvg(select_clients=lambda r: [0, 1], node_wait_seconds=0, average=dp,
                        engine=RoundEngine("skip"))  # fmt: skip
    outer = with_flower_dp(inner, dp, side)
    sent = {m.metadata.dst_node_id: m for m in outer.configure_train(
        1, ArrayRecord(GLOBAL), ConfigRecord(), grid)}  # fmt: skip
    arrays, _ = outer.aggregate_train(1, [
        reply(sent[11], client_state(1.0), good(0)), reply(sent[12], bad, good(1))
    ])  # fmt: skip
    assert inner.reports[1].accepted == [0]
    assert "1" in inner.reports[1].rejected


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_an_aggregate_not_finite_in_float32_leaves_the_global_state(policy):
    """Old code: the float64 sum 6e38 was returned and became Inf in the float32 global state."""
    from flora_lightning.federation.engine import RoundFailedError
    from flora_lightning.strategy import State, Strategy

    class Sum(Strategy):
        def start_round(self, global_state: State) -> None:
            self.total = {k: torch.zeros_like(v, dtype=torch.float64)
                          for k, v in global_state.items()}  # fmt: skip

        def accumulate(self, update) -> None:
            for name, tensor in update.state.items():
                self.total[name] += tensor.double()

        def aggregate(self) -> State:
            return {k: v.float() for k, v in self.total.items()}  # cast as a strategy might

    grid = AnsweringGrid({11: 0, 12: 1})
    strategy = FloraFedAvg(select_clients=lambda r: [0, 1], node_wait_seconds=0, average=Sum(),
                           engine=RoundEngine(policy))  # fmt: skip
    sent = selected_round(strategy, grid)
    replies = [reply(sent[11], client_state(3e38), good(0)),
               reply(sent[12], client_state(3e38), good(1))]  # fmt: skip
    if policy == "raise":
        with pytest.raises(RoundFailedError, match="holds NaN or Inf in torch.float32"):
            strategy.aggregate_train(1, replies)
        return
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None  # Flower keeps the previous global arrays
    assert strategy.reports[1].accepted == [] and not strategy.reports[1].aggregated
    assert "NaN or Inf in torch.float32" in strategy.reports[1].rejected["0"]


def test_partition_nodes_binds_each_partition_to_its_node(caplog):
    """With partition-nodes (node ids fixed by SuperNode authentication keys) an impostor that
    connects FIRST and claims partition 0 is refused; the bound node trains it."""
    grid = AnsweringGrid({5: 0, 30: 0, 31: 1})  # node 5 claims partition 0 before node 30
    strategy = FloraFedAvg(select_clients=lambda r: [0, 1], node_wait_seconds=0,
                           partition_nodes={0: 30, 1: 31})  # fmt: skip
    assert set(selected_round(strategy, grid)) == {30, 31}
    assert "partition-nodes binds to node 30" in caplog.text
    unbound = FloraFedAvg(select_clients=lambda r: [0, 1], node_wait_seconds=0)
    assert set(selected_round(unbound, AnsweringGrid({5: 0, 30: 0, 31: 1}))) == {5, 31}


@pytest.mark.parametrize(
    ("value", "message"),
    [("0:12,x:3", "not PARTITION:NODE_ID"), ("0:12,0:13", "twice"), ("0:12,1:12", "twice")],
)
def test_partition_nodes_is_checked(value, message):
    from flora_lightning.flower.app_config import FlowerRunConfig

    assert FlowerRunConfig(partition_nodes=" 0:12, 1:13 ").bound_nodes() == {0: 12, 1: 13}
    with pytest.raises(ValueError, match=message):
        FlowerRunConfig(partition_nodes=value)


def test_a_remote_traceback_is_cut_to_its_exception_line():
    """A node's error reply (here as Flower's Ray backend words it) keeps its cause within
    the bounded reason: the last ``XError: message`` line, colours removed."""
    from flora_lightning.flower.reply_checks import remote_error

    reason = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor"
        ".run()\x1b[39m (pid=1, ip=192.0.2.2, actor_id=27, repr=<ClientAppActor at 0x7f>)\n"
        + '  File "/x/client_app.py", line 161, in __call__\n    return f(message)\n'
        * 20
        + "flora_lightning.data.local_source.LocalSourceError: data-path='/site_2': 1 label(s) "
        "the run does not know: ['eleven']; data.class_names is [...]\n\nThe above exception "
        "was the direct cause of the following exception:\n\n\x1b[36mray::ClientAppActor.run()"
        '\x1b[39m (pid=1)\n  File "/x/ray_actor.py", line 65, in run\n    raise '
        "ClientAppException(str(ex))\nflwr.clientapp.client_app.ClientAppException: \n"
        "Exception ClientAppException occurred. Message: ...'>"
    )
    line = remote_error(reason)
    assert line.startswith("flora_lightning.data.local_source.LocalSourceError: data-path=")
    assert "'/site_2'" in line and "eleven" in line and "\x1b" not in line
    assert remote_error("plain words") == "plain words"
