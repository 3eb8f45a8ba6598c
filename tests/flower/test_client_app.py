"""The ClientApp on a fabricated train message: reply contents, bytes, Adam state across rounds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)

from flora_lightning.flower.app_config import FlowerRunConfig  # noqa: E402
from flora_lightning.flower.client_app import (  # noqa: E402
    client_components,
    fit_message,
    partition_message,
)
from flora_lightning.flower.optimizer_store import OPTIMIZER_STATE_KEY  # noqa: E402
from flora_lightning.flower.server_strategy import array_record_bytes, to_state  # noqa: E402
from flora_lightning.rundir.checkpoint import load_state  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RUN = FlowerRunConfig(
    config=str(REPO / "configs" / "quickstart.yaml"),
    overrides="--data.partition.num_clients 2 --trainer.max_local_steps 2",
)
NODE = 7


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the run/task of the process; a test has to pretend one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", NODE)):
        monkeypatch.setattr(TaskIdentity, name, value)


def context(
    num_partitions: int = 2, state_dir: Path | None = None, partition: int = 0, **more
) -> Context:
    node_config = {"partition-id": partition, "num-partitions": num_partitions}
    node_config.update({key.replace("_", "-"): value for key, value in more.items()})
    if state_dir is not None:
        node_config["state-dir"] = str(state_dir)
    return Context(
        run_id=1,
        node_id=NODE,
        node_config=node_config,
        state=RecordDict(),
        run_config={},
    )


def train_message(state: dict, server_round: int) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": server_round})}
    )
    return Message(content, dst_node_id=NODE, message_type=MessageType.TRAIN)


def test_client_trains_its_partition_and_keeps_adam_state(offline_assets):
    ctx = context()
    parts = client_components(RUN, ctx)
    start = parts.model.communicated_state()
    reply = fit_message(train_message(start, 1), ctx, RUN)
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    assert set(arrays) == set(start)
    assert array_record_bytes(arrays) == sum(t.numel() * 4 for t in start.values()) == 2048
    assert metrics["num-examples"] == parts.data.num_samples(0)
    assert metrics["partition-id"] == 0 and metrics["train-loss"] > 0
    trained = to_state(arrays)
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # it learned something
    steps = {
        k: v for k, v in to_state(ctx.state[OPTIMIZER_STATE_KEY]).items() if k.endswith("step")
    }
    assert steps and all(float(v) == 2 for v in steps.values())  # 2 local steps
    fit_message(train_message(trained, 2), ctx, RUN)
    steps = {
        k: v for k, v in to_state(ctx.state[OPTIMIZER_STATE_KEY]).items() if k.endswith("step")
    }
    assert all(float(v) == 4 for v in steps.values())  # Adam continued across rounds


def adam_steps(ctx) -> set[float]:
    state = to_state(ctx.state[OPTIMIZER_STATE_KEY])
    return {float(v) for k, v in state.items() if k.endswith("step")}


def test_a_diverged_fit_drops_the_nodes_adam_state(offline_assets):
    ctx = context()
    start = client_components(RUN, ctx).model.communicated_state()
    fit_message(train_message(start, 1), ctx, RUN)
    assert adam_steps(ctx) == {2.0}
    poisoned = {k: torch.full_like(v, float("nan")) for k, v in start.items()}
    reply = fit_message(train_message(poisoned, 2), ctx, RUN)
    assert not all(t.isfinite().all() for t in to_state(reply.content["arrays"]).values())
    assert OPTIMIZER_STATE_KEY not in ctx.state.array_records  # its NaN moments are gone
    fit_message(train_message(start, 3), ctx, RUN)
    assert adam_steps(ctx) == {2.0}  # a fresh Adam, not 6 steps carried over


def test_partition_must_fit_the_config(offline_assets):
    ctx = context(num_partitions=3)
    with pytest.raises(ValueError, match="num-partitions=3 does not fit"):
        fit_message(
            train_message(client_components(RUN, context()).model.communicated_state(), 1), ctx, RUN
        )


def test_query_answers_the_partition_without_building_anything():
    question = Message(
        RecordDict({"config": ConfigRecord({"ask": "partition-id"})}),
        dst_node_id=NODE,
        message_type=MessageType.QUERY,
    )
    answer = partition_message(question, context(), RUN)
    assert answer.content.metric_records["metrics"]["partition-id"] == 0
    no_partition = Context(
        run_id=1, node_id=NODE, node_config={}, state=RecordDict(), run_config={}
    )
    with pytest.raises(ValueError, match="node_config has no partition-id"):
        partition_message(question, no_partition, RUN)


def saved_steps(path: Path) -> set[float]:
    return {float(v) for k, v in load_state(path).items() if k.endswith("step")}


def test_state_dir_keeps_adam_state_across_restarts_and_resumes(offline_assets, tmp_path):
    """With node_config state-dir, a new context (restarted SuperNode, or a new run of a
    resumed ServerApp) continues from the state saved after the round before."""
    start = client_components(RUN, context()).model.communicated_state()
    fit_message(train_message(start, 1), context(state_dir=tmp_path), RUN)
    (folder,) = tmp_path.glob("run-*/partition-0")  # this run's folder (its fingerprint)
    assert saved_steps(folder / "round_001.safetensors") == {2.0}
    fit_message(train_message(start, 2), context(state_dir=tmp_path), RUN)  # a fresh context
    assert saved_steps(folder / "round_002.safetensors") == {4.0}  # continued, not afresh
    # The ServerApp resumed from round 1: round 2 again starts from round 1's state.
    fit_message(train_message(start, 2), context(state_dir=tmp_path), RUN)
    assert saved_steps(folder / "round_002.safetensors") == {4.0}  # not 6
    fit_message(train_message(start, 3), context(state_dir=tmp_path), RUN)
    # keep = resume_every_n_rounds + 1 = 2 files, and their checksums
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "round_002.safetensors",
        "round_003.safetensors",
    ]


def test_a_diverged_fit_leaves_an_empty_state_file(offline_assets, tmp_path):
    start = client_components(RUN, context()).model.communicated_state()
    fit_message(train_message(start, 1), context(state_dir=tmp_path), RUN)
    poisoned = {k: torch.full_like(v, float("nan")) for k, v in start.items()}
    fit_message(train_message(poisoned, 2), context(state_dir=tmp_path), RUN)
    (folder,) = tmp_path.glob("run-*/partition-0")
    assert load_state(folder / "round_002.safetensors") == {}
    fit_message(train_message(start, 3), context(state_dir=tmp_path), RUN)
    assert saved_steps(folder / "round_003.safetensors") == {2.0}  # afresh


def test_without_state_dir_a_restart_resets_the_state_with_a_warning(offline_assets, caplog):
    start = client_components(RUN, context()).model.communicated_state()
    fit_message(train_message(start, 1), context(), RUN)
    restarted = context()  # context.state is memory: a restarted SuperNode has none
    with caplog.at_level(logging.WARNING):
        fit_message(train_message(start, 2), restarted, RUN)
    assert adam_steps(restarted) == {2.0}  # a fresh Adam
    assert "partition 0, round 2: no optimizer state from an earlier round" in caplog.text
    assert "no node_config state-dir" in caplog.text


def dp_run(extra: str = "") -> FlowerRunConfig:
    overrides = (
        "--data.partition.num_clients 2 --trainer.max_local_steps 2 --privacy.level client"
        f" --privacy.noise_multiplier 0.5 --privacy.clip_norm 0.01 {extra}"
    )
    return FlowerRunConfig(config=RUN.config, overrides=overrides, dp_clipping="client")


def clipped_message(state: dict, server_round: int, clip: float) -> Message:
    message = train_message(state, server_round)
    message.content["config"]["clipping_norm"] = clip
    return message


@pytest.mark.parametrize("adaptive", [False, True])
def test_client_side_clipping_is_flowers_mod_on_the_node(offline_assets, adaptive):
    from flora_lightning.flower.client_app import clipping_mod
    from flora_lightning.privacy.client_dp import update_norm

    run = dp_run("--privacy.adaptive_clipping true --privacy.clipped_count_stddev 1.0"
                 if adaptive else "")  # fmt: skip
    ctx = context()
    start = client_components(run, ctx).model.communicated_state()
    mod = clipping_mod(run.__dict__)

    def fit(msg, context):
        return fit_message(msg, context, run)

    plain = fit(train_message(start, 1), ctx)  # without the mod: not clipped
    raw = {k: v - start[k] for k, v in to_state(plain.content["arrays"]).items()}
    assert update_norm(raw) > 0.01
    reply = mod(clipped_message(start, 1, 0.01), ctx, fit)
    assert not reply.has_error()
    sent = {k: v - start[k] for k, v in to_state(reply.content["arrays"]).items()}
    assert update_norm(sent) == pytest.approx(0.01, rel=1e-4)
    assert ("norm_bit" in reply.content["metrics"]) == adaptive


def sent_norm(reply: Message, start: dict) -> float:
    from flora_lightning.privacy.client_dp import update_norm

    return update_norm({k: v - start[k] for k, v in to_state(reply.content["arrays"]).items()})


def test_fixed_client_clipping_uses_the_nodes_own_bound(offline_assets):
    """dp-clipping = "client": the node clips with its YAML's privacy.clip_norm (0.01) or its
    node config's clip-norm, whatever bound the message carries, and also without one (it
    was skipped before; a loose server bound was obeyed)."""
    from flora_lightning.flower.client_app import clipping_mod

    run = dp_run()
    ctx = context()
    start = client_components(run, ctx).model.communicated_state()
    mod = clipping_mod(run.__dict__)

    def fit(msg, context):
        return fit_message(msg, context, run)

    assert sent_norm(fit(train_message(start, 1), ctx), start) > 0.02  # unclipped: above both
    loose = mod(clipped_message(start, 1, 1e6), ctx, fit)  # the message asks for no clipping
    assert sent_norm(loose, start) == pytest.approx(0.01, rel=1e-4)
    missing = mod(train_message(start, 1), ctx, fit)  # no clipping_norm at all
    assert sent_norm(missing, start) == pytest.approx(0.01, rel=1e-4)
    own = context(clip_norm=0.004)
    tighter = mod(clipped_message(start, 1, 1e6), own, fit)
    assert sent_norm(tighter, start) == pytest.approx(0.004, rel=1e-4)


def test_adaptive_client_clipping_refuses_a_missing_or_too_loose_bound(offline_assets):
    """Adaptive clipping follows the server's bound (the protocol adapts it), but a message
    without one is refused (it passed unclipped before), and so is a bound above the node
    config's clip-norm cap."""
    from flora_lightning.flower.client_app import clipping_mod

    run = dp_run("--privacy.adaptive_clipping true --privacy.clipped_count_stddev 1.0")
    ctx = context()
    start = client_components(run, ctx).model.communicated_state()
    mod = clipping_mod(run.__dict__)

    def fit(msg, context):
        return fit_message(msg, context, run)

    with pytest.raises(ValueError, match="the train message has no clipping_norm"):
        mod(train_message(start, 1), ctx, fit)
    capped = context(clip_norm=0.02)
    with pytest.raises(ValueError, match="larger than this node's cap, node_config clip-norm"):
        mod(clipped_message(start, 1, 0.5), capped, fit)
    within = mod(clipped_message(start, 1, 0.01), capped, fit)
    assert sent_norm(within, start) == pytest.approx(0.01, rel=1e-4)
    assert "norm_bit" in within.content["metrics"]


