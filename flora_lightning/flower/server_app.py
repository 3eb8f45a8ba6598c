"""The Flower ``ServerApp``: flora's rounds, aggregation, evaluation and outputs on a Flower Grid.

Reads the same YAML as ``flora fit`` and runs the loop's server half:

    seeded setup (FederatedLoop.open_run) → initial arrays = model.communicated_state()
    → evaluate round 0 → for each round: the nodes are sampled (all of them, or with
    join_ratio < 1 those holding the partitions the loop's seeded sampler picks) and sent
    the global arrays
    → FloraFedAvg aggregates the replies (flora FedAvg) → evaluate on the global test set
    → TensorBoard scalars, summary.json, checkpoints/round_XXX.safetensors → final/ adapter

The run directory has the in-process loop's layout and keys (``bytes_up``/``bytes_down``
come from the ArrayRecords actually sent and received). Resuming is not supported here.
"""

from __future__ import annotations

import copy
import logging
import time

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flora_lightning.flower.app_config import FlowerRunConfig, build_components
from flora_lightning.flower.strategy import FloraFedAvg, to_state
from flora_lightning.strategy import ClientUpdate

log = logging.getLogger(__name__)


def serve(grid: Grid, run: FlowerRunConfig, timeout: float = 3600.0) -> dict:
    """Run the federated rounds of ``run`` on ``grid``; returns the summary (as summary.json)."""
    parts = build_components(run)
    loop, model, data = parts.loop, parts.model, parts.data
    loop.open_run(model, data, parts.config_yaml)  # same seeded init as ``flora fit``
    loop.cache_image_features(model, data, clients=[])  # the test set only: clients train
    fabric = loop.fabric
    fabric.call("on_fit_start", loop=loop, model=model)

    def on_round_start(round_: int) -> None:  # before the round's clients train
        loop.round = round_
        fabric.call("on_round_start", loop=loop, round=round_, clients=[])

    def on_client_update(round_: int, update: ClientUpdate) -> None:
        fabric.call("on_client_fit_end", loop=loop, model=model, update=update)

    strategy = FloraFedAvg(
        min_clients=parts.min_clients,
        average=copy.copy(loop.strategy),  # the YAML's trainer.strategy, as flora fit runs it
        fraction_train=loop.join_ratio,
        min_train_nodes=loop.clients_per_round(data.num_clients),
        min_available_nodes=data.num_clients,
        on_client_update=on_client_update,
        on_round_start=on_round_start,
        # With join_ratio < 1, the same seeded clients per round as ``flora fit``.
        select_clients=(
            (lambda round_: loop.sample_clients(round_, data.num_clients))
            if loop.join_ratio < 1
            else None
        ),
    )

    def evaluate(round_: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_communicated_state(to_state(arrays))
        t_eval = time.perf_counter()
        metrics = loop.evaluate(data)
        if round_ == 0:
            loop.record_round(0, metrics, seconds=0.0, up=0, down=0, losses={})
        else:
            report = strategy.reports[round_]
            metrics["eval_seconds"] = time.perf_counter() - t_eval
            metrics["train_seconds"] = report.train_seconds
            loop.round = round_
            loop.record_round(
                round_,
                metrics,
                time.perf_counter() - report.started,
                report.bytes_up,
                report.bytes_down,
                report.train_loss,
                accepted=report.accepted,
                rejected=report.rejected,
            )
            loop.save_round(round_, model)
        return MetricRecord({"test-acc": metrics["test_acc"], "test-loss": metrics["test_loss"]})

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.communicated_state()),
        num_rounds=loop.rounds,
        timeout=timeout,
        evaluate_fn=evaluate,
    )
    return loop.finish(model, data)


def make_server_app(defaults: dict | None = None) -> ServerApp:
    """A ServerApp whose run config falls back to ``defaults`` (for ``run_simulation``)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, FlowerRunConfig.from_run_config(context.run_config, defaults))

    return server


app = make_server_app()
