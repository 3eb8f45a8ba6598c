"""``FederatedLoop``: federated simulation on one Lightning Fabric, clients one after another.

One model lives in memory whatever the number of clients: before each client trains, the global
communicated state (e.g. the LoRA adapters) is copied into it; afterwards the client's state is
copied out and folded into the aggregation strategy. A round is::

    begin_round (sampled clients) → for each: the client runner (availability draw, load
    global, LocalTrainer.fit) → record_update → strategy.add → close_round → strategy.result
    becomes the global state → end_round (evaluate; RunRecorder: record, TensorBoard,
    checkpoint)

The run sequence (:meth:`RoundEngine.run`), ``begin_round``, ``record_update``, ``close_round``
and ``end_round`` are the round engine every runtime shares: the Flower ServerApps' strategies
call them too (:mod:`flora_lightning.flower.server_strategy`,
:mod:`flora_lightning.flower.secagg_server`), and the Flower ClientApp trains with the same
client runner (:mod:`flora_lightning.federation.client_runner`). Every random choice is seeded
from ``(seed, round, client)`` so a resumed run repeats exactly what an uninterrupted one would
have done.
"""

from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm

from flora_lightning.callbacks.base import Callback
from flora_lightning.callbacks.communication import CommunicationLogger
from flora_lightning.clip.feature_cache import FeatureCache
from flora_lightning.federation.attack import Attack
from flora_lightning.federation.availability import Availability
from flora_lightning.federation.client_runner import admit_client, exclude_failed, fit_client
from flora_lightning.federation.engine import RoundEngine, RoundFailedError
from flora_lightning.federation.parallel_memory import ParallelClients
from flora_lightning.federation.parallel_runner import resolve_parallel_clients, run_client_groups
from flora_lightning.federation.ranks import ClientRanks
from flora_lightning.federation.setup import (
    CudaGraphs,
    OnClientError,
    OnTooFewUpdates,
    Precision,
    check_settings,
)
from flora_lightning.rundir.recorder import RunRecorder
from flora_lightning.rundir.round_record import RoundRecord
from flora_lightning.strategy import FedAvg, Strategy, state_bytes

__all__ = ["FederatedLoop", "RoundFailedError"]