def test_a_node_with_a_pinned_yaml_ignores_the_run_configs_yaml(offline_assets, caplog):
    """The node config's config= is the YAML the node reads; the run config's is ignored (it
    does not even exist here: the old node raised FileNotFoundError)."""
    import dataclasses

    run = dataclasses.replace(RUN, config="/nowhere/server.yaml")
    pinned = context(config=RUN.config)
    with caplog.at_level(logging.WARNING):
        parts = client_components(run, pinned)
    assert parts.data.num_clients == 2
    assert "config='/nowhere/server.yaml' is ignored" in caplog.text
    start = parts.model.communicated_state()
    reply = fit_message(train_message(start, 1), pinned, run)
    assert reply.content["metrics"]["partition-id"] == 0


def test_a_locked_node_refuses_overrides_its_operator_did_not_allow(offline_assets, tmp_path):
    """A run config asking a locked node to write elsewhere, load another model or change
    its privacy is refused before anything is built, naming the node-config key; allowed by
    name, the override applies."""
    import dataclasses

    from flora_lightning.flower.client_app import client_components as components
    from flora_lightning.flower.node_policy import OverrideRefused

    elsewhere = tmp_path / "elsewhere"
    run = dataclasses.replace(
        RUN, overrides=f"{RUN.overrides} --trainer.client_state_dir {elsewhere}"
    )
    locked = context(config=RUN.config)
    start = client_components(RUN, context()).model.communicated_state()
    with pytest.raises(OverrideRefused, match="rule path") as err:
        fit_message(train_message(start, 1), locked, run)
    assert 'allow-overrides="trainer.client_state_dir"' in str(err.value)
    for extra, rule in (
        ("--model.init_args.name_or_path someone/else", "model"),
        ("--privacy.clip_norm 100", "privacy"),
        ("--trainer.strategy some.module.Class", "class"),
    ):
        hostile = dataclasses.replace(RUN, overrides=f"{RUN.overrides} {extra}")
        with pytest.raises(OverrideRefused, match=f"rule {rule}"):
            components(hostile, locked)
    allowed = context(config=RUN.config, allow_overrides="trainer.client_state_dir")
    assert components(run, allowed).loop.client_state_dir == str(elsewhere)


