"""One client's local fit in one round, as both runtimes run it.

::

    availability_event (trainer.availability, seeded per (seed, round, client): dropped,
    straggler or a full fit; admit_client records it in-process) → prepare_client (the
    received global state; a lower rank's slice, zero-padded and masked) → on_client_fit_start → LocalTrainer.fit (an attacker of
    trainer.attack label_flip: on flipped labels) → client_state_to_send (the client's rank
    slice) → attacked_update (trainer.attack: what an attacker sends instead)

:class:`~flora_lightning.federation.loop.FederatedLoop` runs it for each sampled client; the
Flower ClientApp (:mod:`flora_lightning.flower.client_app`) for its partition on the received
state, and its clipping mod asks the same draw whether the client drops out before Flower's mod
sees the reply. Both runtimes therefore train a client identically for the same seed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from flora_lightning.federation.attack import FlippedLabels
from flora_lightning.federation.availability import Event
from flora_lightning.strategy import ClientUpdate, State

log = logging.getLogger(__name__)


def availability_event(engine, round_: int, client: int) -> Event | None:
    """What ``trainer.availability`` makes of ``client`` in ``round_`` (None without it):
    the draw seeded by ``(seed, round, client)`` over the client's full local steps."""
    if engine.availability is None:
        return None
    data = engine.datamodule
    full = engine.local_trainer.planned_steps(data.num_samples(client), data.batch_size)
    return engine.availability.draw(engine.seed, round_, client, full)


def admit_client(engine, tally, round_: int, client: int) -> tuple[bool, int | None]:
    """Draw ``client``'s :func:`availability_event` in ``round_`` and record on ``tally`` what
    it makes of it: ``(False, None)`` for a dropout (it sends nothing), else ``(True, cap)``
    with a straggler's step cap (None: a full fit). The in-process round, one client or K at
    a time, admits each sampled client so."""
    event = availability_event(engine, round_, client)
    if event is not None and event.dropped:
        engine.record_dropped(tally, client, event.reason)
        return False, None
    if event is not None and event.kind == "straggler":
        engine.record_straggler(tally, client, event.steps)
    return True, None if event is None else event.steps


def exclude_failed(
    engine, tally, clients: list[int], round_: int, err: Exception, how: str = "fit"
) -> None:
    """Record ``clients``, whose ``how`` (their fit, or batched fit) raised ``err``
    (``trainer.on_client_error: exclude``), as rejected in ``round_``. Adam updates a kept
    state in place, so a fit stopped midway could leave it half updated: each starts its next
    round with a fresh optimizer."""
    log.warning("clients %s excluded from round %d: their %s raised %r", clients, round_, how, err)
    for client in clients:
        engine.record_rejected(tally, str(client), f"its {how} raised {type(err).__name__}: {err}")
        engine.local_trainer.optimizer_states.pop(client, None)


def attacked_source(engine, round_: int, clients: list[int]):
    """The batch source ``clients`` train from in ``round_``: the feature cache (None: the
    datamodule, as LocalTrainer.fit takes it), with ``trainer.attack: label_flip``
    attackers' labels flipped."""
    source = engine.feature_cache
    attack = getattr(engine, "attack", None)
    if attack is None or attack.kind != "label_flip":
        return source
    attackers = [c for c in engine.round_attackers(round_) if c in clients]
    if not attackers:
        return source
    num_classes = len(engine.datamodule.class_names)
    return FlippedLabels(source or engine.datamodule, attackers, num_classes)


def attacked_update(engine, received: State, update: ClientUpdate, round_: int) -> ClientUpdate:
    """What ``update.client_id`` sends in ``round_``: ``update``, or, for an attacker of
    ``trainer.attack``, the attack's :meth:`~flora_lightning.federation.attack.Attack.corrupt`
    of it (``received``: the global state or its rank slice, as the client got it)."""
    attack = getattr(engine, "attack", None)
    if attack is None or update.client_id not in engine.round_attackers(round_):
        return update
    own = engine.state_for_client(received, update.client_id)  # its rank's slice
    return attack.corrupt(update, own, engine.seed, round_)


@dataclass(frozen=True)
class ClientFit:
    """What one client's fit produced."""

    update: ClientUpdate
    """What the client sends: its communicated state (its rank's slice), samples and loss."""
    seconds: float
    """Wall time of the local fit (data loading included)."""


def fit_client(
    engine, received: State, client: int, round_: int, steps: int | None = None
) -> ClientFit:
    """Train ``client`` in ``round_`` from ``received`` (the global state, or its rank slice)
    on ``engine``'s set-up model, data and local trainer.

    Args:
        engine: a set-up :class:`~flora_lightning.federation.engine.RoundEngine`.
        received: the state the client starts from.
        client: the client (partition) id.
        round_: the run's round (seeds the client's data order and dropout).
        steps: local steps to run (a straggler's share, from :func:`availability_event`);
            None: a full fit.
    """
    engine.prepare_client(received, client)
    engine.fabric.call("on_client_fit_start", loop=engine, model=engine.model, client_id=client)
    t0 = time.perf_counter()
    update = engine.local_trainer.fit(
        engine.model,
        engine.datamodule,
        client,
        round_,
        attacked_source(engine, round_, [client]),
        engine.strategy.proximal_mu,
        steps,
    )
    seconds = time.perf_counter() - t0
    sent = engine.client_state_to_send(update)
    return ClientFit(attacked_update(engine, received, sent, round_), seconds)