class FederatedLoop(RoundEngine):
    """Runs federated rounds of a :class:`FederatedCLIPModule` over a :class:`FederatedDataModule`.

    Args:
        rounds: communication rounds (paper: 50).
        local_epochs: local epochs per client per round (paper: 1).
        max_local_steps: stop a client's local fit after this many optimizer steps (None: no cap).
        join_ratio: share of clients sampled each round, in (0, 1] (paper: 1.0).
        precision: ``32-true``, ``16-mixed`` (CUDA) or ``bf16-mixed``.
        accelerator: ``auto``, ``cpu``, ``cuda``, ...
        cuda_graphs: ``auto`` captures each method's local step (forward and backward; the
            optimizer step is one fused Adam kernel) in CUDA graphs on a CUDA device and replays
            it for every client and round (eager elsewhere, and for DP-SGD's per-example step;
            the reason is logged once); ``off``: never.
        compile: ``torch.compile`` the local step of every method (any device; the first
            steps pay the compilation). Same math as eager up to float rounding.
        parallel_clients: train the round's sampled clients K at a time in one batched
            computation over the shared frozen CLIP (FLoRA, FedLC, FedAA from cached features:
            each client's update as one at a time, up to float rounding; see
            :mod:`flora_lightning.federation.parallel`); ``auto``: K from
            ``parallel_memory_mb``; 1: one after another.
        parallel_memory_mb: the memory budget ``parallel_clients: auto`` sizes K by
            (activations x K, see :mod:`flora_lightning.federation.parallel_memory`); null:
            the device's free memory.
        keep_client_optimizer_state: each client keeps its Adam state across rounds (paper).
        client_state_dir: spill those per-client optimizer states to disk, one safetensors file
            per client in this folder, read at the client's fit and written after it, so RAM
            holds only the training client's (for many clients, or FedFFT's ~1.2 GB of Adam
            state per client at ViT-B/32). null: keep them in memory.
        cache_features: when the method's image encoder is frozen, encode each client's images
            once and train from the features (same results, far faster); false turns it off.
        feature_cache_dir: also keep cached features on disk here, keyed by a fingerprint of
            model, data, partition and preprocessing (null: memory only).
        release_image_encoder: with cached features, free the vision tower's memory for the
            rest of the run (the model then cannot encode pixels until it is reloaded).
        strategy: aggregation strategy (sample-weighted FedAvg by default).
        availability: simulated unreliable clients: per-round dropout, stragglers that run
            only part of their local steps, a round deadline (seeded per round and client; see
            :mod:`flora_lightning.federation.availability`). null: every sampled client trains fully.
        attack: seeded Byzantine clients, for robustness experiments: each round a
            ``fraction`` of the sampled clients sends a scaled, sign-flipped or noise update,
            claims ``scale`` times its samples, or trains on flipped labels (see
            :mod:`flora_lightning.federation.attack`). null: no attack.
        client_ranks: each client's LoRA rank (at most ``model.lora.rank``): a list with one
            rank per client, or tiers ``[{rank: 4, share: 0.5}, ...]`` assigned by seed; mixed
            ranks need ``ZeroPaddingAverage`` or ``SvdRedistribution`` (see
            :mod:`flora_lightning.federation.ranks`). null: every client at ``model.lora.rank``.
        on_client_error: a client whose local fit raises (e.g. out of memory) is left out of
            the round with the error as its reason (``skip``, as a failed Flower ClientApp),
            or stops the run (``raise``).
        on_too_few_updates: a round with fewer than ``strategy.min_clients`` accepted updates
            stops the run, the last complete round saved (``raise``; a round short only
            because ``availability`` dropped clients passes), or is recorded unaggregated, the
            global state kept, and the run goes on (``skip``). The same on the Flower apps.
        callbacks: extra Fabric callbacks (a CommunicationLogger, which logs ``comm/*``, is
            added when none is given).
        default_root_dir: run directory for config, TensorBoard, checkpoints, summary.
        resume: continue the run in ``default_root_dir`` from its last saved resume state.
        resume_every_n_rounds: write the resume state (global state, every client's optimizer
            state, history) every n rounds and after the last; a resumed run restarts after the
            last one written and trains the rounds after it again (identically, seeded). Raise
            it for FedFFT, whose per-client Adam states are ~1.2 GB each at ViT-B/32.
        keep_last_checkpoints: keep only this many per-round checkpoints (None: keep all).
        resume_without_manifest: let ``resume`` load a resume state folder that has no
            checksum manifest (an old run, or a copy without it), unverified; refused otherwise.
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
        cuda_graphs: CudaGraphs = "auto",
        compile: bool = False,
        parallel_clients: ParallelClients = 1,
        parallel_memory_mb: float | None = None,
        keep_client_optimizer_state: bool = True,
        client_state_dir: str | None = None,
        cache_features: bool = True,
        feature_cache_dir: str | None = None,
        release_image_encoder: bool = True,
        strategy: Strategy | None = None,
        availability: Availability | None = None,
        attack: Attack | None = None,
        client_ranks: ClientRanks = None,
        on_client_error: OnClientError = "skip",
        on_too_few_updates: OnTooFewUpdates = "raise",
        callbacks: list[Callback] | None = None,
        default_root_dir: str = "runs/flora",
        resume: bool = False,
        resume_every_n_rounds: int = 1,
        keep_last_checkpoints: int | None = None,
        resume_without_manifest: bool = False,
        seed: int = 42,
        progress: bool = True,
    ) -> None:
        check_settings(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})
        super().__init__(on_too_few_updates)
        self.rounds, self.local_epochs, self.max_local_steps = rounds, local_epochs, max_local_steps
        self.join_ratio, self.precision, self.accelerator = join_ratio, precision, accelerator
        self.cuda_graphs, self.compile = cuda_graphs, compile
        self.parallel_clients, self.parallel_memory_mb = parallel_clients, parallel_memory_mb
        self.clients_at_once: int | None = None
        """K, resolved from ``parallel_clients`` at the run's first round."""
        self.keep_client_optimizer_state = keep_client_optimizer_state
        self.client_state_dir = client_state_dir
        self.cache_features, self.feature_cache_dir = cache_features, feature_cache_dir
        self.release_image_encoder = release_image_encoder
        self.strategy = strategy or FedAvg()
        self.availability, self.client_ranks = availability, client_ranks
        self.attack = attack
        self.on_client_error = on_client_error
        self.callbacks = list(callbacks or [])
        if not any(isinstance(c, CommunicationLogger) for c in self.callbacks):
            self.callbacks.append(CommunicationLogger())
        self.resume, self.seed, self.progress = resume, seed, progress
        self.recorder = RunRecorder(
            default_root_dir, resume, resume_every_n_rounds, keep_last_checkpoints, rounds,
            resume_without_manifest=resume_without_manifest,
        )  # fmt: skip
        self.feature_cache: FeatureCache | None = None

    def clients_per_round(self, num_clients: int) -> int:
        # floor, as Flower; the epsilon keeps 0.29 * 100 at 29 despite float rounding
        return max(1, math.floor(self.join_ratio * num_clients + 1e-9))

    def sample_clients(self, round: int, num_clients: int) -> list[int]:
        """Seeded by ``(seed, round)``: the same clients on a resumed run."""
        rng = np.random.default_rng([self.seed, round])
        chosen = rng.choice(num_clients, size=self.clients_per_round(num_clients), replace=False)
        return sorted(int(c) for c in chosen)

    def round_clients(self, round_: int) -> list[int]:
        """The clients :meth:`sample_clients` picks for ``round_`` among the data's clients."""
        return self.sample_clients(round_, self.datamodule.num_clients)

    # ================================================================= fit
    def fit(self, model, datamodule, config_yaml: str | None = None) -> dict:
        """Run (or resume) the federated training; returns the summary written to summary.json."""
        return self.run(model, datamodule, self.run_rounds, config_yaml)

    def run_rounds(self, done: int) -> None:
        """The rounds after ``done``, in-process."""
        bar = tqdm(range(done + 1, self.rounds + 1), desc="rounds", disable=not self.progress,
                   initial=done, total=self.rounds)  # fmt: skip
        for round_ in bar:
            record = self.run_round(round_)
            bar.set_postfix(acc=f"{record.test_acc:.4f}", loss=f"{record.test_loss:.3f}")

    def run_round(self, round_: int) -> RoundRecord:
        """One in-process round: the sampled clients train one after another (or K at a time,
        ``trainer.parallel_clients``), then aggregate."""
        model = self.model
        tally = self.begin_round(round_, self.round_clients(round_))
        global_state = model.communicated_state()
        self.strategy.begin(global_state)
        self.record_sent(tally, sum(state_bytes(self.state_for_client(global_state, c))
                                    for c in tally.clients))  # fmt: skip
        if self.clients_at_once is None:
            self.clients_at_once = resolve_parallel_clients(
                self, self.parallel_clients, self.parallel_memory_mb,
                self.clients_per_round(self.datamodule.num_clients),
            )  # fmt: skip
        if self.clients_at_once > 1:
            run_client_groups(self, tally, global_state, round_, self.clients_at_once)
        else:
            for client in tqdm(tally.clients, desc=f"round {round_} clients", leave=False,
                               disable=not self.progress):  # fmt: skip
                admitted, steps = admit_client(self, tally, round_, client)
                if not admitted:
                    continue  # a dropout sends nothing
                try:
                    fit = fit_client(self, global_state, client, round_, steps)
                except Exception as err:
                    if self.on_client_error == "raise":
                        raise
                    exclude_failed(self, tally, [client], round_, err)
                    continue
                self.record_update(tally, fit.update, fit.seconds)
                self.strategy.add(fit.update)
        self.strategy.finish_round()  # a non-finite aggregate rejects the round's updates
        try:
            aggregated = self.close_round(tally, self.strategy.accepted, self.strategy.rejected,
                                          self.strategy.min_clients)  # fmt: skip
        except RoundFailedError:
            model.load_communicated_state(global_state)  # the run stops at the last global state
            raise
        model.load_communicated_state(self.strategy.result() if aggregated else global_state)
        return self.end_round(tally)
