"""``RoundEngine``: the round steps every runtime shares, on top of a launched Fabric.

A federated round, whoever drives it::

    begin_round(round, clients) → client_update(...) per arriving update
    → (the strategy aggregates) → end_round: evaluate, RunRecorder.record, checkpoint

:class:`~flora_lightning.federation.loop.FederatedLoop` drives it in-process (clients one after another);
the Flower ServerApp's :class:`~flora_lightning.flower.server_strategy.FloraFedAvg` drives it from the
replies of the nodes. Both therefore fire the same callbacks, evaluate the same way and write
the same run directory.
"""

from __future__ import annotations

import time

from flora_lightning.client_state.optimizer_shards import (
    optimizer_state_shards,
    unflatten_optimizer_states,
)
from flora_lightning.clip.feature_cache import FeatureCache
from flora_lightning.federation.evaluation import evaluate
from flora_lightning.federation.ranks import (
    RankMask,
    assign_ranks,
    check_rank_run,
    padded_state,
    sliced_update,
)
from flora_lightning.federation.setup import setup_run
from flora_lightning.privacy.config import PrivacyConfig
from flora_lightning.privacy.run import PrivacyRun
from flora_lightning.rundir.checkpoint import load_state, write_json
from flora_lightning.rundir.round_record import RoundRecord, RoundTally
from flora_lightning.strategy import ClientUpdate, State, for_rank, state_bytes


