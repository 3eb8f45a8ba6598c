"""The secure-aggregation ``ClientApp``: the plain client's local fit behind Flower's
``secaggplus_mod``.

The mod runs the SecAgg+ stages (key exchange, masking, unmasking) and calls the train
handler once per round, in the *collect masked vectors* stage, with the legacy ``fitins.*``
layout; it masks the reply's ``fitres.parameters`` and clears them, so only the masked vector
leaves the node. The handler translates that layout to the plain app's train message and back
and trains with :func:`~flora_lightning.flower.client_app.fit_message` (same model, partition,
seeds, Adam state in ``context.state``)::

    fitins.parameters (arrays in communicated-state order) + fitins.config["server-round"]
    → fit_message → fitres.parameters, fitres.num_examples,
      fitres.metrics {partition-id, train-seconds}   (in clear: no training loss)
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from flora_lightning.flower.app_config import FlowerRunConfig
from flora_lightning.flower.client_app import client_components, fit_message
from flora_lightning.flower.secagg_config import split_run_config
from flora_lightning.flower.server_strategy import PARTITION_KEY

CLEAR_METRICS = (PARTITION_KEY, "train-seconds")
"""Reply metrics sent in clear beside the masked vector (the loss stays on the node)."""


def run_config_of(context: Context, defaults: dict | None = None) -> FlowerRunConfig:
    """The flora part of the run config (the ``secagg-*`` keys are the server's)."""
    flora, _ = split_run_config({**(defaults or {}), **context.run_config})
    return FlowerRunConfig.from_run_config(flora)


def secagg_fit(msg: Message, context: Context, run: FlowerRunConfig) -> Message:
    """A legacy-layout train message → the plain local fit → a legacy-layout reply."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = list(client_components(run, context).model.communicated_state())
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise ValueError(
            f"the server sent {len(arrays)} arrays, this client's model communicates "
            f"{len(names)}: both apps must read the same config."
        )
    config = ConfigRecord({"server-round": int(fitins.config["server-round"])})
    arrays_record = ArrayRecord({n: Array(a) for n, a in zip(names, arrays, strict=True)})
    # The received message's metadata: a new instruction message would need the node's task
    # identity, which a simulation worker does not set.
    plain = Message(RecordDict({"arrays": arrays_record, "config": config}), metadata=msg.metadata)
    reply = fit_message(plain, context, run).content
    metrics = reply["metrics"]
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([a.numpy() for a in reply["arrays"].values()]),
        num_examples=int(metrics["num-examples"]),
        metrics={key: metrics[key] for key in CLEAR_METRICS},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def make_secagg_client_app(defaults: dict | None = None) -> ClientApp:
    """The SecAgg+ ClientApp; its run config falls back to ``defaults`` (``run_simulation``)."""
    client = ClientApp(mods=[secaggplus_mod])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return secagg_fit(msg, context, run_config_of(context, defaults))

    return client


app = make_secagg_client_app()
