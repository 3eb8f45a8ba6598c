"""RoundEngine: one owner of a round's bookkeeping and failure policy for every runtime.

The same client updates fed to the in-process loop, the Flower server strategy and the SecAgg+
server leave the same tallies and records; ``trainer.on_too_few_updates`` holds on each.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters  # noqa: E402

from flora_lightning.federation import loop as loop_module  # noqa: E402
from flora_lightning.federation.client_runner import ClientFit  # noqa: E402
from flora_lightning.federation.engine import RoundEngine, RoundFailedError  # noqa: E402
from flora_lightning.flower.secagg_server import SecAggFedAvg, masked_bytes  # noqa: E402
from flora_lightning.flower.server_app import GlobalEvaluation  # noqa: E402
from flora_lightning.flower.server_strategy import FloraFedAvg  # noqa: E402
from flora_lightning.strategy import ClientUpdate, FedAvg  # noqa: E402

SAMPLES = {0: 10, 1: 30, 2: 5}
LOSSES = {0: 1.5, 1: 0.5, 2: 2.0}
SECONDS = {0: 0.25, 1: 0.5, 2: 0.125}
"""Exact in binary, so their sums are equal in any order of arrival."""
SHIFT = {0: 0.01, 1: -0.02, 2: 0.03}
TIMING = {"started", "seconds", "eval_seconds"}
"""Wall-clock fields: measured, never equal between two runs."""


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the run/task of the process; a test has to pretend one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Grid:
    """Nodes ``10 + p`` holding partition ``p``, answering the server's partition query."""

    def get_node_ids(self) -> list[int]:
        return [10 + p for p in SAMPLES]

    def send_and_receive(self, messages, timeout=None):
        answers = []
        for message in messages:
            assert message.metadata.message_type == MessageType.QUERY
            metrics = MetricRecord({"partition-id": message.metadata.dst_node_id - 10})
            answers.append(Message(RecordDict({"metrics": metrics}), reply_to=message))
        return answers


class Manager:
    """Flower's legacy client manager, as far as FedAvg.configure_fit asks."""

    def num_available(self):
        return len(SAMPLES)

    def wait_for(self, *_):
        return True

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        return [object()] * num_clients


def client_updates(global_state: dict, poisoned: int | None = None) -> dict[int, ClientUpdate]:
    """Each client's update: the global state shifted; ``poisoned``'s holds a NaN."""
    updates = {}
    for client in SAMPLES:
        state = {name: t + SHIFT[client] for name, t in global_state.items()}
        if client == poisoned:
            first = next(iter(state))
            state[first].view(-1)[0] = float("nan")
        updates[client] = ClientUpdate(client, state, SAMPLES[client], LOSSES[client])
    return updates


def opened(make_loop, make_flora, make_datamodule, run: str, **settings):
    """A loop with its run directory open (seeded: every one starts from the same state)."""
    loop = make_loop(rounds=1, run=run, **settings)
    loop.open_run(make_flora(), make_datamodule())
    return loop


def in_process(loop, updates, monkeypatch):
    """``FederatedLoop.run_round`` with the client runner replaced by the scripted updates;
    returns the round's tally."""
    tallies = []
    begin = loop.begin_round
    monkeypatch.setattr(
        loop, "begin_round", lambda r, c: tallies.append(begin(r, c)) or tallies[-1]
    )

    def scripted(engine, received, client, round_, steps=None):
        engine.model.load_communicated_state(updates[client].state)  # where a fit leaves it
        return ClientFit(updates[client], SECONDS[client])

    monkeypatch.setattr(loop_module, "fit_client", scripted)
    loop.run_round(1)
    return tallies[0]