class RoundEngine:
    """Set-up, the per-round steps and the run's end; subclasses hold the settings.

    Expects ``recorder`` (a :class:`~flora_lightning.rundir.recorder.RunRecorder`), ``callbacks``,
    ``strategy`` and the ``trainer.*`` settings :func:`~flora_lightning.federation.setup.setup_run` reads.
    """

    availability = None
    """Simulated unreliable clients (:class:`~flora_lightning.federation.availability.Availability`)."""
    privacy_run: PrivacyRun | None = None
    """The run's differential privacy (:meth:`use_privacy`); None: none."""
    client_ranks = None
    """``trainer.client_ranks`` (:mod:`flora_lightning.federation.ranks`); None: one rank."""
    ranks: list[int] | None = None
    """Each client's LoRA rank, resolved at :meth:`set_up`; None: all at the model's."""
    _rank_mask: RankMask | None = None

    def use_privacy(self, privacy: PrivacyConfig) -> None:
        """Train with ``privacy`` (``--privacy.*``; level none changes nothing). Call before
        :meth:`set_up`: its callback joins the loop's."""
        self.privacy_run = PrivacyRun(privacy) if privacy.enabled else None
        self.recorder.client_stats = privacy.releases_client_stats
        if self.privacy_run is not None:
            self.callbacks.append(self.privacy_run)

    @property
    def run_dir(self):
        return self.recorder.run_dir

    @property
    def history(self) -> list[RoundRecord]:
        return self.recorder.history

    # ================================================================ setup
    def set_up(self, model, data, tensorboard: bool = True) -> None:
        """Fabric, data, model and :attr:`trainer`, in the order that fails fastest on bad input
        (a Flower client passes ``tensorboard=False``: it writes nothing). With privacy, its
        level is checked first and set up last (strategy or local step, accountant)."""
        if self.privacy_run is not None:
            self.privacy_run.check(self, model)
        self.ranks = assign_ranks(self.client_ranks, data.num_clients, self.seed)
        if self.ranks is not None:
            check_rank_run(self.ranks, model, self.strategy, self.privacy_run is not None)
        setup_run(self, model, data, [self.recorder.tensorboard()] if tensorboard else [])
        self.recorder.callbacks = self.callbacks
        if self.privacy_run is not None:
            self.privacy_run.setup(self)

    def open_run(self, model, datamodule, config_yaml: str | None = None) -> None:
        """Check the run directory, set everything up, then write config and label table.

        Everything that can fail on bad input runs before the first file is written.
        """
        self.recorder.check(config_yaml)
        self.set_up(model, datamodule)
        self.recorder.open(config_yaml, datamodule.label_table())

    def cache_image_features(self, model, datamodule, clients: list[int], test: bool = True):
        """Frozen-feature caching of ``clients`` (and the test set), when the method allows it
        (a ClientApp caches only its partition, the ServerApp only the test set)."""
        if not (self.cache_features and model.image_encoder_frozen):
            return
        t0 = time.perf_counter()
        cache = self.feature_cache
        if cache is None or cache.model is not model or cache.data is not datamodule:
            cache = FeatureCache(self.fabric, model, datamodule, self.feature_cache_dir)
        cache.build(clients, test=test)  # added to what it holds (a ClientApp's partitions)
        self.feature_cache = cache
        if self.release_image_encoder:
            model.release_image_encoder()
        self.recorder.caching_seconds = time.perf_counter() - t0
        self.fabric.print(f"Cached image features in {self.recorder.caching_seconds:.1f}s.")

    # ======================================================== round engine
    def begin_round(self, round_: int, clients: list[int]) -> RoundTally:
        """Start a round's tally and the callbacks' ``on_round_start``."""
        self.round = round_
        tally = RoundTally(round=round_, clients=list(clients))
        self.fabric.call("on_round_start", loop=self, round=round_, clients=tally.clients)
        return tally

    def client_steps(self, tally: RoundTally, client: int) -> int | None:
        """The local steps ``client`` runs this round under ``trainer.availability``: 0 when it
        drops out (recorded), a straggler's share (recorded), None for a full fit."""
        if self.availability is None:
            return None
        full = self.trainer.planned_steps(self.datamodule.num_samples(client),
                                          self.datamodule.batch_size)  # fmt: skip
        event = self.availability.draw(self.seed, tally.round, client, full)
        if event.dropped:
            tally.dropped[str(client)] = event.reason
        elif event.kind == "straggler":
            tally.stragglers[str(client)] = event.steps
        return event.steps

    def client_rank(self, client: int) -> int | None:
        """``client``'s LoRA rank when it differs from the global model's, else None."""
        if self.ranks is None or self.ranks[client] == self.model.lora.rank:
            return None
        return self.ranks[client]

    def prepare_client(self, global_state: State, client: int) -> None:
        """Load what ``client`` starts its fit from into the model: ``global_state`` (the
        global state, or a rank-``r_k`` slice of it), for a lower-rank client zero-padded
        beyond its rank with those slots' gradients masked until :meth:`client_state_to_send`
        (see :mod:`flora_lightning.federation.ranks`)."""
        if self._rank_mask is not None:
            self._rank_mask.remove()
            self._rank_mask = None
        rank = self.client_rank(client)
        if rank is None:
            self.model.load_communicated_state(global_state)
            return
        params = dict(self.model.trainable_named_parameters())
        self.model.load_communicated_state(padded_state(global_state, rank, params))
        self._rank_mask = RankMask(params, rank)

    def client_state_to_send(self, update: ClientUpdate) -> ClientUpdate:
        """What the client sends after its fit: ``update`` cut to its rank (whole at the
        global rank); takes the gradient mask of :meth:`prepare_client` off."""
        if self._rank_mask is not None:
            self._rank_mask.remove()
            self._rank_mask = None
        rank = self.client_rank(update.client_id)
        return update if rank is None else sliced_update(update, rank)

    def state_for_client(self, global_state: State, client: int) -> State:
        """The part of ``global_state`` ``client`` receives: its rank's slice (views)."""
        rank = self.client_rank(client)
        return global_state if rank is None else for_rank(global_state, rank)

    def client_update(self, tally: RoundTally, update: ClientUpdate, seconds: float) -> None:
        """A client's update arrived: callbacks' ``on_client_fit_end``, traffic and loss."""
        self.fabric.call("on_client_fit_end", loop=self, model=self.model, update=update)
        sent = state_bytes(update.state)
        tally.bytes_up += sent
        tally.client_bytes_up[update.client_id] = sent
        tally.train_loss[update.client_id] = update.train_loss
        tally.train_seconds += seconds

    def end_round(self, tally: RoundTally) -> RoundRecord:
        """Evaluate the global model; record the round; save it (rounds after 0)."""
        t0 = time.perf_counter()
        metrics = evaluate(self.fabric, self.model, self.feature_cache or self.datamodule,
                           len(self.datamodule.class_names))  # fmt: skip
        if tally.round > 0:
            metrics["eval_seconds"] = time.perf_counter() - t0
            metrics["seconds"] = time.perf_counter() - tally.started
        record = self.recorder.record(self.fabric, self, tally, metrics)
        self.fabric.call("on_round_end", loop=self, round=tally.round, record=record)
        if tally.round > 0:
            self.recorder.save(tally.round, self.model, *self.resume_state())
        return record

    def resume_state(self) -> tuple[dict, dict]:
        """What a resumed run needs besides the global state and history: the clients'
        optimizer states, the strategy's server state (e.g. FedAdam's moments) as tensors, and
        the precision plugin's state (the 16-mixed GradScaler's scale and growth tracker)."""
        states = {
            "optimizers": optimizer_state_shards(self.trainer.optimizer_states),
            "strategy": self.strategy.state_dict(),
        }
        meta = {"precision": self.fabric.strategy.precision.state_dict()}
        if self.privacy_run is not None:
            meta["privacy"] = self.privacy_run.state_dict()
        return states, meta

    def restore(self) -> int:
        """Load the last complete round; returns it (0 when there is nothing to resume)."""
        round_, global_state, states, meta = self.recorder.restore(("optimizers", "strategy"))
        if round_ == 0:
            self.fabric.print(
                f"trainer.resume: nothing to resume in {self.run_dir}; starting a new run."
            )
            return 0
        self.model.load_communicated_state(global_state)
        self.trainer.optimizer_states = unflatten_optimizer_states(states["optimizers"])
        self.strategy.load_state_dict(states.get("strategy", {}))
        if meta.get("precision"):
            self.fabric.strategy.precision.load_state_dict(meta["precision"])
        if self.privacy_run is not None:
            self.privacy_run.load_state_dict(meta["privacy"])
        self.fabric.print(f"Resuming {self.run_dir} after round {round_}.")
        return round_

    def summary(self, model=None) -> dict:
        return self.recorder.summary(model or self.model, loop=self)

    def finish(self) -> dict:
        """Callbacks' ``on_fit_end``, the exported final model, summary.json; returns it."""
        summary = self.summary()
        self.fabric.call("on_fit_end", loop=self, model=self.model, summary=summary)
        self.recorder.finish(self.model, summary)
        for logger in self.fabric.loggers:
            logger.finalize("success")
        self.fabric.print(
            f"Done: final test acc {summary['final_test_acc']:.4f}, best "
            f"{summary['best_test_acc']:.4f} (round {summary['best_round']}); outputs in "
            f"{self.run_dir}"
        )
        return summary

    # ===================================================== evaluate only
    def validate(self, model, datamodule, ckpt_path: str | None = None) -> dict:
        return self._evaluate_only(model, datamodule, ckpt_path, "validate")

    def test(self, model, datamodule, ckpt_path: str | None = None) -> dict:
        return self._evaluate_only(model, datamodule, ckpt_path, "test")

    def _evaluate_only(self, model, datamodule, ckpt_path, stage: str) -> dict:
        self.set_up(model, datamodule)
        if ckpt_path:
            model.load_communicated_state(load_state(ckpt_path))
        metrics = evaluate(self.fabric, model, datamodule, len(datamodule.class_names))
        result = {"stage": stage, "method": model.method_name, "ckpt_path": ckpt_path, **metrics}
        write_json(result, self.run_dir / f"{stage}.json")
        self.fabric.print(result)
        return result
