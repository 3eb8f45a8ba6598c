"""``RoundEngine``: the run and the round steps every runtime shares, on top of a launched Fabric.

A run, whoever drives it (:meth:`RoundEngine.run`)::

    open the run directory → restore (trainer.resume) → cache features → on_fit_start
    → round 0 (evaluation) → the rounds → finish (final model, summary.json)

A federated round::

    begin_round(round, clients) → record_update(...) per arriving update (record_dropped,
    record_straggler, record_rejected for those that sent none or failed) → (the strategy
    aggregates) → close_round: too few updates raise or skip (trainer.on_too_few_updates)
    → end_round: evaluate, RunRecorder.record, checkpoint

:class:`~flora_lightning.federation.loop.FederatedLoop` drives it in-process (clients one after
another); the Flower ServerApp's :class:`~flora_lightning.flower.server_strategy.FloraFedAvg`
and the SecAgg+ ServerApp's :class:`~flora_lightning.flower.secagg_server.SecAggFedAvg` drive it
from the replies of the nodes. The engine is the only writer of a
:class:`~flora_lightning.rundir.round_record.RoundTally`, so all three fire the same callbacks,
apply the same failure policy, evaluate the same way and write the same run directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from flora_lightning.client_state.optimizer_shards import (
    optimizer_state_shards,
    unflatten_optimizer_states,
)
from flora_lightning.clip.feature_cache import FeatureCache
from flora_lightning.federation.attack import AttackRecord
from flora_lightning.federation.client_view import ClientView
from flora_lightning.federation.evaluation import evaluate
from flora_lightning.federation.ranks import assign_ranks, check_rank_run
from flora_lightning.federation.setup import OnTooFewUpdates, check_on_too_few_updates, setup_run
from flora_lightning.privacy.config import PrivacyConfig
from flora_lightning.privacy.run import PrivacyRun
from flora_lightning.rundir.checkpoint import load_state, write_json
from flora_lightning.rundir.round_record import RoundRecord, RoundTally
from flora_lightning.strategy import ClientUpdate, state_bytes

log = logging.getLogger(__name__)


class RoundFailedError(RuntimeError):
    """Too few client updates were accepted for a round to change the global state (and
    ``trainer.on_too_few_updates`` is ``raise``)."""


class RoundEngine(ClientView):
    """Set-up, the run sequence, the per-round steps and the run's end; subclasses hold the
    settings.

    A subclass (:class:`~flora_lightning.federation.loop.FederatedLoop`) sets ``recorder`` (a
    :class:`~flora_lightning.rundir.recorder.RunRecorder`), ``strategy`` and the ``trainer.*``
    settings :func:`~flora_lightning.federation.setup.setup_run` reads. A bare engine (no
    Fabric, no run directory) only keeps tallies, with the same policy: what a Flower strategy
    uses when no loop drives it.

    Args:
        on_too_few_updates: ``trainer.on_too_few_updates`` (see :meth:`close_round`).
    """

    availability = None
    """Simulated unreliable clients (:class:`~flora_lightning.federation.availability.Availability`)."""
    privacy_run: PrivacyRun | None = None
    """The run's differential privacy (:meth:`use_privacy`); None: none."""
    client_ranks = None
    """``trainer.client_ranks`` (:mod:`flora_lightning.federation.ranks`); None: one rank."""

    def __init__(self, on_too_few_updates: OnTooFewUpdates = "raise") -> None:
        check_on_too_few_updates(on_too_few_updates)
        self.on_too_few_updates = on_too_few_updates
        self.fabric = self.model = self.datamodule = self.local_trainer = None  # set_up sets them
        self.recorder = None
        self.callbacks: list = []
        self.round = 0

    def use_privacy(self, privacy: PrivacyConfig) -> None:
        """Train with ``privacy`` (``--privacy.*``; level none changes nothing). Call before
        :meth:`set_up`: its callback joins the loop's."""
        self.privacy_run = PrivacyRun(privacy) if privacy.enabled else None
        self.recorder.client_stats = privacy.releases_client_stats
        if self.privacy_run is not None:
            self.callbacks.append(self.privacy_run)

    @property
    def run_dir(self):
        return None if self.recorder is None else self.recorder.run_dir

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
        if self.attack is not None and not any(isinstance(c, AttackRecord) for c in self.callbacks):
            self.callbacks.append(AttackRecord(self.attack))
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

    def run(
        self,
        model,
        datamodule,
        rounds: Callable[[int], object],
        config_yaml: str | None = None,
        cache_clients: list[int] | None = None,
    ) -> dict:
        """The run sequence of every runtime; returns the summary (as summary.json).

        Opens the run directory (:meth:`open_run`), restores the last complete round with
        ``trainer.resume`` (:meth:`restore`), caches the image features of ``cache_clients``
        (None: every client; a ServerApp passes ``[]``, the test set only), fires
        ``on_fit_start``, evaluates round 0 (a new run only), calls ``rounds(done)`` to run
        the rounds after ``done`` (the in-process loop's, or a Flower strategy's, numbered as
        the run's), then :meth:`finish`. The run directory's lock is held from opening it to
        the end, also when the run fails (:mod:`flora_lightning.rundir.lock`).
        """
        self.open_run(model, datamodule, config_yaml)
        try:
            shown = self.recorder.shown_label_table(datamodule.label_table())
            self.fabric.print(f"Client label counts:\n{shown}")
            if self.ranks is not None:
                self.fabric.print(f"Client LoRA ranks: {self.ranks}")
            done = self.restore() if self.resume else 0
            if cache_clients is None:
                cache_clients = list(range(datamodule.num_clients))
            self.cache_image_features(model, datamodule, cache_clients)
            self._call("on_fit_start", loop=self, model=model)
            if done == 0:
                self.end_round(RoundTally(round=0))
            rounds(done)
            return self.finish()
        finally:
            self.recorder.close()

    # ======================================================== round engine
    def _call(self, hook: str, **kwargs) -> None:
        """The callbacks' ``hook`` (none on a bare engine, which has no Fabric)."""
        if self.fabric is not None:
            self.fabric.call(hook, **kwargs)

    def begin_round(self, round_: int, clients: list[int]) -> RoundTally:
        """Start a round's tally and the callbacks' ``on_round_start``."""
        self.round = round_
        tally = RoundTally(round=round_, clients=list(clients))
        self._call("on_round_start", loop=self, round=round_, clients=tally.clients)
        return tally

    def record_sent(self, tally: RoundTally, bytes_down: int) -> None:
        """The bytes of the global state (or each client's rank slice) sent this round."""
        tally.bytes_down = bytes_down

    def record_dropped(self, tally: RoundTally, client: int, reason: str) -> None:
        """``client`` sent nothing this round (``trainer.availability``: dropout, deadline)."""
        tally.dropped[str(client)] = reason

    def record_straggler(self, tally: RoundTally, client: int, steps: int) -> None:
        """``client`` ran only ``steps`` local steps this round (``trainer.availability``)."""
        tally.stragglers[str(client)] = steps

    def record_rejected(self, tally: RoundTally, who: str, reason: str) -> None:
        """``who`` (a client id, ``"node N"``, a SecAgg+ failure) is left out, and why."""
        tally.rejected[who] = reason

    def record_update(
        self,
        tally: RoundTally,
        update: ClientUpdate,
        seconds: float,
        masked_bytes: int | None = None,
    ) -> None:
        """A client's update arrived (before the strategy sees it): the callbacks'
        ``on_client_fit_end`` (only for an update the strategy's :meth:`Strategy.check` passes:
        the privacy accountant never sees a refused one), the bytes it sent, its loss and its
        fit ``seconds``.

        ``masked_bytes``: under SecAgg+ the server never sees ``update.state``, only the
        client's masked vector of this many bytes; then no callback sees the update and no
        loss is recorded (the loss stays on the node).
        """
        if masked_bytes is None:
            strategy = getattr(self, "strategy", None)  # callbacks see checked updates only
            if strategy is None or strategy.check(update) is None:
                self._call("on_client_fit_end", loop=self, model=self.model, update=update)
            sent = state_bytes(update.state)
            tally.train_loss[update.client_id] = update.train_loss
        else:
            sent = masked_bytes
        tally.bytes_up += sent
        tally.client_bytes_up[update.client_id] = sent
        tally.train_seconds += seconds

    def close_round(
        self,
        tally: RoundTally,
        accepted: list[int],
        rejected: Mapping[int | str, str],
        min_clients: int,
        clients: list[int] | None = None,
    ) -> bool:
        """Close the round's tally with the strategy's ``accepted`` and ``rejected`` clients
        (``clients``: who trained, when only the replies tell); True when it aggregates.

        With fewer than ``min_clients`` accepted updates the global state must stay as it
        was, and ``trainer.on_too_few_updates`` decides: ``raise`` stops the run (the last
        complete round stays saved) unless clients were dropped by the simulated
        ``trainer.availability`` (then the round is expected to come up short, on every
        runtime), ``skip`` records the round unaggregated and goes on.

        Raises:
            RoundFailedError: too few updates under ``raise``, naming the fields and the fix.
        """
        tally.accepted = sorted(accepted)  # arrival order varies
        tally.rejected.update({str(c): r for c, r in rejected.items()})
        if clients is not None:
            tally.clients = sorted(clients)
        if len(tally.accepted) >= min_clients:
            tally.aggregated = True
            return True
        if self.on_too_few_updates == "raise" and not tally.dropped:
            where = self.run_dir or "the run directory"
            raise RoundFailedError(
                f"round {tally.round}: {len(tally.accepted)} client update(s) accepted, fewer "
                f"than trainer.strategy.min_clients={min_clients}; rejected: {tally.rejected}. "
                f"The run stopped; {where} keeps the last complete round: fix the cause, then "
                "rerun with --trainer.resume true (or set --trainer.on_too_few_updates skip to "
                "record such rounds unaggregated and go on)."
            )
        log.error(
            "round %d not aggregated: %d update(s) accepted, fewer than min_clients=%d; the "
            "global state stays as it was. Rejected: %s; dropped: %s",
            tally.round, len(tally.accepted), min_clients, tally.rejected, tally.dropped,
        )  # fmt: skip
        return False

    def end_round(self, tally: RoundTally) -> RoundRecord:
        """Evaluate the global model; record the round; save it (rounds after 0)."""
        t0 = time.perf_counter()
        metrics = evaluate(self.fabric, self.model, self.feature_cache or self.datamodule,
                           len(self.datamodule.class_names))  # fmt: skip
        if tally.round > 0:
            metrics["eval_seconds"] = time.perf_counter() - t0
            metrics["seconds"] = time.perf_counter() - tally.started
        record = self.recorder.record(self.fabric, self, tally, metrics)
        self._call("on_round_end", loop=self, round=tally.round, record=record)
        if tally.round > 0:
            self.recorder.save(tally.round, self.model, *self.resume_state())
        return record

    def resume_state(self) -> tuple[dict, dict]:
        """What a resumed run needs besides the global state and history: the clients'
        optimizer states, the strategy's server state (e.g. FedAdam's moments) as tensors, and
        the precision plugin's state (the 16-mixed GradScaler's scale and growth tracker)."""
        states = {
            "optimizers": optimizer_state_shards(self.local_trainer.optimizer_states),
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
        self.local_trainer.optimizer_states = unflatten_optimizer_states(states["optimizers"])
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
        self._call("on_fit_end", loop=self, model=self.model, summary=summary)
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
