"""Seeded Byzantine clients for experiments (``trainer.attack``): who attacks, what they send.

Each round, ``floor(fraction * s)`` of the round's ``s`` sampled clients are attackers, drawn
without replacement by ``numpy.random.default_rng([seed, round, ATTACK_STREAM])`` from the
sorted sampled clients (:meth:`Attack.attackers`). The draw depends on nothing but these
numbers, so ``flora fit``, a Flower ClientApp (which knows the round's sampled clients from
the same seeded sampler) and a resumed run pick the same attackers. An attacker trains as any
client does, from the state it received ``g`` (the global state, or its rank's slice), to
``w``, and then sends, per ``kind`` (``c`` = ``scale``):

- ``scale``: ``g + c (w - g)`` (a boosted update; ``c = -1`` is a sign flip);
- ``sign_flip``: ``g - c (w - g)``;
- ``gaussian``: ``g + N(0, c^2)`` per entry (its training is thrown away; the noise is drawn
  by ``default_rng([seed, round, client, NOISE_STREAM, i])`` for the i-th tensor by name);
- ``num_samples``: ``w`` unchanged, but it claims ``round(c * n_k)`` samples (at least 1);
- ``label_flip``: trains on flipped labels ``y -> C - 1 - y`` (``C`` classes) and sends
  its ``w`` honestly: the attack is in the data (:class:`FlippedLabels`).

The attack runs on the client, where a real attacker sits (:mod:`~flora_lightning.federation.
client_runner`), so it meets every server-side defence as a real one would: ``Strategy.add``'s
checks, client-level DP's clipping, a robust strategy. The server records the round's drawn
attackers in ``summary.json``'s rounds (``attackers``) and the attack in the summary
(:class:`AttackRecord`). This module imports no heavy library (the early config check reads
:class:`Attack`): the transforms use the tensors' own methods.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

AttackKind = Literal["scale", "sign_flip", "gaussian", "num_samples", "label_flip"]
"""Values of ``trainer.attack.kind``."""
ATTACK_KINDS = ("scale", "sign_flip", "gaussian", "num_samples", "label_flip")
ATTACK_STREAM = 102
"""Stream of a round's attacker draw (availability uses 100 and 101, a client's fit 0-2)."""
NOISE_STREAM = 103
"""Stream of a ``gaussian`` attacker's noise."""


@dataclass
class Attack:
    """Byzantine clients, for robustness experiments (never in a real federation)."""

    kind: AttackKind
    """What an attacker does: scale, sign_flip, gaussian, num_samples or label_flip."""
    fraction: float = 0.2
    """Share of each round's sampled clients that attack, in (0, 1): floor(fraction * s)."""
    scale: float = 10.0
    """c: scale and sign_flip multiply the update by it, gaussian's std, num_samples' factor."""

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ValueError(
                f"trainer.attack.kind must be one of {', '.join(ATTACK_KINDS)} (got {self.kind!r})."
            )
        if isinstance(self.fraction, bool) or not (
            math.isfinite(self.fraction) and 0 < self.fraction < 1
        ):
            raise ValueError(
                f"trainer.attack.fraction must be in (0, 1) (got {self.fraction}); it is the "
                "share of each round's sampled clients that attack (null trainer.attack: none)."
            )
        if isinstance(self.scale, bool) or not math.isfinite(self.scale):
            raise ValueError(f"trainer.attack.scale must be a finite number (got {self.scale}).")
        if self.kind in ("gaussian", "num_samples") and not self.scale > 0:
            raise ValueError(
                f"trainer.attack.scale must be > 0 for kind {self.kind} (got {self.scale}): it "
                "is the noise's standard deviation / the factor on the claimed sample count."
            )

    def attackers(self, seed: int, round_: int, clients: list[int]) -> list[int]:
        """The attackers among ``round_``'s sampled ``clients`` (sorted)."""
        count = math.floor(self.fraction * len(clients) + 1e-9)  # 0.2 * 5 stays 1
        if count == 0:
            return []
        rng = np.random.default_rng([seed, round_, ATTACK_STREAM])
        chosen = rng.choice(sorted(clients), size=count, replace=False)
        return sorted(int(c) for c in chosen)

    def corrupt(self, update, received: dict, seed: int, round_: int):
        """What attacker ``update.client_id`` sends instead of ``update`` (a new
        :class:`~flora_lightning.strategy.ClientUpdate`; ``label_flip``: ``update`` itself).

        Args:
            update: the client's honest update, trained from ``received``.
            received: the state it received (same names and shapes as ``update.state``).
            seed: the run's seed (``trainer.seed``).
            round_: the round.
        """
        c = self.scale
        if self.kind == "label_flip":
            return update
        if self.kind == "num_samples":
            claimed = max(1, round(c * update.num_samples))
            return dataclasses.replace(update, num_samples=claimed)
        state = {}
        for index, name in enumerate(sorted(update.state)):
            g, w = received[name], update.state[name]
            if self.kind == "scale":
                sent = g + c * (w - g)
            elif self.kind == "sign_flip":
                sent = g - c * (w - g)
            else:  # gaussian
                key = [seed, round_, update.client_id, NOISE_STREAM, index]
                rng = np.random.default_rng(key)
                sent = g + g.new_tensor(c * rng.standard_normal(tuple(g.shape)))
            state[name] = sent.to(w.dtype)
        return dataclasses.replace(update, state=state)


class FlippedLabels:
    """A batch source (a datamodule or feature cache) whose ``attackers``' labels are flipped:
    ``y -> num_classes - 1 - y``; other clients' batches pass unchanged.

    Args:
        source: what yields a client's batches, ``client_dataloader(client, generator,
            batch_sampler)`` of ``(inputs, labels)``.
        attackers: the clients whose labels are flipped.
        num_classes: ``C``, the run's class count.
    """

    def __init__(self, source, attackers: list[int], num_classes: int) -> None:
        self.source, self.attackers, self.num_classes = source, set(attackers), num_classes

    def client_dataloader(self, client: int, generator, batch_sampler=None):
        loader = self.source.client_dataloader(client, generator, batch_sampler)
        if client in self.attackers:  # the loader reads collate_fn when it is iterated
            loader.collate_fn = _FlipCollate(loader.collate_fn, self.num_classes)
        return loader

    def __getattr__(self, name: str):  # everything else is the source's
        return getattr(self.source, name)


class _FlipCollate:
    """``collate`` whose labels come out flipped (a class, so worker processes can pickle it)."""

    def __init__(self, collate, num_classes: int) -> None:
        self.collate, self.num_classes = collate, num_classes

    def __call__(self, rows):
        inputs, labels = self.collate(rows)
        return inputs, self.num_classes - 1 - labels


class AttackRecord:
    """Records ``trainer.attack``: each round's drawn ``attackers`` (``summary.json`` rounds)
    and ``attack: {kind, fraction, scale}`` in the summary.

    A callback with only the two record hooks of
    :class:`~flora_lightning.callbacks.base.Callback` (not a subclass: the callbacks package
    imports torch, and this module must not).
    """

    def __init__(self, attack: Attack) -> None:
        self.attack = attack

    def round_fields(self, loop, record) -> dict:
        if record.round == 0:
            return {"attackers": []}
        return {"attackers": loop.round_attackers(record.round)}

    def summary_fields(self, loop, summary: dict) -> dict:
        return {"attack": dataclasses.asdict(self.attack)}
