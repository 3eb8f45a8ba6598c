"""What the server sees: the metrics the ClientApp actually sends are those ``SENT_BY_NODES``
lists, and README.md / docs/flower.md say the same."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402

from flora_lightning.flower.app_config import FlowerRunConfig  # noqa: E402
from flora_lightning.flower.client_app import (  # noqa: E402
    client_components,
    evaluate_message,
    fit_message,
    partition_message,
)
from flora_lightning.flower.nodes import SENT_BY_NODES  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = "--data.partition.num_clients 2 --trainer.max_local_steps 1"
RUN = FlowerRunConfig(config=str(REPO / "configs" / "quickstart.yaml"), overrides=OVERRIDES)
NODE = 7


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the run/task of the process; a test has to pretend one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", NODE)):
        monkeypatch.setattr(TaskIdentity, name, value)


def context(**node_config) -> Context:
    config = {"partition-id": 0, "num-partitions": 2}
    config.update(node_config)
    return Context(run_id=1, node_id=NODE, node_config=config, state=RecordDict(), run_config={})


def message(kind: str, content: dict) -> Message:
    return Message(RecordDict(content), dst_node_id=NODE, message_type=kind)


def sent_keys(reply: Message) -> set[str]:
    assert not reply.has_error(), reply.error
    assert set(reply.content.metric_records) == {"metrics"}
    return set(reply.content.metric_records["metrics"])


def test_train_replies_send_the_listed_metrics_and_no_loss_under_dp(offline_assets):
    ctx = context()
    start = client_components(RUN, ctx).model.communicated_state()
    train = {"arrays": ArrayRecord(start), "config": ConfigRecord({"server-round": 1})}
    reply = fit_message(message(MessageType.TRAIN, train), ctx, RUN)
    assert set(reply.content.array_records) == {"arrays"}
    assert set(reply.content.array_records["arrays"]) == set(start)
    keys = sent_keys(reply)
    optional = {"straggler-steps"}  # only a straggler sends it
    assert keys == set(SENT_BY_NODES["train"]) - optional

    dp = FlowerRunConfig(config=RUN.config, overrides=f"{OVERRIDES} --privacy.level client "
                         "--privacy.noise_multiplier 0.5 --privacy.clip_norm 1.0")  # fmt: skip
    dp_ctx = context()
    train = {"arrays": ArrayRecord(start), "config": ConfigRecord({"server-round": 1})}
    reply = fit_message(message(MessageType.TRAIN, train), dp_ctx, dp)
    assert sent_keys(reply) == set(SENT_BY_NODES["train"]) - optional - {"train-loss"}


def test_query_answers_send_label_counts_only_when_shared(offline_assets):
    ask = {"config": ConfigRecord({"ask": "partition-id"})}
    quiet = partition_message(message(MessageType.QUERY, ask), context(), RUN)
    assert sent_keys(quiet) == {"partition-id"}
    shared = partition_message(
        message(MessageType.QUERY, ask), context(**{"share-label-counts": "true"}), RUN
    )
    assert sent_keys(shared) == set(SENT_BY_NODES["query"])


def test_evaluate_replies_send_the_listed_metrics(offline_assets):
    run = FlowerRunConfig(
        config=RUN.config, overrides=f"{OVERRIDES} --data.local_test_fraction 0.5"
    )
    ctx = context()
    start = client_components(run, ctx).model.communicated_state()
    reply = evaluate_message(
        message(MessageType.EVALUATE, {"arrays": ArrayRecord(start)}), ctx, run
    )
    assert sent_keys(reply) == set(SENT_BY_NODES["evaluate"])
    assert all(torch.isfinite(torch.tensor(float(v))) for v in
               reply.content.metric_records["metrics"].values())  # fmt: skip


def test_the_docs_list_what_leaves_a_node():
    """docs/flower.md's table names every metric of SENT_BY_NODES, and nothing else; README's
    sentence names each kind of thing that leaves a node."""
    text = (REPO / "docs" / "flower.md").read_text()
    section = text.split("## What the server sees, and what it trusts", 1)[1].split("\n## ")[0]
    documented: dict[str, set[str]] = {}
    for row in re.findall(r"^\| (train|dropped|query|evaluate) \| (.+?) \|", section, re.M):
        documented.setdefault(row[0], set()).update(re.findall(r"`([a-z-]+)`", row[1]))
    assert documented == {kind: set(keys) for kind, keys in SENT_BY_NODES.items()}

    readme = " ".join((REPO / "README.md").read_text().split())
    claim = readme.split("What leaves a Flower node:", 1)[1].split(". ")[0]
    for phrase in ("adapter update", "number of training samples", "training loss and time",
                   "not under DP", "test accuracy, loss and rows",
                   "label counts only where its operator sets `share-label-counts=true`"):  # fmt: skip
        assert phrase in claim, phrase
