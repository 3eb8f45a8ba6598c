"""``FederatedLoop``: federated simulation on one Lightning Fabric, clients one after another.

One model lives in memory whatever the number of clients: before each client trains, the global
communicated state (e.g. the LoRA adapters) is copied into it; afterwards the client's state is
copied out and folded into the aggregation strategy. A round is::

    sample clients → for each: load global → local fit (Fabric, mixed precision) → strategy.add
    → strategy.result becomes the global state → evaluate → log, checkpoint

Every random choice is seeded from ``(seed, round, client)`` so a resumed run repeats exactly
what an uninterrupted one would have done.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from flora_lightning.callbacks.base import Callback
from flora_lightning.callbacks.communication import CommunicationLogger
from flora_lightning.checkpoint import (
    flatten_optimizer_states,
    link_or_copy,
    load_state,
    save_state,
    unflatten_optimizer_states,
    write_folder,
    write_json,
)
from flora_lightning.feature_cache import FeatureCache
from flora_lightning.hub import NotAvailableError
from flora_lightning.resume_check import check_resumable
from flora_lightning.strategy import FedAvg, Strategy, state_bytes
from flora_lightning.trainer import LocalTrainer

log = logging.getLogger(__name__)
Precision = Literal["32-true", "16-mixed", "bf16-mixed"]


class FederatedLoop:
    """Runs federated rounds of a :class:`FederatedCLIPModule` over a :class:`FederatedDataModule`.

    Args:
        rounds: communication rounds (paper: 50).
        local_epochs: local epochs per client per round (paper: 1).
        max_local_steps: stop a client's local fit after this many optimizer steps (None: no cap).
        join_ratio: share of clients sampled each round, in (0, 1] (paper: 1.0).
        precision: ``32-true``, ``16-mixed`` (CUDA) or ``bf16-mixed``.
        accelerator: ``auto``, ``cpu``, ``cuda``, ...
        keep_client_optimizer_state: each client keeps its Adam state across rounds (paper).
        cache_features: when the method's image encoder is frozen, encode each client's images
            once and train from the features (same results, far faster); false turns it off.
        feature_cache_dir: also keep cached features on disk here, keyed by a fingerprint of
            model, data, partition and preprocessing (null: memory only).
        release_image_encoder: with cached features, free the vision tower's memory for the
            rest of the run (the model then cannot encode pixels until it is reloaded).
        strategy: aggregation strategy (sample-weighted FedAvg by default).
        callbacks: extra Fabric callbacks (a CommunicationLogger, which logs ``comm/*``, is
            added when none is given).
        default_root_dir: run directory for config, TensorBoard, checkpoints, summary.
        resume: continue the run in ``default_root_dir`` from its last saved resume state.
        resume_every_n_rounds: write the resume state (global state, every client's optimizer
            state, history) every n rounds and after the last; a resumed run restarts after the
            last one written and trains the rounds after it again (identically, seeded). Raise
            it for FedFFT, whose per-client Adam states are ~1.2 GB each at ViT-B/32.
        keep_last_checkpoints: keep only this many per-round checkpoints (None: keep all).
        seed: seeds model init, client sampling, data order and dropout.
        progress: show progress bars for rounds and clients.
    """

    def __init__(
        self,
        rounds: int = 50,
        local_epochs: int = 1,
        max_local_steps: int | None = None,
        join_ratio: float = 1.0,
        precision: Precision = "32-true",
        accelerator: str = "auto",
        keep_client_optimizer_state: bool = True,
        cache_features: bool = True,
        feature_cache_dir: str | None = None,
        release_image_encoder: bool = True,
        strategy: Strategy | None = None,
        callbacks: list[Callback] | None = None,
        default_root_dir: str = "runs/flora",
        resume: bool = False,
        resume_every_n_rounds: int = 1,
        keep_last_checkpoints: int | None = None,
        seed: int = 42,
        progress: bool = True,
    ) -> None:
        if rounds < 0:
            raise ValueError(f"trainer.rounds must be >= 0 (got {rounds}).")
        if local_epochs < 1:
            raise ValueError(f"trainer.local_epochs must be >= 1 (got {local_epochs}).")
        if max_local_steps is not None and max_local_steps < 1:
            raise ValueError(
                f"trainer.max_local_steps must be >= 1 or null (got {max_local_steps})."
            )
        if not 0 < join_ratio <= 1:
            raise ValueError(
                f"trainer.join_ratio must be in (0, 1] (got {join_ratio}); 1.0 means every "
                "client joins every round."
            )
        if precision not in ("32-true", "16-mixed", "bf16-mixed"):
            raise ValueError(
                f"trainer.precision must be 32-true, 16-mixed or bf16-mixed (got {precision!r})."
            )
        if resume_every_n_rounds < 1:
            raise ValueError(
                f"trainer.resume_every_n_rounds must be >= 1 (got {resume_every_n_rounds})."
            )
        if keep_last_checkpoints is not None and keep_last_checkpoints < 1:
            raise ValueError(
                f"trainer.keep_last_checkpoints must be >= 1 or null (got {keep_last_checkpoints})."
            )
        self.rounds = rounds
        self.local_epochs = local_epochs
        self.max_local_steps = max_local_steps
        self.join_ratio = join_ratio
        self.precision = precision
        self.accelerator = accelerator
        self.keep_client_optimizer_state = keep_client_optimizer_state
        self.cache_features = cache_features
        self.feature_cache_dir = feature_cache_dir
        self.release_image_encoder = release_image_encoder
        self.feature_cache = None
        self.caching_seconds = 0.0
        self.strategy = strategy or FedAvg()
        self.callbacks = list(callbacks or [])
        if not any(isinstance(c, CommunicationLogger) for c in self.callbacks):
            self.callbacks.append(CommunicationLogger())
        self.run_dir = Path(default_root_dir)
        self.resume = resume
        self.resume_every_n_rounds = resume_every_n_rounds
        self.keep_last_checkpoints = keep_last_checkpoints
        self.seed = seed
        self.progress = progress
        self.fabric: L.Fabric | None = None
        self.round = 0
        self.history: list[dict] = []
        self.trainer: LocalTrainer | None = None

    # ================================================================ setup
    def launch(self, model, data, tensorboard: bool = True) -> None:
        """Fabric, data, model, in the order that fails fastest on bad input.

        Part of the per-round API that :meth:`fit` and the Flower apps share: ``launch`` (or
        :meth:`open_run`), then per round :meth:`LocalTrainer.fit <flora_lightning.trainer.
        LocalTrainer.fit>` of :attr:`trainer` on the clients, :meth:`evaluate`,
        :meth:`record_round`, :meth:`save_round`; at the end :meth:`finish`.

        Args:
            model: the method's LightningModule.
            data: the federated data.
            tensorboard: log to ``default_root_dir/tensorboard`` (a Flower client writes nothing).
        """
        from lightning.fabric.loggers import TensorBoardLogger

        if self.precision == "16-mixed" and not torch.cuda.is_available():
            raise ValueError(
                "trainer.precision=16-mixed needs CUDA; use bf16-mixed or 32-true on CPU."
            )
        if self.clients_per_round(data.num_clients) < self.strategy.min_clients:
            raise ValueError(
                f"trainer.join_ratio={self.join_ratio} samples "
                f"{self.clients_per_round(data.num_clients)} client(s) per round, fewer than "
                f"trainer.strategy.min_clients={self.strategy.min_clients}."
            )
        loggers = (
            [TensorBoardLogger(root_dir=str(self.run_dir), name="tensorboard", version="")]
            if tensorboard
            else []
        )
        self.fabric = L.Fabric(
            accelerator=self.accelerator,
            devices=1,
            precision=self.precision,
            loggers=loggers,
            callbacks=self.callbacks,
        )
        self.fabric.seed_everything(self.seed, verbose=False)
        # Load data and model before any training; report both when both are unreachable.
        problems = []
        for load in (lambda: data.setup("fit"), model.configure_model):
            try:
                load()
            except NotAvailableError as err:
                problems.append(str(err))
        if problems:
            raise NotAvailableError("\n".join(problems))
        model.configure_task(data.class_names, data.template)
        data.set_image_transform(model.image_transform)
        self.module = self.fabric.setup_module(model)
        self.model = model
        self.datamodule = data
        self.trainer = LocalTrainer(
            self.fabric,
            local_epochs=self.local_epochs,
            max_local_steps=self.max_local_steps,
            keep_optimizer_state=self.keep_client_optimizer_state,
            seed=self.seed,
        )

    def clients_per_round(self, num_clients: int) -> int:
        # floor, as Flower; the epsilon keeps 0.29 * 100 at 29 despite float rounding
        return max(1, math.floor(self.join_ratio * num_clients + 1e-9))

    def sample_clients(self, round: int, num_clients: int) -> list[int]:
        """Seeded by ``(seed, round)``: the same clients on a resumed run."""
        rng = np.random.default_rng([self.seed, round])
        chosen = rng.choice(num_clients, size=self.clients_per_round(num_clients), replace=False)
        return sorted(int(c) for c in chosen)

    # ================================================================= fit
    def open_run(self, model, datamodule, config_yaml: str | None = None) -> None:
        """Check the run directory, set everything up, then write config and label table.

        Everything that can fail on bad input runs before the first file is written. Shared by
        :meth:`fit` and the Flower ServerApp.
        """
        self._check_run_dir()
        if self.resume and config_yaml is not None:
            check_resumable(self.run_dir, config_yaml)
        self.launch(model, datamodule)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config_yaml is not None:
            name = (
                "config.resumed.yaml" if (self.run_dir / "config.yaml").exists() else "config.yaml"
            )
            (self.run_dir / name).write_text(config_yaml)
        (self.run_dir / "label_table.txt").write_text(datamodule.label_table() + "\n")

    def cache_image_features(self, model, datamodule, clients: list[int], test: bool = True):
        """Frozen-feature caching of ``clients`` (and the test set), when the method allows it.

        Shared by :meth:`fit` and the Flower apps (a ClientApp caches only its partition, the
        ServerApp only the test set).
        """
        if not (self.cache_features and model.image_encoder_frozen):
            return
        t0 = time.perf_counter()
        self.feature_cache = FeatureCache(self.fabric, model, datamodule, self.feature_cache_dir)
        self.feature_cache.build(clients, test=test)
        if self.release_image_encoder:
            model.release_image_encoder()
        self.caching_seconds = time.perf_counter() - t0
        self.fabric.print(f"Cached image features in {self.caching_seconds:.1f}s.")

    def fit(self, model, datamodule, config_yaml: str | None = None) -> dict:
        """Run (or resume) the federated training; returns the summary written to summary.json.

        Args:
            model: the method's LightningModule.
            datamodule: the federated data.
            config_yaml: the resolved config, saved as ``config.yaml`` once setup succeeded.
        """
        self.open_run(model, datamodule, config_yaml)
        fabric = self.fabric
        fabric.print(f"Client label counts:\n{datamodule.label_table()}")
        start = self._restore() if self.resume else 0
        self.cache_image_features(model, datamodule, list(range(datamodule.num_clients)))
        fabric.call("on_fit_start", loop=self, model=model)
        if start == 0:
            self.record_round(0, self.evaluate(datamodule), seconds=0.0, up=0, down=0, losses={})
        bar = tqdm(
            range(start + 1, self.rounds + 1),
            desc="rounds",
            disable=not self.progress,
            initial=start,
            total=self.rounds,
        )
        for round_ in bar:
            self.round = round_
            t0 = time.perf_counter()
            clients = self.sample_clients(round_, datamodule.num_clients)
            fabric.call("on_round_start", loop=self, round=round_, clients=clients)
            global_state = model.communicated_state()
            self.strategy.begin(global_state)
            losses, up, train_seconds = {}, 0, 0.0
            for client in tqdm(
                clients, desc=f"round {round_} clients", leave=False, disable=not self.progress
            ):
                model.load_communicated_state(global_state)
                fabric.call("on_client_fit_start", loop=self, model=model, client_id=client)
                t_client = time.perf_counter()
                update = self.trainer.fit(model, datamodule, client, round_, self.feature_cache)
                train_seconds += time.perf_counter() - t_client
                fabric.call("on_client_fit_end", loop=self, model=model, update=update)
                self.strategy.add(update)
                losses[client] = update.train_loss
                up += state_bytes(update.state)
            model.load_communicated_state(self.strategy.result())
            down = state_bytes(global_state) * len(clients)
            t_eval = time.perf_counter()
            metrics = self.evaluate(datamodule)
            metrics["eval_seconds"] = time.perf_counter() - t_eval
            metrics["train_seconds"] = train_seconds
            record = self.record_round(
                round_,
                metrics,
                time.perf_counter() - t0,
                up,
                down,
                losses,
                accepted=self.strategy.accepted,
                rejected=self.strategy.rejected,
            )
            bar.set_postfix(acc=f"{record['test_acc']:.4f}", loss=f"{record['test_loss']:.3f}")
            self.save_round(round_, model)
        return self.finish(model, datamodule)

    # ============================================================ evaluate
    @torch.no_grad()
    def evaluate(self, datamodule) -> dict[str, float]:
        """Global test accuracy (top-1, micro: correct / total) and cross-entropy loss."""
        model, fabric = self.model, self.fabric
        model.eval()
        accuracy = MulticlassAccuracy(num_classes=len(datamodule.class_names), average="micro")
        accuracy = accuracy.to(fabric.device)
        loss_sum, n = 0.0, 0
        source = self.feature_cache or datamodule
        loader = fabric.setup_dataloaders(source.test_dataloader(), use_distributed_sampler=False)
        with fabric.autocast():
            classes = model.class_embeddings()
            for pixel_values, labels in loader:
                logits = model.evaluate_batch(pixel_values, classes).float()
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                n += len(labels)
                accuracy.update(logits, labels)
        return {"test_acc": float(accuracy.compute()), "test_loss": loss_sum / max(n, 1)}

    def validate(self, model, datamodule, ckpt_path: str | None = None) -> dict:
        return self._evaluate_only(model, datamodule, ckpt_path, "validate")

    def test(self, model, datamodule, ckpt_path: str | None = None) -> dict:
        return self._evaluate_only(model, datamodule, ckpt_path, "test")

    def _evaluate_only(self, model, datamodule, ckpt_path, stage: str) -> dict:
        self.launch(model, datamodule)
        if ckpt_path:
            model.load_communicated_state(load_state(ckpt_path))
        result = {
            "stage": stage,
            "method": model.method_name,
            "ckpt_path": ckpt_path,
            **self.evaluate(datamodule),
        }
        write_json(result, self.run_dir / f"{stage}.json")
        self.fabric.print(result)
        return result

    # ========================================================= bookkeeping
    def record_round(
        self, round_, metrics, seconds, up, down, losses, accepted=(), rejected=None
    ) -> dict:
        """Append a round to the history; callbacks, TensorBoard scalars; returns the record.

        Args:
            round_: the round (0 = before training).
            metrics: ``test_acc``, ``test_loss`` and optionally ``train_seconds``/``eval_seconds``.
            seconds: wall time of the round.
            up, down: bytes sent by the clients / to them this round.
            losses: client id -> mean local training loss.
            accepted: clients whose updates were aggregated.
            rejected: client -> why its update was left out (NaN/Inf, wrong names or shapes,
                a failed ClientApp).
        """
        cumulative_up = up + (self.history[-1]["bytes_up_total"] if self.history else 0)
        cumulative_down = down + (self.history[-1]["bytes_down_total"] if self.history else 0)
        record = {
            "round": round_,
            "test_acc": metrics["test_acc"],
            "test_loss": metrics["test_loss"],
            "bytes_up": up,
            "bytes_down": down,
            "bytes_up_total": cumulative_up,
            "bytes_down_total": cumulative_down,
            "seconds": seconds,
            # local fit (data loading included) and evaluation; the rest is loop overhead:
            # state copies, aggregation, sampling, logging.
            "train_seconds": metrics.get("train_seconds", 0.0),
            "eval_seconds": metrics.get("eval_seconds", 0.0),
            "client_train_loss": {str(k): v for k, v in losses.items()},
            "accepted_clients": sorted(accepted),
            "rejected_clients": {str(k): v for k, v in (rejected or {}).items()},
        }
        self.fabric.call("on_round_end", loop=self, round=round_, record=record)
        scalars = {
            "test/acc": record["test_acc"],
            "test/loss": record["test_loss"],
            "time/round_seconds": seconds,
        }
        if round_ > 0:
            scalars["clients/accepted"] = len(record["accepted_clients"])
            scalars["clients/rejected"] = len(record["rejected_clients"])
        scalars.update({f"client/{k}/train_loss": v for k, v in losses.items()})
        if losses:
            scalars["train/loss"] = float(np.mean(list(losses.values())))
        self.fabric.log_dict(scalars, step=round_)
        self.history.append(record)
        return record

    def summary(self, model) -> dict:
        accs = [r["test_acc"] for r in self.history]
        best = int(np.argmax(accs))
        return {
            "method": model.method_name,
            "model": model.name_or_path,
            "trainable_params": model.num_trainable_parameters(),
            "feature_caching_seconds": self.caching_seconds,
            # from the live parameters: no copy of the (for FedFFT, 600 MB) state just to count
            "bytes_per_client_per_direction": state_bytes(dict(model.trainable_named_parameters())),
            "final_test_acc": accs[-1],
            "best_test_acc": accs[best],
            "best_round": self.history[best]["round"],
            "rounds": self.history,
        }

    def _check_run_dir(self) -> None:
        if not self.resume and (self.run_dir / "summary.json").exists():
            raise FileExistsError(
                f"trainer.default_root_dir={self.run_dir} already holds a run; pass "
                "--trainer.resume true to continue it or choose another directory."
            )

    def save_round(self, round_: int, model) -> None:
        """Per-round global checkpoint; the resume state every ``resume_every_n_rounds``."""
        checkpoints = self.run_dir / "checkpoints"
        checkpoint = checkpoints / f"round_{round_:03d}.safetensors"
        save_state(
            dict(model.trainable_named_parameters()),  # save_state copies to CPU itself
            checkpoint,
            metadata={"round": str(round_), "method": model.method_name},
        )
        if self.keep_last_checkpoints is not None:
            old = sorted(checkpoints.glob("round_*.safetensors"))[: -self.keep_last_checkpoints]
            for path in old:
                path.unlink()

        if round_ % self.resume_every_n_rounds == 0 or round_ == self.rounds:

            def fill(folder: Path) -> None:
                # The round's checkpoint under a second name (it may be pruned later).
                link_or_copy(checkpoint, folder / "global.safetensors")
                save_state(
                    flatten_optimizer_states(self.trainer.optimizer_states),
                    folder / "optimizers.safetensors",
                )
                write_json({"round": round_, "history": self.history}, folder / "state.json")

            write_folder(self.run_dir / "resume", fill)
        write_json(self.summary(model), self.run_dir / "summary.json")

    def _restore(self) -> int:
        """Load the last complete round; returns it (0 when there is nothing to resume)."""
        import json

        state_file = self.run_dir / "resume" / "state.json"
        if not state_file.exists():
            self.fabric.print(
                f"trainer.resume: nothing to resume in {self.run_dir}; starting fresh."
            )
            return 0
        saved = json.loads(state_file.read_text())
        round_ = saved["round"]
        self.history = saved["history"]
        # The resume folder's own copy: per-round checkpoints may be pruned (keep_last_checkpoints).
        # Runs saved before it existed point at their round's checkpoint instead.
        own = self.run_dir / "resume" / "global.safetensors"
        checkpoint = self.run_dir / "checkpoints" / f"round_{round_:03d}.safetensors"
        self.model.load_communicated_state(load_state(own if own.exists() else checkpoint))
        flat = load_state(self.run_dir / "resume" / "optimizers.safetensors")
        self.trainer.optimizer_states = unflatten_optimizer_states(flat)
        self.fabric.print(f"Resuming {self.run_dir} after round {round_}.")
        return round_

    def finish(self, model, datamodule) -> dict:
        """Callbacks' ``on_fit_end``, the exported final model, summary.json; returns the summary."""
        summary = self.summary(model)
        self.fabric.call("on_fit_end", loop=self, model=model, summary=summary)
        write_folder(self.run_dir / "final", lambda folder: model.export(str(folder)))
        write_json(summary, self.run_dir / "summary.json")
        for logger in self.fabric.loggers:
            logger.finalize("success")
        self.fabric.print(
            f"Done: final test acc {summary['final_test_acc']:.4f}, best "
            f"{summary['best_test_acc']:.4f} (round {summary['best_round']}); outputs in {self.run_dir}"
        )
        return summary
