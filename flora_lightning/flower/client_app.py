"""The Flower ``ClientApp``: one flora client, trained by the in-process loop's ``LocalTrainer``.

A train message carries the global communicated state (``arrays``) and the round
(``config["server-round"]``). The client trains its partition (``node_config["partition-id"]``)
with the in-process loop's client runner (:mod:`flora_lightning.federation.client_runner`:
availability draw, the received state loaded, ``LocalTrainer.fit``) under the YAML's Fabric
settings and with the loop's seeds per ``(seed, round, client)``, and replies
with its communicated state, ``num-examples``, ``train-loss`` (not under DP, unless
``privacy.log_client_stats``: the loss is outside epsilon), ``train-seconds`` and
``partition-id``. A FedProx ``trainer.strategy`` in the (shared) YAML gives the fit its
proximal ``mu``. Its Adam state is kept between rounds on the node (it never leaves it), as
the in-process loop keeps it per client: on disk under ``node_config["state-dir"]`` when set
(it then survives SuperNode restarts and resumed ServerApps), else in ``context.state``
(:mod:`~flora_lightning.flower.optimizer_store`).

With client-side DP clipping (run config ``dp-clipping = "client"``), Flower's
``fixedclipping_mod`` (or ``adaptiveclipping_mod`` with ``privacy.adaptive_clipping``) clips the
reply on the node (:func:`clipping_mod`) with the node's own bound (fixed clipping): never a
bound the message alone chose, and also when the message carries none.

What the node accepts from the run config is its operator's choice
(:mod:`~flora_lightning.flower.node_policy`): a node config may pin the YAML
(``config="/site/flora.yaml"``) and name the protected overrides it allows
(``allow-overrides``); every entry point applies it (:func:`client_components`,
:func:`partition_message`).

A query message (sent once per node when ``join_ratio < 1``) is answered with the node's
``partition-id`` only, so the ServerApp can train the partitions ``flora fit`` would sample.

Model and data are built once per process and config (a SuperNode's ClientApp process or a
simulation worker may serve several rounds and, in simulation, several partitions, which
share them; see :func:`client_components`).
"""

from __future__ import annotations

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from flora_lightning.federation.availability import Event
from flora_lightning.federation.client_runner import availability_event, fit_client
from flora_lightning.federation.evaluation import evaluate_loader
from flora_lightning.federation.step_capture import log_once
from flora_lightning.flower.app_config import Components, FlowerRunConfig, build_components
from flora_lightning.flower.arrays import to_state
from flora_lightning.flower.node_data import SHARE_LABEL_COUNTS, NodeData, node_data
from flora_lightning.flower.node_policy import CLIP_NORM, node_clip_norm, node_run_config
from flora_lightning.flower.nodes import (
    DROPPED_KEY,
    LABEL_COUNTS_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_KEY,
    STRAGGLER_KEY,
)
from flora_lightning.flower.optimizer_store import OptimizerStore

_built: dict[tuple[FlowerRunConfig, int | None], Components] = {}
"""This process's model, data and loop per run config (and, with node-local data, per client:
see :func:`client_components`)."""


def node_of(context: Context, run: FlowerRunConfig, parts: Components) -> NodeData:
    """The client this node plays and its data (:func:`~flora_lightning.flower.node_data.
    node_data`), checked against the YAML's partitioning."""
    return node_data(context.node_config, run.node_data, parts.data.partition)


def client_components(run: FlowerRunConfig, context: Context) -> Components:
    """Model, data and loop of this process for ``run``, built and set up once, with this
    node's partition's features cached (if frozen) the first time it trains here.

    One set per process, whatever the partition: a simulation worker serves many virtual
    nodes, which share it as ``flora fit``'s clients share one model (each fit loads the
    global state, its optimizer state and its seeds). The image encoder is kept after caching
    to encode the next partition, unless the run config's ``one-partition-per-node`` says
    each process trains one partition: then ``trainer.release_image_encoder`` applies.

    ``run`` is the run config as sent; the node obeys it as its node config allows
    (:func:`~flora_lightning.flower.node_policy.node_run_config`: its pinned YAML, its allowed
    overrides).

    Raises:
        RuntimeError: a process that released its image encoder is asked for another
            partition (``one-partition-per-node = true`` on a simulation), naming the key.
        OverrideRefused: an override the node config does not allow.
    """
    run = node_run_config(run, context.node_config)
    node = None
    if run.node_data:  # each node's own data: one set per client (its data is all it loads)
        node = node_data(context.node_config, True, build_components(run).data.partition)
    key = (run, None if node is None else node.client)
    parts = _built.get(key)
    if parts is None:
        parts = build_components(run)
        parts.loop.release_image_encoder &= run.one_partition_per_node
        if node is not None:  # only this node's data path (and its own test path) is read
            parts.data.setup_node(node.data_path, node.client, node.test_path, node.fields)
            log_once(f"node-local data of client {node.client}: " + "; ".join(
                s.summary() for s in parts.data.sources.values()))  # fmt: skip
        parts.loop.set_up(parts.model, parts.data, tensorboard=False)  # a client writes nothing
        if parts.loop.parallel_clients != 1:
            log_once(
                f"trainer.parallel_clients={parts.loop.parallel_clients}: a Flower node trains "
                "its own partition, one client per call; the updates equal flora fit's "
                "batched ones up to float rounding (the batched fit is tested equal to this one)."
            )
        _built[key] = parts
    loop, model, data = parts.loop, parts.model, parts.data
    partition = node_of(context, run, parts).client
    cache = loop.feature_cache
    if cache is None or str(partition) not in cache.features:
        if cache is not None and loop.release_image_encoder:
            raise RuntimeError(
                f"one-partition-per-node = true, but this ClientApp process, which freed its "
                f"image encoder after caching partition {next(iter(cache.features))}, was asked "
                f"to train partition {partition}; set one-partition-per-node = false where one "
                "process serves many nodes (Flower's simulation engine)."
            )
        loop.cache_image_features(model, data, clients=[partition], test=False)
    return parts