def on_flower(loop, updates):
    """The ServerApp's strategy and evaluation on the updates as Flower replies."""
    strategy = FloraFedAvg(
        min_clients=loop.strategy.min_clients,
        average=loop.strategy,
        engine=loop,
        select_clients=loop.round_clients,
        node_wait_seconds=0,
    )
    start = ArrayRecord(loop.model.communicated_state())
    sent = {}
    for message in strategy.configure_train(1, start, ConfigRecord(), Grid()):
        sent[strategy.partitions[message.metadata.dst_node_id]] = message
    replies = []
    for client, update in updates.items():
        metrics = MetricRecord({"num-examples": update.num_samples, "partition-id": client,
                                "train-loss": update.train_loss,
                                "train-seconds": SECONDS[client]})  # fmt: skip
        content = RecordDict({"arrays": ArrayRecord(update.state), "metrics": metrics})
        replies.append(Message(content, reply_to=sent[client]))
    try:
        arrays, _ = strategy.aggregate_train(1, replies)
    finally:
        tally = strategy.reports[1]
    GlobalEvaluation(loop, strategy)(1, start if arrays is None else arrays)
    return tally


def weighted_mean(updates: dict[int, ClientUpdate]) -> list[np.ndarray]:
    """``sum_k n_k w_k / sum_k n_k`` in float64: what SecAgg+ unmasks (up to quantisation)."""
    total = sum(u.num_samples for u in updates.values())
    names = list(next(iter(updates.values())).state)
    return [
        sum(u.num_samples * u.state[n].double().numpy() for u in updates.values()) / total
        for n in names
    ]


def on_secagg(loop, updates, failures=()):
    """The SecAgg+ server strategy given the unmasked mean of ``updates``, as the workflow
    hands it over (every result holds the same mean)."""
    names = list(loop.model.communicated_state())
    strategy = SecAggFedAvg(loop, names, len(SAMPLES), loop.strategy.min_clients)
    start = strategy.initialize_parameters(Manager())
    strategy.configure_fit(1, start, Manager())
    mean = ndarrays_to_parameters(weighted_mean(updates))
    results = [
        (None, FitRes(Status(Code.OK, ""), mean, u.num_samples,
                      {"partition-id": c, "train-seconds": SECONDS[c]}))
        for c, u in updates.items()
    ]  # fmt: skip
    try:
        aggregated, _ = strategy.aggregate_fit(1, results, list(failures))
    finally:
        tally = strategy.reports[1]
    strategy.evaluate(1, start if aggregated is None else aggregated)
    return tally, masked_bytes(mean)


def fields(tally) -> dict:
    return {k: v for k, v in dataclasses.asdict(tally).items() if k not in TIMING}


def row(loop) -> dict:
    return {k: v for k, v in loop.history[-1].to_dict().items() if k not in TIMING}