def test_client_side_clipping_lets_a_dropped_client_answer(offline_assets):
    from flora_lightning.flower.client_app import clipping_mod
    from flora_lightning.flower.nodes import DROPPED_KEY

    run = dp_run("--trainer.availability '{dropout: 1.0}'")
    ctx = context()
    start = client_components(run, ctx).model.communicated_state()
    reply = clipping_mod(run.__dict__)(
        clipped_message(start, 1, 0.01), ctx, lambda msg, c: fit_message(msg, c, run)
    )
    assert not reply.has_error()  # Flower's mod would refuse a reply without arrays
    assert DROPPED_KEY in reply.content["config"] and not reply.content.array_records


def test_partitions_served_by_one_process_share_one_build(offline_assets):
    """A simulation worker serves many virtual nodes: one model for all of them (memory), and
    each fit is what a process of its own would reply."""
    from flora_lightning.flower import client_app

    client_app._built.clear()
    start = client_components(RUN, context()).model.communicated_state()
    fit_message(train_message(start, 1), context(partition=0), RUN)  # moves the shared model
    shared = fit_message(train_message(start, 1), context(partition=1), RUN)
    assert len(client_app._built) == 1
    assert set(client_app._built[(RUN, None)].loop.feature_cache.features) >= {"0", "1"}
    client_app._built.clear()
    alone = fit_message(train_message(start, 1), context(partition=1), RUN)
    for name, tensor in to_state(alone.content["arrays"]).items():
        assert torch.equal(to_state(shared.content["arrays"])[name], tensor), name
    assert shared.content["metrics"]["train-loss"] == alone.content["metrics"]["train-loss"]