def fit_message(msg: Message, context: Context, run: FlowerRunConfig) -> Message:
    """Local fit of this node's partition from the received global state."""
    parts = client_components(run, context)
    loop = parts.loop
    client = node_of(context, run, parts).client
    round_ = int(msg.content["config"]["server-round"])

    # trainer.availability: the same seeded draw as flora fit; a dropped client sends nothing
    event = availability_event(loop, round_, client)
    if event is not None and event.dropped:
        return dropped_reply(msg, event)
    # The server may resume from an earlier round: keep states back to its last resume point.
    keep = loop.recorder.resume_every_n_rounds + 1
    store = OptimizerStore(context, client, keep, parts.config_yaml)
    loop.local_trainer.optimizer_states = store.load(round_)
    # trainer.client_ranks: a lower-rank client starts from its slice, zero-padded and masked,
    # and sends its own rank's slice
    steps = None if event is None else event.steps
    fit = fit_client(loop, to_state(msg.content["arrays"]), client, round_, steps)
    store.save(round_, loop.local_trainer.optimizer_states)  # none after a divergence: afresh next
    update = fit.update

    values = {
        "num-examples": update.num_samples,
        "train-seconds": fit.seconds,
        PARTITION_KEY: client,
    }
    if loop.recorder.client_stats:  # under DP the loss stays on the node (outside epsilon)
        values["train-loss"] = update.train_loss
    if event is not None and event.kind == "straggler":
        values[STRAGGLER_KEY] = event.steps
    content = RecordDict({"arrays": ArrayRecord(update.state), "metrics": MetricRecord(values)})
    return Message(content=content, reply_to=msg)


def dropped_reply(msg: Message, event: Event) -> Message:
    """The reply of a client the availability draw dropped this round: no arrays."""
    config = ConfigRecord({DROPPED_KEY: event.reason})
    metrics = MetricRecord({PARTITION_KEY: event.client})
    return Message(RecordDict({"config": config, "metrics": metrics}), reply_to=msg)


