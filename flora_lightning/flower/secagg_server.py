"""The secure-aggregation ``ServerApp``: flora's rounds with Flower's SecAgg+, the server sees
only the sum.

Flower 1.42 runs SecAgg+ as a *legacy* workflow: :class:`~flwr.server.workflow.SecAggPlusWorkflow`
is the ``fit_workflow`` of a :class:`~flwr.server.workflow.DefaultWorkflow`, both demand a
:class:`~flwr.server.LegacyContext` (``TypeError: Expect a LegacyContext, but get Context``) and
call a legacy :class:`flwr.server.strategy.Strategy` (``configure_fit``/``aggregate_fit``); the
client mod reads the legacy ``fitres.*`` reply layout. The plain app's
:class:`~flora_lightning.flower.server_strategy.FloraFedAvg` is a Message-API strategy that runs its own
rounds (``start``), so it cannot be the workflow's strategy; this app is SecAgg+ as Flower
intends it, on the same round engine and run sequence (:meth:`RoundEngine.run
<flora_lightning.federation.engine.RoundEngine.run>`)::

    open the run directory (as flora fit), restore with trainer.resume, round 0
    → DefaultWorkflow: initial parameters = model.communicated_state()
    → per round: SecAggFedAvg.configure_fit → loop.begin_round; SecAgg+ stages (setup, share
      keys, collect masked vectors: the clients train here, unmask) → the unmasked weighted
      mean → SecAggFedAvg.aggregate_fit → loop.record_update per client, loop.close_round
      → evaluate(round) = loop.end_round (evaluation, summary.json, checkpoints)
    → finish: final/ adapter

A resumed run (``resume = true``) continues after its last complete round, with Flower's rounds
offset so that the clients' seeds per ``(seed, round, client)`` are the uninterrupted run's.

The workflow computes ``sum_k r_k w_k / sum_k r_k`` with ``r_k ~= n_k / w_max`` (see
:mod:`~flora_lightning.flower.secagg_config` for the quantisation bound): flora's FedAvg
(also FedProx's server side) up to quantisation. Other ``trainer.strategy`` values need the
individual updates and are refused. What the server never sees, it does not record: per
client, only the partition id, ``num-examples`` and fit seconds travel in clear; ``bytes_up``
counts the masked vectors (one int64 per communicated value plus the weight factor). A client
that fails after key sharing is a dropout the protocol recovers from (its masks are
reconstructed from its neighbours' shares) while every client keeps at least
``reconstruction_threshold`` live neighbours; the round's record lists it as rejected. Fewer
than ``min_clients`` in the sum: ``trainer.on_too_few_updates`` (raise by default, as
``flora fit``; skip leaves the global state as it was).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Context
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from flora_lightning.federation.loop import FederatedLoop
from flora_lightning.flower.app_config import FlowerRunConfig, build_components
from flora_lightning.flower.reply_checks import BadReply, bounded, count, real
from flora_lightning.flower.secagg_config import SecAggConfig, split_run_config
from flora_lightning.flower.server_strategy import PARTITION_KEY
from flora_lightning.rundir.round_record import RoundTally
from flora_lightning.strategy import ClientUpdate, FedAvg, FedProx
from flora_lightning.strategy.base import SAMPLE_COUNT_LIMIT

log = logging.getLogger(__name__)

MASK_BYTES = np.dtype(np.int64).itemsize
"""Bytes of one masked value (Flower's masks are int64)."""


def masked_bytes(parameters: Parameters) -> int:
    """Bytes of one client's masked vector: an int64 per value plus the weight factor."""
    values = sum(a.size for a in parameters_to_ndarrays(parameters))
    return MASK_BYTES * (values + 1)


class SecAggFedAvg(LegacyFedAvg):
    """Flower's legacy FedAvg driving flora's round engine; SecAgg+ hands it only the sum.

    Args:
        loop: the launched :class:`~flora_lightning.federation.loop.FederatedLoop` (the round engine).
        names: the communicated tensors' names, in the order the arrays travel.
        num_clients: partitions, one node each.
        min_clients: fewest clients whose masked vectors enter the sum for a round to count.
        round_offset: rounds already done (a resumed run): Flower's round ``r`` is the run's
            round ``r + round_offset`` (train config, so the clients' seeds; tallies; records).
    """

    def __init__(
        self,
        loop: FederatedLoop,
        names: list[str],
        num_clients: int,
        min_clients: int,
        round_offset: int = 0,
    ) -> None:
        per_round = loop.clients_per_round(num_clients)
        super().__init__(
            fraction_fit=loop.join_ratio,
            fraction_evaluate=0.0,  # evaluation is central, on the global test set
            min_fit_clients=per_round,
            min_evaluate_clients=0,
            min_available_clients=num_clients,
            on_fit_config_fn=lambda server_round: {"server-round": server_round + round_offset},
        )
        self.round_offset = round_offset
        self.loop = loop
        self.names = names
        self.num_clients = num_clients
        self.everyone = per_round == num_clients
        self.min_clients = min_clients
        self.reports: dict[int, RoundTally] = {}
        """Round -> its tally (what the server knows of the round)."""

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        """The loop's seeded initial state (as ``flora fit`` starts from)."""
        state = self.loop.model.communicated_state()
        return ndarrays_to_parameters([state[name].cpu().numpy() for name in self.names])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Flower's sampling; starts the round's tally (partitions are learnt from replies
        unless every client trains)."""
        round_ = server_round + self.round_offset
        instructions = super().configure_fit(server_round, parameters, client_manager)
        clients = list(range(self.num_clients)) if self.everyone else []
        tally = self.loop.begin_round(round_, clients)
        sent = sum(a.nbytes for a in parameters_to_ndarrays(parameters)) * len(instructions)
        self.loop.record_sent(tally, sent)
        self.reports[round_] = tally
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The unmasked weighted mean SecAgg+ put in every result (the same object); each
        client recorded by the loop's ``record_update`` (its masked vector's bytes, its fit
        seconds), the round closed by ``close_round`` (``trainer.on_too_few_updates``).

        A reply's clear fields are read through :mod:`~flora_lightning.flower.reply_checks`:
        one that does not parse (or repeats a partition) is recorded as rejected with a
        bounded reason, never raised; its masked vector is in the sum all the same (SecAgg+
        hides whose is whose). A mean that is not finite in the model's dtype is not applied."""
        round_ = server_round + self.round_offset
        tally = self.reports.setdefault(round_, RoundTally(round=round_))
        rejected = {}
        for i, reason in enumerate(dict.fromkeys(str(f) for f in failures)):  # repeats: once
            rejected[f"failure {i}"] = reason
            log.warning("round %d: a client dropped out of SecAgg+: %s", round_, reason)
        accepted = []
        for i, (_, res) in enumerate(results):
            try:  # a reply's clear fields are another party's: read through the checks
                client = count(res.metrics.get(PARTITION_KEY), PARTITION_KEY,
                               maximum=self.num_clients - 1)  # fmt: skip
                samples = count(res.num_examples, "num-examples", minimum=1,
                                maximum=SAMPLE_COUNT_LIMIT)  # fmt: skip
                seconds = real(res.metrics.get("train-seconds", 0.0), "train-seconds", 0.0)
                if client in accepted:
                    raise BadReply(f"a second reply for partition {client}")
            except (BadReply, AttributeError, TypeError) as err:
                # its masked vector is already in the sum (SecAgg+ hides which is whose)
                reason = bounded(f"its clear fields are unusable ({err}); its masked vector "
                                 "entered the sum, which SecAgg+ cannot take apart")  # fmt: skip
                rejected[f"reply {i}"] = reason
                log.warning("round %d: reply %d: %s", round_, i, reason)
                continue
            accepted.append(client)
            # The server sees no individual state: only the id, samples and seconds in clear.
            update = ClientUpdate(client, {}, samples, float("nan"))
            self.loop.record_update(tally, update, seconds, masked_bytes(res.parameters))
        metrics: dict[str, Scalar] = {"num-accepted": len(results), "num-failures": len(failures)}
        mean = None
        if results:
            dtypes = [t.dtype for t in self.loop.model.communicated_state().values()]
            mean = [
                torch.from_numpy(a).to(dtype).numpy()
                for a, dtype in zip(
                    parameters_to_ndarrays(results[0][1].parameters), dtypes, strict=True
                )
            ]
            if not all(np.isfinite(a).all() for a in mean):  # e.g. 1e39 in float64, Inf in fp32
                for client in accepted:
                    rejected[str(client)] = "the unmasked mean is not finite in the model's dtype"
                accepted = []
        clients = None if self.everyone else accepted  # who trained: known from the replies
        if not self.loop.close_round(tally, accepted, rejected, self.min_clients, clients):
            return None, metrics
        return ndarrays_to_parameters(mean), metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """The loop's ``end_round`` on the global parameters: evaluate, record, checkpoint.
        Flower's initial evaluation (round 0) is skipped: the run sequence evaluated round 0
        before the workflow started (or restored it)."""
        if server_round == 0:
            return None
        round_ = server_round + self.round_offset
        arrays = parameters_to_ndarrays(parameters)
        state = {n: torch.from_numpy(np.array(a)) for n, a in zip(self.names, arrays, strict=True)}
        self.loop.model.load_communicated_state(state)
        tally = self.reports.get(round_, RoundTally(round=round_))
        record = self.loop.end_round(tally)
        return record.test_loss, {"test-acc": record.test_acc}


def check_supported(loop: FederatedLoop, num_clients: int) -> None:
    """Refuse, naming the field, what SecAgg+ cannot aggregate."""
    if type(loop.strategy) not in (FedAvg, FedProx):
        raise ValueError(
            f"trainer.strategy={type(loop.strategy).__name__} needs the individual updates; "
            "secure aggregation (SecAgg+) only yields their weighted sum: use FedAvg or FedProx."
        )
    if loop.privacy_run is not None and loop.privacy_run.privacy.level == "client":
        raise ValueError(
            "privacy.level=client clips each update on the server, which SecAgg+ hides: use "
            "privacy.level=sample (clipping and noise on the client) with secure aggregation."
        )
    if loop.clients_per_round(num_clients) < 2:
        raise ValueError(
            f"SecAgg+ needs at least 2 clients per round (data.partition.num_clients="
            f"{num_clients}, trainer.join_ratio={loop.join_ratio}): raise either."
        )


def serve(grid: Grid, context: Context, run: FlowerRunConfig, secagg: SecAggConfig) -> dict:
    """Run (or, with ``trainer.resume``, continue) the federated rounds of ``run`` with SecAgg+
    on ``grid``; returns the summary."""
    parts = build_components(run)
    loop, model, data = parts.loop, parts.model, parts.data
    check_supported(loop, data.num_clients)  # before the run directory is written

    def rounds(done: int) -> None:
        largest = max(data.num_samples(c) for c in range(data.num_clients))
        if secagg.max_weight and secagg.max_weight < largest:
            raise ValueError(
                f"secagg-max-weight={secagg.max_weight} is below the largest partition "
                f"({largest} samples): its weight would exceed 1 and may overflow; raise it or "
                "set 0 (auto)."
            )
        if done >= loop.rounds:
            return
        max_weight = secagg.max_weight or float(largest)
        strategy = SecAggFedAvg(
            loop, list(model.communicated_state()), data.num_clients, parts.min_clients, done
        )
        config = ServerConfig(num_rounds=loop.rounds - done)
        legacy = LegacyContext(context=context, config=config, strategy=strategy)
        workflow = DefaultWorkflow(fit_workflow=secagg.workflow(max_weight))
        log.info("SecAgg+ with max_weight=%s (%s)", max_weight, secagg)
        workflow(grid, legacy)

    # the test set only: the clients train (and cache) on the nodes
    return loop.run(model, data, rounds, parts.config_yaml, cache_clients=[])


def make_secagg_server_app(defaults: dict | None = None) -> ServerApp:
    """The SecAgg+ ServerApp; its run config falls back to ``defaults`` (``run_simulation``)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        flora, secagg = split_run_config({**(defaults or {}), **context.run_config})
        serve(
            grid,
            context,
            FlowerRunConfig.from_run_config(flora),
            SecAggConfig.from_run_config(secagg),
        )

    return server


app = make_secagg_server_app()
