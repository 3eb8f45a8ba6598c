"""The Flower ``ServerApp``: flora's rounds, aggregation, evaluation and outputs on a Flower Grid.

Reads the same YAML as ``flora fit`` and drives the same round engine (the YAML's
:class:`~flora_lightning.federation.loop.FederatedLoop`), with the nodes training instead of the loop::

    RoundEngine.run: open the run directory (seeded setup), restore with trainer.resume,
    end_round(0): evaluate, record → initial arrays = model.communicated_state()
    → per round: FloraFedAvg.configure_train → engine.begin_round; the connected nodes
      holding the partitions the loop's seeded sampler picks train (all partitions at
      join_ratio 1) → every reply: engine.record_update, trainer.strategy.add
      → engine.close_round → the aggregate → end_round: evaluate on the global test set,
      RunRecorder (TensorBoard, summary.json, checkpoints/round_XXX.safetensors)
    → finish: final/ adapter

Any :class:`~flora_lightning.strategy.Strategy` in ``trainer.strategy`` aggregates, through
its public methods (``begin``, ``add``, ``result``, ``accepted``, ``rejected``). The run
directory has the in-process loop's layout and keys (``bytes_up``/``bytes_down`` come from the
ArrayRecords actually sent and received).

Dead SuperNodes: a round waits at most ``node-wait-seconds`` (run config) for the nodes of its
partitions, then trains with those connected; the others are recorded per round in
``rejected_clients`` ("node not connected: ..."), and a restarted SuperNode trains again from
the next round on. A round with fewer than ``min-clients`` accepted updates follows
``trainer.on_too_few_updates``, as in ``flora fit``: ``raise`` (the default) stops the run with
the last complete round saved (resume it), ``skip`` records the round unaggregated, the global
state that of the round before, and the run goes on.

Node-local data (run config ``node-data = true``): every SuperNode trains on its own data
(:mod:`~flora_lightning.flower.node_data`) and the server opens no training data
(:class:`~flora_lightning.flower.server_data.ServerSideData`): class names and template from
the YAML, its own test set if configured, sample counts from the updates, label counts only
from nodes that share them (label_table.txt is rewritten as they do). With the
:class:`~flora_lightning.callbacks.FederatedEvaluation` callback the nodes evaluate each
round's global model on their own test sets (:class:`~flora_lightning.flower.node_evaluation.
NodeEvaluation`).

Client-level DP (``privacy.level client``): the strategy is wrapped in Flower's own DP wrapper,
clipping on the server or, with the run config's ``dp-clipping = "client"``, on the nodes
(:mod:`flora_lightning.flower.dp`), with the same seeded noise as ``flora fit``.

Resume: with ``resume = true`` (or ``--trainer.resume true`` in ``overrides``) a ServerApp
started on the run directory of an interrupted run restores its last complete round
(:meth:`RoundEngine.restore <flora_lightning.federation.engine.RoundEngine.restore>`) and runs the rounds
after it, numbered as in the uninterrupted run (Flower's rounds are offset by the rounds done),
so the clients' seeds per ``(seed, round, client)`` are the same. The clients' optimizer
states live on the nodes (:mod:`~flora_lightning.flower.optimizer_store`).
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flora_lightning.callbacks.federated import FederatedEvaluation
from flora_lightning.federation.loop import FederatedLoop
from flora_lightning.flower.app_config import FlowerRunConfig, build_components
from flora_lightning.flower.arrays import to_state
from flora_lightning.flower.node_evaluation import NodeEvaluation
from flora_lightning.flower.server_data import ServerSideData
from flora_lightning.flower.server_strategy import FloraFedAvg
from flora_lightning.privacy.client_dp import DPFedAvg
from flora_lightning.rundir.checkpoint import write_text
from flora_lightning.rundir.round_record import RoundTally

log = logging.getLogger(__name__)


class GlobalEvaluation:
    """Flower's ``evaluate_fn``: the loop's ``end_round`` on the global arrays of a round.

    Flower counts a resumed run's rounds from 1 again; ``strategy.round_offset`` maps them
    back to the run's rounds. Flower's initial evaluation ("round 0") is skipped: the run
    sequence (:meth:`~flora_lightning.federation.engine.RoundEngine.run`) evaluated round 0
    before the strategy started, or restored it.
    """

    def __init__(self, loop: FederatedLoop, strategy: FloraFedAvg) -> None:
        self.loop = loop
        self.strategy = strategy

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        round_ = server_round + self.strategy.round_offset
        self.loop.model.load_communicated_state(to_state(arrays))
        tally = self.strategy.reports.get(round_, RoundTally(round=round_))
        record = self.loop.end_round(tally)
        return MetricRecord({"test-acc": record.test_acc, "test-loss": record.test_loss})


def serve(grid: Grid, run: FlowerRunConfig, timeout: float = 3600.0) -> dict:
    """Run (or, with ``trainer.resume``, continue) the federated rounds of ``run`` on ``grid``;
    returns the summary (as summary.json)."""
    parts = build_components(run)
    loop, model, data = parts.loop, parts.model, parts.data
    needed = any(getattr(c, "needs_client_data", False) for c in loop.callbacks)
    if run.node_data:  # the nodes keep their data: the server opens its test set only
        if needed:
            raise ValueError(
                "run config node-data = true: the server holds no client data, so "
                "PersonalizedEvaluation cannot run on it; use "
                "flora_lightning.callbacks.FederatedEvaluation (the nodes evaluate)."
            )
        data = ServerSideData(data)

    def shared_counts(shared: dict) -> None:  # label counts the nodes chose to share
        data.shared.update(shared)
        table = loop.recorder.shown_label_table(data.label_table())
        write_text(table + "\n", loop.run_dir / "label_table.txt")

    def rounds(done: int) -> None:  # after the restored round ``done`` (0: a new run)
        strategy = FloraFedAvg(
            min_clients=parts.min_clients,
            average=loop.strategy,  # the YAML's trainer.strategy: its state is what resume saves
            engine=loop,
            # The same seeded clients per round as ``flora fit`` (all of them at join_ratio 1).
            select_clients=loop.round_clients,
            node_wait_seconds=run.node_wait_seconds,
            round_offset=done,
            node_reports=shared_counts if run.node_data else None,
            partition_nodes=run.bound_nodes(),
            # simulated partitions: the server knows each one's size and refuses other claims
            # (not under trainer.attack, whose num_samples attack is what it simulates)
            known_num_samples=None if run.node_data or loop.attack else data.num_samples,
        )
        for callback in loop.callbacks:  # the nodes evaluate on their own test sets
            if isinstance(callback, FederatedEvaluation):
                callback.evaluator = NodeEvaluation(strategy)
        outer = strategy
        if isinstance(loop.strategy, DPFedAvg):  # Flower clips and noises (restored bound)
            from flora_lightning.flower.dp import with_flower_dp

            outer = with_flower_dp(strategy, loop.strategy, run.dp_clipping)
        outer.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.communicated_state()),
            num_rounds=max(0, loop.rounds - done),
            timeout=timeout,
            evaluate_fn=GlobalEvaluation(loop, strategy),
        )

    # The test set only (clients train), unless a callback evaluates clients' own data here
    # (PersonalizedEvaluation: from the same dataset the server holds for the global test set).
    cached = list(range(data.num_clients)) if needed else []
    return loop.run(model, data, rounds, parts.config_yaml, cache_clients=cached)


def make_server_app(defaults: dict | None = None) -> ServerApp:
    """A ServerApp whose run config falls back to ``defaults`` (for ``run_simulation``)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, FlowerRunConfig.from_run_config(context.run_config, defaults))

    return server


app = make_server_app()