def clipping_mod(defaults: dict | None = None):
    """A ClientApp mod: with run config ``dp-clipping = "client"`` (or a train message carrying
    a ``clipping_norm``), Flower's ``fixedclipping_mod`` (``adaptiveclipping_mod`` with the
    node's ``privacy.adaptive_clipping``) on train messages; other messages pass. A client the
    availability draw drops answers before Flower's mod (which refuses a reply without arrays).

    The bound is the node's (:func:`node_bound`): fixed clipping clips with the node config's
    ``clip-norm``, else its YAML's ``privacy.clip_norm``, whatever the message says (Flower's
    mod reads the message's ``clipping_norm``: it is set to the node's bound first), and also
    when the message has none. Adaptive clipping follows the server's bound (the protocol
    adapts it each round), refused when the message has none or, with a node-config
    ``clip-norm``, when it is larger than that cap."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        config = msg.content.config_records.get("config", {})
        run = FlowerRunConfig.from_run_config(context.run_config, defaults)
        if run.dp_clipping != "client" and KEY_CLIPPING_NORM not in config:
            return call_next(msg, context)
        parts = client_components(run, context)
        loop, client = parts.loop, node_of(context, run, parts).client
        event = availability_event(loop, int(config["server-round"]), client)
        if event is not None and event.dropped:
            return dropped_reply(msg, event)
        privacy = loop.privacy_run.privacy if loop.privacy_run is not None else None
        cap = node_clip_norm(context.node_config)
        sent = config.get(KEY_CLIPPING_NORM)
        if sent is None and cap is None and (privacy is None or privacy.level != "client"):
            return call_next(msg, context)  # no client-level DP here: nothing to clip
        if privacy is not None and privacy.adaptive_clipping:
            if sent is None:
                raise ValueError(
                    f"adaptive client-side clipping: the train message has no "
                    f"{KEY_CLIPPING_NORM} (the server's bound this round); this node does not "
                    "send an unclipped update."
                )
            if cap is not None and float(sent) > cap:
                raise ValueError(
                    f"the server's adaptive clipping bound {float(sent)} is larger than this "
                    f"node's cap, node_config {CLIP_NORM}={cap}: the node does not send an "
                    "update clipped that loosely."
                )
            return adaptiveclipping_mod(msg, context, call_next)
        bound = node_bound(cap, privacy)
        if sent is not None and float(sent) != bound:
            log_once(
                f"client {client}: clipping with this node's bound {bound} (the server sent "
                f"{KEY_CLIPPING_NORM}={sent})."
            )
        if len(msg.content.config_records) == 1:  # else Flower's mod refuses the message
            next(iter(msg.content.config_records.values()))[KEY_CLIPPING_NORM] = bound
        return fixedclipping_mod(msg, context, call_next)

    return mod


def node_bound(cap: float | None, privacy) -> float:
    """The fixed client-side clipping bound of this node: its node config's ``clip-norm``,
    else its YAML's ``privacy.clip_norm`` (with ``privacy.level client``).

    Raises:
        ValueError: neither is set, naming both.
    """
    if cap is not None:
        return cap
    if privacy is not None and privacy.level == "client":
        return float(privacy.clip_norm)
    raise ValueError(
        'dp-clipping = "client", but this node has no clipping bound of its own: set '
        "privacy.level: client and privacy.clip_norm in its YAML, or start the SuperNode with "
        f"--node-config '{CLIP_NORM}=1.0'."
    )


def partition_message(msg: Message, context: Context, run: FlowerRunConfig) -> Message:
    """Answer to the server's query: the client this node plays and, only with the node's
    ``share-label-counts=true``, its training samples and label counts (the server's label
    table then shows them); nothing else about its data leaves the node."""
    config = context.node_config
    run = node_run_config(run, config)
    if not (run.node_data or str(config.get(SHARE_LABEL_COUNTS, "false")).lower() == "true"):
        if PARTITION_KEY not in config:  # nothing is built to answer: the id alone
            raise ValueError(
                f"node_config has no {PARTITION_KEY}; start the SuperNode with --node-config "
                f'"{PARTITION_KEY}=0 num-partitions=N" (simulation sets it).'
            )
        return Message(RecordDict({"metrics": MetricRecord(
            {PARTITION_KEY: int(config[PARTITION_KEY])})}), reply_to=msg)  # fmt: skip
    node = node_of(context, run, build_components(run))  # the YAML only: no data is read
    values: dict = {PARTITION_KEY: node.client}
    if node.share_label_counts:
        try:
            samples, counts = client_components(run, context).data.client_report(node.client)
        except ValueError as err:  # its data is refused: the train rounds report why
            log_once(f"client {node.client}: label counts not shared, its data is refused: {err}")
        else:
            values[NUM_EXAMPLES_KEY] = int(samples)
            values[LABEL_COUNTS_KEY] = [int(c) for c in counts]
    return Message(content=RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)


def evaluate_message(msg: Message, context: Context, run: FlowerRunConfig) -> Message:
    """Federated evaluation: the received global state on this node's local test set
    (``data.local_test_fraction`` or its ``test-path``); replies ``eval-acc``, ``eval-loss``
    and ``num-examples`` (the test rows), as :class:`~flora_lightning.callbacks.
    FederatedEvaluation` computes them in ``flora fit``."""
    parts = client_components(run, context)
    loop, model, data = parts.loop, parts.model, parts.data
    client = node_of(context, run, parts).client
    if not data.has_local_test:
        raise ValueError(
            f"client {client} has no local test set: set data.local_test_fraction, or start "
            "the node with --node-config test-path=... (node-data)."
        )
    model.load_communicated_state(to_state(msg.content["arrays"]))
    source = loop.feature_cache or data
    metrics = evaluate_loader(loop.fabric, model, source.client_test_dataloader(client),
                              len(data.class_names))  # fmt: skip
    values = {
        "eval-acc": metrics["test_acc"],
        "eval-loss": metrics["test_loss"],
        NUM_EXAMPLES_KEY: len(data.client_test_indices[client]),
        PARTITION_KEY: client,
    }
    return Message(content=RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)


def make_client_app(defaults: dict | None = None) -> ClientApp:
    """A ClientApp whose run config falls back to ``defaults`` (for ``run_simulation``)."""
    client = ClientApp(mods=[clipping_mod(defaults)])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return fit_message(
            msg, context, FlowerRunConfig.from_run_config(context.run_config, defaults)
        )

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        run = FlowerRunConfig.from_run_config(context.run_config, defaults)
        return partition_message(msg, context, run)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        run = FlowerRunConfig.from_run_config(context.run_config, defaults)
        return evaluate_message(msg, context, run)

    return client


app = make_client_app()
