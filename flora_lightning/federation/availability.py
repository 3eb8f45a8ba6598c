"""Unreliable clients: seeded dropouts, stragglers and a round deadline in simulated seconds.

Real federations lose clients. :class:`Availability` (``trainer.availability``) describes how,
and :meth:`Availability.draw` says what happens to one client in one round as an :class:`Event`:

- **dropped** with probability ``dropout``: the client sends nothing (it is not trained);
- otherwise a **straggler** with probability ``straggler``: it completes only
  ``floor(straggler_fraction * local_steps)`` local steps (at least 1), as the released code's
  ``train_slow``; so ``P(straggler) = (1 - dropout) * straggler``;
- otherwise **trained**: all its local steps.

The deadline works in simulated seconds. Each client has a speed, drawn once per run from the
seed: ``seconds_per_step = exp(speed_spread * z)``, ``z ~ N(0, 1)`` (log-normal, median one
second per step, so ``deadline`` reads as "local steps of a median client"). A client's
simulated duration is ``steps run * seconds_per_step``; one that would finish after
``deadline`` is dropped too (reason ``"deadline"``), so with a deadline slow clients with much
data miss rounds, as in a real synchronous round.

Every draw comes from ``numpy.random.default_rng([seed, round, client, stream])`` (the speed
from ``[seed, 0, client, SPEED_STREAM]``), so it depends on nothing but these numbers: a resumed
run, a Flower ServerApp and ``flora fit`` see the same events, whatever the order clients are
asked in. The streams differ from :meth:`LocalTrainer.seed_for
<flora_lightning.federation.local_trainer.LocalTrainer.seed_for>`'s (0 and 1), so the events are independent of
the clients' training randomness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from flora_lightning.finite_values import check_finite_fields

EVENT_STREAM = 100
"""Stream of the per-(round, client) dropout and straggler draws."""
SPEED_STREAM = 101
"""Stream of a client's speed (round 0: one speed per client for the whole run)."""


@dataclass(frozen=True)
class Event:
    """What happens to one client in one round."""

    round: int
    client: int
    kind: Literal["trained", "straggler", "dropped"]
    """``dropped`` clients send nothing; ``straggler`` ones run only :attr:`steps` steps."""
    reason: Literal["", "dropout", "deadline"]
    """Why a client was dropped (empty otherwise)."""
    steps: int
    """Local steps the client runs (0 when dropped)."""
    seconds: float
    """Simulated duration of the steps it would run (``steps * seconds_per_step``)."""
    seconds_per_step: float
    """The client's simulated speed (fixed for the run)."""

    @property
    def dropped(self) -> bool:
        """The client sends nothing this round."""
        return self.kind == "dropped"


@dataclass
class Availability:
    """How clients fail: per-round dropout, stragglers and an optional deadline.

    All zero (the default) is a federation where every sampled client trains fully.
    """

    dropout: float = 0.0
    """Probability in [0, 1] that a sampled client drops out of a round (sends nothing)."""
    straggler: float = 0.0
    """Probability in [0, 1] that a client that did not drop out is a straggler."""
    straggler_fraction: float = 0.5
    """Share in (0, 1] of its local steps a straggler completes (floor, at least one)."""
    deadline: float | None = None
    """Round deadline in simulated seconds (a median client runs one step per second); clients
    that would finish later are dropped. null: no deadline."""
    speed_spread: float = 0.5
    """Log-normal sigma >= 0 of the clients' seconds per step (0: every client takes 1 s)."""

    def __post_init__(self) -> None:
        check_finite_fields(self, lambda field: f"trainer.availability.{field}")
        for field in ("dropout", "straggler"):
            value = getattr(self, field)
            if not 0 <= value <= 1:
                raise ValueError(
                    f"trainer.availability.{field} must be a probability in [0, 1] (got {value})."
                )
        if not 0 < self.straggler_fraction <= 1:
            raise ValueError(
                "trainer.availability.straggler_fraction must be in (0, 1] (got "
                f"{self.straggler_fraction}); it is the share of local steps a straggler runs."
            )
        if self.deadline is not None and not self.deadline > 0:
            raise ValueError(
                f"trainer.availability.deadline must be > 0 simulated seconds or null (got "
                f"{self.deadline})."
            )
        if not self.speed_spread >= 0:
            raise ValueError(
                f"trainer.availability.speed_spread must be >= 0 (got {self.speed_spread}); "
                "0 gives every client one second per step."
            )

    def seconds_per_step(self, seed: int, client: int) -> float:
        """The client's simulated seconds per local step (the same every round)."""
        z = np.random.default_rng([seed, 0, client, SPEED_STREAM]).standard_normal()
        return math.exp(self.speed_spread * z)

    def draw(self, seed: int, round_: int, client: int, local_steps: int) -> Event:
        """What happens to ``client`` in ``round_`` when a full fit is ``local_steps`` steps.

        A pure function of its arguments and the settings.

        Raises:
            ValueError: a negative seed, round, client or step count.
        """
        if min(seed, round_, client, local_steps) < 0:
            raise ValueError(
                f"seed, round, client and local_steps must be >= 0 (got {seed}, {round_}, "
                f"{client}, {local_steps})."
            )
        u_dropout, u_straggler = np.random.default_rng([seed, round_, client, EVENT_STREAM]).random(
            2
        )
        speed = self.seconds_per_step(seed, client)
        if u_dropout < self.dropout:
            return Event(round_, client, "dropped", "dropout", 0, 0.0, speed)
        kind: Literal["trained", "straggler"] = "trained"
        steps = local_steps
        if u_straggler < self.straggler:
            kind = "straggler"
            steps = min(local_steps, max(1, math.floor(self.straggler_fraction * steps + 1e-9)))
        seconds = steps * speed
        if self.deadline is not None and seconds > self.deadline:
            return Event(round_, client, "dropped", "deadline", 0, seconds, speed)
        return Event(round_, client, kind, "", steps, seconds, speed)