def test_the_same_updates_leave_the_same_tally_and_record_on_every_runtime(
    make_loop, make_flora, make_datamodule, monkeypatch
):
    loops = [opened(make_loop, make_flora, make_datamodule, name) for name in "abc"]
    start = loops[0].model.communicated_state()
    updates = client_updates(start)
    local = in_process(loops[0], updates, monkeypatch)
    flower = on_flower(loops[1], updates)
    secagg, masked = on_secagg(loops[2], updates)

    per_client = sum(t.numel() * t.element_size() for t in start.values())
    assert local.accepted == [0, 1, 2] and local.aggregated
    assert local.bytes_up == local.bytes_down == 3 * per_client
    assert local.train_loss == LOSSES and local.train_seconds == sum(SECONDS.values())
    assert fields(flower) == fields(local)
    assert row(loops[1]) == row(loops[0])
    # SecAgg+: the server sees masked vectors (an int64 per value, plus the weight factor) and
    # no loss; all else is the same.
    assert masked == 8 * (sum(t.numel() for t in start.values()) + 1)
    assert fields(secagg) == {
        **fields(local),
        "bytes_up": 3 * masked,
        "client_bytes_up": dict.fromkeys(SAMPLES, masked),
        "train_loss": {},
    }
    # The server-side float64 mean cast once to float32 (as FedAvg does): equal up to one
    # float32 rounding of the mean.
    merged = [loop.model.communicated_state() for loop in loops]
    for name, tensor in merged[0].items():
        torch.testing.assert_close(merged[1][name], tensor, rtol=0, atol=0)
        bound = float(torch.finfo(torch.float32).eps) * tensor.abs().max().item()
        torch.testing.assert_close(merged[2][name], tensor, rtol=0, atol=bound)
    secagg_row, local_row = row(loops[2]), row(loops[0])
    for key in ("test_acc", "accepted_clients", "rejected_clients", "bytes_down", "round"):
        assert secagg_row[key] == local_row[key], key


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_too_few_updates_follow_one_policy_on_every_runtime(
    make_loop, make_flora, make_datamodule, monkeypatch, policy
):
    """Client 2's update holds a NaN: 2 accepted, fewer than min_clients=3."""
    settings = {"strategy": FedAvg(min_clients=3), "on_too_few_updates": policy}
    loops = [opened(make_loop, make_flora, make_datamodule, name, **settings) for name in "abc"]
    start = loops[0].model.communicated_state()
    first = {k: v.clone() for k, v in start.items()}
    updates = client_updates(start, poisoned=2)
    secagg_updates = {c: u for c, u in updates.items() if c != 2}  # SecAgg+: a failed client
    runs = [
        lambda: in_process(loops[0], updates, monkeypatch),
        lambda: on_flower(loops[1], updates),
        lambda: on_secagg(loops[2], secagg_updates, [Exception("client 2 failed")])[0],
    ]
    if policy == "raise":
        messages = []
        for run, loop in zip(runs, loops, strict=True):
            with pytest.raises(RoundFailedError) as info:
                run()
            messages.append(str(info.value).replace(str(loop.run_dir), "RUN"))
            assert len(loop.history) == 0  # nothing recorded: the run stops
        assert messages[0].startswith(
            "round 1: 2 client update(s) accepted, fewer than trainer.strategy.min_clients=3"
        )
        assert messages[1] == messages[0]
        assert messages[2].startswith(messages[0].split("; rejected")[0])
        for loop in loops[:2]:  # the model is left at the last global state
            for name, tensor in loop.model.communicated_state().items():
                assert torch.equal(tensor, first[name])
        return
    local, flower, secagg = (run() for run in runs)
    assert local.accepted == [0, 1] and not local.aggregated
    assert local.rejected == {"2": f"tensor {next(iter(start))} holds NaN or Inf"}
    assert fields(flower) == fields(local)
    assert row(loops[1]) == row(loops[0])
    assert secagg.accepted == [0, 1] and not secagg.aggregated
    assert secagg.rejected == {"failure 0": "client 2 failed"}
    for loop in loops:  # the round changed nothing
        for name, tensor in loop.model.communicated_state().items():
            assert torch.equal(tensor, first[name]), name
    assert row(loops[2])["test_acc"] == row(loops[0])["test_acc"]


def test_a_bare_engine_keeps_tallies_without_a_fabric():
    engine = RoundEngine()
    tally = engine.begin_round(4, [1, 2])
    update = ClientUpdate(2, {"w": torch.zeros(3)}, 7, 0.5)
    engine.record_update(tally, update, 1.5)
    engine.record_dropped(tally, 1, "dropout")
    assert engine.close_round(tally, [2], {}, min_clients=1)  # a drop does not fail a round
    assert (tally.bytes_up, tally.client_bytes_up, tally.train_loss) == (12, {2: 12}, {2: 0.5})
    assert tally.accepted == [2] and tally.aggregated and tally.dropped == {"1": "dropout"}
    short = engine.begin_round(5, [1, 2])
    engine.record_dropped(short, 1, "deadline")  # short only by simulated availability: passes
    assert not engine.close_round(short, [], {}, min_clients=1)
    with pytest.raises(RoundFailedError, match="the run directory keeps the last complete"):
        engine.close_round(engine.begin_round(6, [1]), [], {"1": "boom"}, min_clients=1)
