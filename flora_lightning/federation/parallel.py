"""``ParallelFit``: K clients' local fits in one batched computation over the shared frozen CLIP.

FLoRA's clients share one frozen CLIP and, with cached image features, the same class captions;
they differ only in their adapters, their optimizer states and their batches. ``ParallelFit``
stacks the K clients' trainable parameters along a leading client dimension and takes each
local step for all K at once::

    each client's next batch (its own seeded loader, as LocalTrainer.fit) → pad to one length
    → the text tower once on every client's captions, each client's LoRA on its own rows
    (grouped_lora: the frozen matmuls run once on all K clients' rows) → the rest of each
    client's loss vmapped over its own head or adapter (functional_call) → one backward of the
    sum of the K independent losses → BatchedAdam.step (each client's own moments and step
    count; clients whose fit has ended are masked)

so each client ends with what :meth:`LocalTrainer.fit` gives it alone, up to float rounding:
the same seeds (:meth:`LocalTrainer.seed_for`), data order, starting state, kept Adam state,
step cap (``max_local_steps``, a straggler's ``max_steps``) and sample-weighted mean loss; its
optimizer state goes to the trainer's store the same way. Where the batched math would differ,
:func:`parallel_refusal` says why (``trainer.parallel_clients`` then refuses or falls back).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from flora_lightning.clip.feature_cache import FeatureCache
from flora_lightning.federation.batched_adam import BatchedAdam
from flora_lightning.federation.batched_loss import loss_kind
from flora_lightning.federation.batched_step import BatchedStep
from flora_lightning.federation.local_trainer import MeanLoss
from flora_lightning.federation.ranks import padded_state
from flora_lightning.strategy import ClientUpdate
from flora_lightning.strategy.lora_product import lora_pairs

PRECISIONS = ("32-true", "64-true")
"""Fabric precisions the batched fit runs in (autocast and loss scaling are not batched)."""


def parallel_refusal(trainer, model, source) -> str | None:
    """Why K clients of ``model`` cannot train batched with ``trainer`` from ``source`` (None:
    they can)."""
    name = type(model).__name__
    if trainer.step_fn is not None:
        return (
            f"sample-level DP-SGD ({type(trainer.step_fn).__name__}) computes per-example "
            "gradients one client at a time"
        )
    if loss_kind(model) is None:
        return (
            f"{name} trains (part of) the vision tower or has a loss the batched fit does not "
            "reproduce; only FLoRA (text tower), FedLC and FedAA train batched"
        )
    # a FlippedLabels (trainer.attack: label_flip) wraps the cache as .source
    if not isinstance(getattr(source, "source", source), FeatureCache):
        return (
            "the batched fit trains from cached image features; set trainer.cache_features "
            "true (and model.lora.tower text for FLoRA)"
        )
    lora = getattr(model, "lora", None)
    if lora is not None and lora.dropout > 0:
        return (
            f"model.lora.dropout={lora.dropout} draws a dropout mask per client from torch's "
            "global generator, which a batched step cannot reproduce; set it to 0 (paper)"
        )
    precision = getattr(trainer.fabric.strategy.precision, "precision", None)
    if precision not in PRECISIONS:
        return f"trainer.precision={precision} is not batched (use 32-true)"
    names = [id(p) for p in model.optimized_parameters()]
    if names != [id(p) for p in model.trainable_parameters()]:
        return f"{name} optimizes other parameters than it communicates"
    return None


def loss_meter(device) -> MeanLoss:
    """The training-loss meter of :meth:`LocalTrainer.run_steps`, so a client's
    ``train_loss`` is the same number whichever way it trained."""
    return MeanLoss(device)


class _KeptState:
    """What :meth:`LocalTrainer.keep_optimizer_state_of` reads of an optimizer."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return {"state": self.state}


def client_batches(loader, local_epochs: int, cap: float) -> Iterator:
    """A client's batches of one fit: ``local_epochs`` passes over ``loader``, at most ``cap``
    (LocalTrainer.run_steps's order; the loader is drawn lazily, so each epoch's shuffle
    happens when it starts, from the client's own generator)."""
    steps = 0
    for _ in range(local_epochs):
        for batch in loader:
            yield batch
            steps += 1
            if steps >= cap:
                return


def rank_masks(named: dict, stacked, ranks) -> list[torch.Tensor | None] | None:
    """Per stacked parameter, ones with zeros where a client's LoRA slots lie beyond its rank
    (``lora_A`` rows, ``lora_B`` columns, as :class:`~flora_lightning.federation.ranks.RankMask`);
    None entries for other parameters; None when every client is at the model's rank.
    ``named``: the model's trainable parameters (unstacked), in the order of ``stacked``."""
    if all(r is None for r in ranks):
        return None
    pairs = lora_pairs(named)
    masks: list[torch.Tensor | None] = [None] * len(named)
    for i, name in enumerate(named):
        is_a, is_b = name in pairs, name in pairs.values()
        if not (is_a or is_b):
            continue
        mask = torch.ones_like(stacked[i])
        for k, rank in enumerate(ranks):
            if rank is not None:
                if is_a:
                    mask[k, rank:] = 0  # lora_A [K, r, in]: rows beyond the rank
                else:
                    mask[k, :, rank:] = 0  # lora_B [K, out, r]: columns beyond it
        masks[i] = mask
    return masks


