"""Fuzz: seeded malformed or extreme train replies through the ServerApp's reply path
(``FloraFedAvg.aggregate_train`` and ``screen``, on fabricated Messages) and malformed updates
through ``Strategy.add``: nothing raises, each is refused with a bounded reason, and the global
state stays finite and equal to the run with the honest replies only."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from flora_lightning.federation.engine import RoundEngine  # noqa: E402
from flora_lightning.flower.reply_checks import MAX_REASON_CHARS  # noqa: E402
from flora_lightning.flower.server_strategy import FloraFedAvg, to_state  # noqa: E402
from flora_lightning.strategy import ClientUpdate, FedAvg  # noqa: E402

GLOBAL = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
HONEST = {0: (1.0, 10), 1: (3.0, 30)}
"""Partition -> (the value of every entry of its update, its sample count)."""
ROUNDS, BAD_PER_ROUND = 20, 52  # 1,040 malformed replies

BAD_NUMBERS = [float("nan"), float("inf"), float("-inf"), True, False, [1, 2], [], "7", None,
               {"x": 1}, 10**30, -(10**30), 2**63, -1, 0, 0.5, 1e308, -0.0]  # fmt: skip
BAD_DTYPES = [">f4", "<U2", "|S3", "object", "float64", "float16", "int64", "bool", "complex64",
              "V4", "<M8[s]", "garbage"]  # fmt: skip


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the run/task of the process; a test has to pretend one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Grid:
    """Node ``10 + p`` holds partition ``p``; every node answers the partition query."""

    def __init__(self, partitions: int) -> None:
        self.nodes = [10 + p for p in range(partitions)]

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        return [
            Message(
                RecordDict(
                    {"metrics": MetricRecord({"partition-id": m.metadata.dst_node_id - 10})}
                ),
                reply_to=m,
            )  # fmt: skip
            for m in messages
        ]


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def raw_metrics(values: dict) -> MetricRecord:
    record = MetricRecord({})
    for key, value in values.items():
        record._data[key] = value  # as a hostile peer's bytes would decode, unchecked
    return record


def honest_reply(to: Message, partition: int) -> Message:
    value, n = HONEST[partition]
    state = {k: torch.full_like(v, value) for k, v in GLOBAL.items()}
    metrics = MetricRecord({"num-examples": n, "train-loss": 0.5, "train-seconds": 1.0})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=to)


def bad_array(rng: random.Random, shape: tuple) -> Array:
    """An Array whose metadata or bytes are wrong for a float32 tensor of ``shape``."""
    kind = rng.randrange(5)
    if kind == 0:  # another dtype, bytes as the metadata says where NumPy can
        dtype = rng.choice(BAD_DTYPES)
        try:
            data = npy(np.zeros(shape, dtype=dtype))
        except Exception:
            data = b"\x93NUMPY junk"
        return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)
    if kind == 1:  # another shape
        other = rng.choice([(1,), (), (3, 2), (2, 3, 1), (0,), (4, 4), (2**20,)])
        other = other if other != shape else (1,)
        return Array(dtype="float32", shape=other, stype="numpy.ndarray",
                     data=npy(np.zeros(other if other != (2**20,) else (1,), np.float32)))  # fmt: skip
    if kind == 2:  # bytes that disagree with the metadata, or do not decode
        data = rng.choice([b"", b"junk" * rng.randrange(1, 50), npy(np.zeros(7, np.float32))])
        return Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=data)
    if kind == 3:  # another serialization
        return Array(dtype="float32", shape=shape, stype="torch.pickle", data=b"\x80\x04")
    values = np.zeros(shape, np.float32)  # NaN or Inf
    values.flat[rng.randrange(values.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return Array(values)


def malformed_reply(rng: random.Random, to: Message, partition: int) -> Message:
    """A reply to ``to`` that must be refused: one to three seeded faults."""
    metrics = {"num-examples": 10, "partition-id": partition, "train-loss": 0.5,
               "train-seconds": 1.0}  # fmt: skip
    arrays = {k: Array(np.zeros(tuple(v.shape), np.float32)) for k, v in GLOBAL.items()}
    extra_records: dict = {}
    faults = rng.sample(range(12), rng.randint(1, 3))
    if 11 in faults:  # an error reply with a huge reason
        return Message(Error(code=rng.randrange(-5, 5), reason="x" * rng.randrange(1, 10**5)),
                       reply_to=to)  # fmt: skip
    # at least one fault that makes the reply invalid on its own
    fatal = [f for f in faults if f not in (5,)] or [0]
    for fault in faults + fatal[:1]:
        if fault == 0:
            metrics["num-examples"] = rng.choice([v for v in BAD_NUMBERS if v != 1e308] + [1e308])
        elif fault == 1:
            metrics["partition-id"] = rng.choice(BAD_NUMBERS + [partition + 1, partition + 10**6])
        elif fault == 2:
            metrics["train-loss"] = rng.choice([float("nan"), float("inf"), float("-inf"), True,
                                                False, [1, 2], [], "7", None, {"x": 1}])  # fmt: skip
        elif fault == 3:
            metrics["train-seconds"] = rng.choice([float("nan"), float("inf"), -1, True, [1],
                                                   "1", None, -(10**30)])  # fmt: skip
        elif fault == 4:
            metrics["straggler-steps"] = rng.choice([float("nan"), float("inf"), -1, True, [1],
                                                     "3", None, 0.5])  # fmt: skip
        elif fault == 5:  # harmless on its own: a straggler that names no partition
            metrics.pop("partition-id", None)
            metrics["straggler-steps"] = 2
        elif fault == 6:
            name = rng.choice(list(GLOBAL))
            arrays[name] = bad_array(rng, tuple(GLOBAL[name].shape))
        elif fault == 7:  # names: one missing, one extra or one renamed
            name = rng.choice(sorted(set(arrays) & set(GLOBAL)) or ["a"])
            change = rng.randrange(3) if name in arrays else 1
            if change == 0:
                arrays.pop(name)
            elif change == 1:
                arrays["c"] = Array(np.zeros(1, np.float32))
            else:
                arrays[name.upper()] = arrays.pop(name)
        elif fault == 8:
            extra_records["more"] = ArrayRecord({"a": Array(np.zeros(1, np.float32))})
        elif fault == 9:
            extra_records["no-metrics"] = True
        elif fault == 10:
            extra_records["no-arrays" if rng.random() < 0.5 else "dropped"] = rng.choice(
                [7, [1], None, 1.5]
            )
    content: dict = {}
    if "no-arrays" not in extra_records:
        content["arrays"] = ArrayRecord(arrays) if arrays else ArrayRecord({})
    if "more" in extra_records:
        content["more"] = extra_records["more"]
    if "no-metrics" not in extra_records:
        content["metrics"] = raw_metrics(metrics)
    if "dropped" in extra_records:
        config = ConfigRecord({})
        config._data["dropped"] = extra_records["dropped"]  # not text: refused
        content["config"] = config
    return Message(RecordDict(content), reply_to=to)


def run(rounds: int, bad_per_round: int, seed: int, dp: bool = False):
    """The global state after ``rounds`` rounds; per round, the honest replies first, then
    ``bad_per_round`` malformed ones from the other nodes. Returns (state, tallies)."""
    rng = random.Random(seed)
    partitions = len(HONEST) + bad_per_round
    strategy = FloraFedAvg(select_clients=lambda r: list(range(partitions)), node_wait_seconds=0,
                           engine=RoundEngine("skip"))  # fmt: skip
    grid, state = Grid(partitions), {k: v.clone() for k, v in GLOBAL.items()}
    tallies = []
    for round_ in range(1, rounds + 1):
        sent = {m.metadata.dst_node_id - 10: m for m in strategy.configure_train(
            round_, ArrayRecord(state), ConfigRecord(), grid)}  # fmt: skip
        replies = [honest_reply(sent[p], p) for p in HONEST]
        replies += [malformed_reply(rng, sent[p], p) for p in range(len(HONEST), partitions)]
        if dp:  # what the DP wrapper is handed: the screened replies only
            usable = strategy.screen(round_, replies)
            assert sorted(m.metadata.src_node_id - 10 for m in usable) == sorted(HONEST)
        arrays, _ = strategy.aggregate_train(round_, replies)
        if arrays is not None:
            state = to_state(arrays)
        tallies.append(strategy.reports[round_])
    return state, tallies


def test_a_thousand_malformed_replies_change_nothing():
    clean, _ = run(ROUNDS, 0, seed=0)
    fuzzed, tallies = run(ROUNDS, BAD_PER_ROUND, seed=1234)
    # What the honest clients alone give, computed here: (1 * 10 + 3 * 30) / 40 every round
    # (the global state does not enter a FedAvg of full states), exact in float32.
    expected = (HONEST[0][0] * HONEST[0][1] + HONEST[1][0] * HONEST[1][1]) / 40
    for name, tensor in fuzzed.items():
        assert torch.isfinite(tensor).all()
        assert torch.equal(tensor, clean[name])
        assert torch.equal(tensor, torch.full_like(GLOBAL[name], expected))
    refused = 0
    for tally in tallies:
        assert tally.accepted == sorted(HONEST)
        bad = {str(p) for p in range(len(HONEST), len(HONEST) + BAD_PER_ROUND)}
        assert set(tally.rejected) == bad, sorted(bad - set(tally.rejected))[:5]
        assert all(0 < len(reason) <= MAX_REASON_CHARS for reason in tally.rejected.values())
        refused += len(tally.rejected)
    assert refused >= 1000


def test_screen_hands_only_valid_replies_to_a_dp_wrapper():
    """``screen`` (what runs before Flower's DP wrapper) keeps exactly the honest replies."""
    run(3, BAD_PER_ROUND, seed=99, dp=True)


def test_strategy_add_refuses_malformed_updates_without_raising():
    rng = random.Random(7)
    strategy = FedAvg(max_num_samples=10**6)
    strategy.begin({k: v.clone() for k, v in GLOBAL.items()})
    honest = {p: ClientUpdate(p, {k: torch.full_like(v, value) for k, v in GLOBAL.items()}, n, 0.5)
              for p, (value, n) in HONEST.items()}  # fmt: skip
    for update in honest.values():
        assert strategy.add(update)
    refused = 0
    for i in range(1200):
        client = 100 + i
        state = {k: v.clone() for k, v in GLOBAL.items()}
        fields = {"client_id": client, "state": state, "num_samples": 10, "train_loss": 0.5}
        fault = rng.randrange(8)
        if fault == 0:
            fields["client_id"] = rng.choice([-1, 1.5, "3", None, True, [1], 0, 1])  # 0, 1: dup
        elif fault == 1:
            fields["num_samples"] = rng.choice([0, -3, 2.0, float("nan"), True, None, "9",
                                                10**7, 10**30, [5]])  # fmt: skip
        elif fault == 2:
            fields["train_loss"] = rng.choice([float("inf"), "0.5", None, True, [0.5]])
        elif fault == 3:
            fields["state"] = rng.choice([None, [], "state", {"a": [1.0]}, {"a": np.zeros((2, 3))}])
        elif fault == 4:
            name = rng.choice(list(state))
            state[name] = state[name].to(rng.choice([torch.float64, torch.float16, torch.int64,
                                                     torch.bfloat16, torch.bool]))  # fmt: skip
        elif fault == 5:
            name = rng.choice(list(state))
            state[name] = torch.zeros(rng.choice([(1,), (3, 2), (), (2, 3, 1)]))
        elif fault == 6:
            if rng.random() < 0.5:
                state.pop("a")
            else:
                state["c"] = torch.zeros(1)
        else:
            name = rng.choice(list(state))
            state[name].view(-1)[rng.randrange(state[name].numel())] = rng.choice(
                [float("nan"), float("inf"), float("-inf")]
            )
        assert strategy.add(ClientUpdate(**fields)) is False, fields
        refused += 1
    assert refused >= 1000 and strategy.accepted == sorted(HONEST)
    assert all(0 < len(r) <= MAX_REASON_CHARS for r in strategy.rejected.values())
    result = strategy.result()
    for name, tensor in result.items():
        assert torch.equal(tensor, torch.full_like(GLOBAL[name], 2.5))  # (10 + 90) / 40