def test_one_partition_per_node_frees_the_image_encoder_after_caching(offline_assets):
    """A deployment node (one-partition-per-node = true) applies trainer.release_image_encoder:
    the vision tower leaves memory, the reply is the one a simulation worker sends, and a
    second partition in that process is refused, naming the key."""
    import dataclasses

    from flora_lightning.flower import client_app

    deployed = dataclasses.replace(RUN, one_partition_per_node=True)
    client_app._built.clear()
    start = client_components(RUN, context()).model.communicated_state()
    kept = fit_message(train_message(start, 1), context(partition=1), RUN)
    vision = client_app._built[(RUN, None)].model.clip_model().vision_model
    assert not any(p.is_meta for p in vision.parameters())  # simulation: kept for the next one
    freed = fit_message(train_message(start, 1), context(partition=1), deployed)
    vision = client_app._built[(deployed, None)].model.clip_model().vision_model
    assert all(p.is_meta for p in vision.parameters())
    for name, tensor in to_state(kept.content["arrays"]).items():
        assert torch.equal(to_state(freed.content["arrays"])[name], tensor), name
    with pytest.raises(RuntimeError, match="set one-partition-per-node = false"):
        fit_message(train_message(start, 1), context(partition=0), deployed)
    client_app._built.clear()


def test_device_preprocessing_on_the_node_caches_what_flora_fit_caches(offline_assets):
    """``--data.preprocess device`` reaches the ClientApp (same data code as ``flora fit``):
    the node caches its partition from uint8 batches preprocessed by the model, the same bits
    as the in-process feature cache on the same data and checkpoint, and it trains."""
    import lightning as L

    from flora_lightning.clip.backbone import load_clip
    from flora_lightning.clip.feature_cache import FeatureCache
    from flora_lightning.methods import FLoRA
    from flora_lightning.methods.base import build_model_from_bundle

    run = FlowerRunConfig(config=RUN.config, overrides=RUN.overrides + " --data.preprocess device")
    ctx = context()
    parts = client_components(run, ctx)
    assert parts.data.preprocess == "device"
    images, _ = parts.data.collate([parts.data.client_dataset(0)[0]])
    assert images.dtype == torch.uint8
    start = parts.model.communicated_state()
    reply = fit_message(train_message(start, 1), ctx, run)
    trained = to_state(reply.content["arrays"])
    assert any(not torch.equal(trained[k], start[k]) for k in start)

    model = build_model_from_bundle(
        FLoRA(parts.model.name_or_path), load_clip(parts.model.name_or_path)
    )
    model.configure_task(parts.data.class_names, parts.data.template)
    in_process = FeatureCache(L.Fabric(accelerator="cpu", devices=1), model, parts.data)
    in_process.build([0], test=False)
    node_x, node_y = parts.loop.feature_cache.features["0"]
    assert torch.equal(in_process.features["0"][0], node_x)
    assert torch.equal(in_process.features["0"][1], node_y)