class ParallelFit:
    """Batched local fits with a :class:`LocalTrainer`'s settings, seeds and state store.

    Args:
        trainer: the run's local trainer (epochs, step cap, seeds, kept optimizer states).
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def fit(
        self,
        model,
        data,
        clients: Sequence[int],
        round_: int,
        source,
        proximal_mu: float = 0.0,
        max_steps: Sequence[int | None] | None = None,
        ranks: Sequence[int | None] | None = None,
    ) -> list[ClientUpdate]:
        """Train ``clients`` in ``round_`` from the state ``model`` holds; their updates in
        order (whole: a lower-rank client's zero-padded, as the model holds it). The model's
        own parameters are not changed.

        Args:
            model: the method, holding the state every client starts from.
            data: the federated datamodule (sample counts, batch size).
            clients: the clients to train together (distinct ids).
            round_: the round (seeds).
            source: the run's :class:`~flora_lightning.clip.feature_cache.FeatureCache`.
            proximal_mu: FedProx's ``mu`` (see :meth:`LocalTrainer.fit`).
            max_steps: each client's straggler cap (None entries: a full fit).
            ranks: each client's LoRA rank when below the model's (``trainer.client_ranks``;
                None entries: the model's). As ``RoundEngine.prepare_client`` and
                :class:`~flora_lightning.federation.ranks.RankMask` do one at a time, such a
                client starts from its rank's slice, zero-padded, and the gradient of its
                slots beyond its rank is zero.

        Raises:
            ValueError: :func:`parallel_refusal` gives a reason, naming the field.
        """
        trainer = self.trainer
        reason = parallel_refusal(trainer, model, source)
        if reason is not None:
            raise ValueError(f"trainer.parallel_clients: {reason}.")
        if not proximal_mu >= 0:
            raise ValueError(f"trainer.strategy.mu must be >= 0 (got {proximal_mu}).")
        if len(set(clients)) != len(clients):
            raise ValueError(f"ParallelFit: clients repeat in {list(clients)}.")
        max_steps = list(max_steps) if max_steps is not None else [None] * len(clients)
        streams = []
        for client, steps in zip(clients, max_steps, strict=True):
            torch.manual_seed(trainer.seed_for(round_, client))  # as LocalTrainer.fit
            generator = torch.Generator().manual_seed(trainer.seed_for(round_, client, 1))
            loader = trainer.client_loader(data, source, client, generator)
            cap = min(steps or math.inf, trainer.max_local_steps or math.inf)
            streams.append(client_batches(loader, trainer.local_epochs, cap))
        ranks = list(ranks) if ranks is not None else [None] * len(clients)
        named = dict(model.trainable_named_parameters())
        names = list(named)
        starts = [
            named if r is None else padded_state(model.communicated_state(), r, named)
            for r in ranks
        ]
        stacked = [torch.stack([s[n].detach() for s in starts]).clone() for n in names]
        anchors = [p.clone() for p in stacked]  # FedProx's w_global: each client's start
        masks = rank_masks(named, stacked, ranks)
        kept = [
            trainer.state_store[c] if trainer.keep_optimizer_state and c in trainer.state_store
            else None
            for c in clients
        ]  # fmt: skip
        adam = BatchedAdam(stacked, model.optimizer_config, kept)
        meters, seen = self.run(model, names, stacked, anchors, masks, adam, streams, proximal_mu)
        updates = []
        for k, client in enumerate(clients):
            loss = meters[k].compute() if seen[k] else math.nan
            state = {n: p[k].clone() for n, p in zip(names, stacked, strict=True)}
            trainer.keep_optimizer_state_of(
                client, _KeptState(adam.client_state(k)), state, loss, seen[k]
            )
            updates.append(ClientUpdate(client, state, data.num_samples(client), loss))
        return updates

    def run(self, model, names, stacked, anchors, masks, adam, streams, mu) -> tuple[list, list]:
        """Step every client until its stream ends; each client's loss meter (the one
        :meth:`LocalTrainer.run_steps` keeps, updated the same way) and examples seen."""
        meters = [loss_meter(stacked[0].device) for _ in streams]
        seen = [0] * len(streams)
        live = list(range(len(streams)))
        step = BatchedStep(model, names, mu, self.trainer.fabric)
        model.train()
        try:
            while live:
                batches = {}
                for k in list(live):
                    batch = next(streams[k], None)
                    if batch is None:
                        live.remove(k)
                    else:
                        batches[k] = batch
                if not batches:
                    break
                losses = step(stacked, anchors, masks, adam, batches)
                for k, loss in losses.items():
                    rows = len(batches[k][1])
                    meters[k].update(loss, rows)
                    seen[k] += rows
        finally:
            model.eval()
        return meters, seen
