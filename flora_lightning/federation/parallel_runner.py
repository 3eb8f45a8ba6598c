"""K sampled clients' local fits in one batched computation, as a round runs them.

The batched counterpart of :func:`~flora_lightning.federation.client_runner.fit_client`::

    resolve_parallel_clients (trainer.parallel_clients: K, or auto from
    trainer.parallel_memory_mb; refused or K = 1 where the batched fit cannot apply)
    → run_client_groups: each sampled client's availability draw (dropped, straggler cap),
    then the others K at a time: fit_client_group (load the global state →
    on_client_fit_start per client → ParallelFit.fit: each client's own seeds, data, step
    cap, Adam state) → record_update and strategy.add per client, in client order

A dropped client is not in a group, a straggler brings its step cap. A group whose fit raises
is left out of the round as a whole (``trainer.on_client_error: skip``; one client's failure
cannot be told apart inside a batched step), each of its clients with the error as reason.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from flora_lightning.federation.client_runner import (
    ClientFit,
    admit_client,
    attacked_source,
    attacked_update,
    exclude_failed,
)
from flora_lightning.federation.parallel import ParallelFit, parallel_refusal
from flora_lightning.federation.parallel_memory import (
    ClientStepShape,
    client_step_bytes,
    pick_parallel_clients,
)
from flora_lightning.strategy import State

log = logging.getLogger(__name__)


def step_shape(model, batch_size: int) -> ClientStepShape:
    """The sizes of one client's step of ``model`` (see
    :mod:`~flora_lightning.federation.parallel_memory`): the text tower's when the method's
    loss encodes captions with trainable adapters (FLoRA), else the head's."""
    params = model.trainable_parameters()
    dtype_bytes = params[0].element_size() if params else 4
    config = model.clip_model().config
    shape = dict(
        trainable=model.num_trainable_parameters(),
        rows=batch_size,
        feature_dim=config.projection_dim,
        dtype_bytes=dtype_bytes,
    )
    if getattr(model, "lora", None) is not None:  # adapters in the text tower: it runs per step
        text = config.text_config
        captions, tokens = model.caption_ids.shape
        shape.update(
            layers=text.num_hidden_layers,
            width=text.hidden_size,
            heads=text.num_attention_heads,
            captions=captions,  # the union of K batches: at most every class
            tokens=tokens,
        )
    return ClientStepShape(**shape)


def free_memory_mb(device: torch.device) -> float:
    """Free memory of ``device`` in MiB: CUDA's free device memory, else the host's available
    RAM (what ``trainer.parallel_memory_mb: null`` budgets with ``auto``)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


def resolve_parallel_clients(
    engine, setting, memory_mb: float | None, clients_per_round: int
) -> int:
    """K for the run: ``setting`` (``trainer.parallel_clients``), ``auto`` picked from
    ``memory_mb`` (null: the device's free memory) and the method's step shape.

    Where the batched fit cannot apply (:func:`parallel_refusal`), an explicit K > 1 raises,
    naming the field; ``auto`` falls back to 1 and logs why.
    """
    if setting == 1:
        return 1
    reason = parallel_refusal(engine.local_trainer, engine.model, engine.feature_cache)
    if reason is not None:
        if setting == "auto":
            log.warning("trainer.parallel_clients=auto trains one client at a time: %s.", reason)
            return 1
        raise ValueError(
            f"trainer.parallel_clients={setting}: {reason}. Set trainer.parallel_clients 1."
        )
    if setting != "auto":
        return min(int(setting), clients_per_round)
    budget = memory_mb if memory_mb is not None else free_memory_mb(engine.fabric.device)
    per_client = client_step_bytes(step_shape(engine.model, engine.datamodule.batch_size))
    k = pick_parallel_clients(budget, per_client, clients_per_round)
    log.info(
        "trainer.parallel_clients=auto: K=%d (%.0f MiB budget, ~%.1f MiB per client).",
        k, budget, per_client / 2**20,
    )  # fmt: skip
    return k


def fit_client_group(
    engine, received: State, clients: list[int], round_: int, steps: list[int | None]
) -> list[ClientFit]:
    """Train ``clients`` in ``round_`` together from ``received`` (the global state) on
    ``engine``'s model, data, feature cache and local trainer; one :class:`ClientFit` each,
    in order (each cut to its rank by ``client_state_to_send``). Each gets an equal share of the group's wall time, so the round's summed
    ``train_seconds`` is the time it took."""
    engine.model.load_communicated_state(received)  # each client's rank slice: ParallelFit
    for client in clients:
        engine.fabric.call("on_client_fit_start", loop=engine, model=engine.model, client_id=client)
    t0 = time.perf_counter()
    updates = ParallelFit(engine.local_trainer).fit(
        engine.model,
        engine.datamodule,
        clients,
        round_,
        attacked_source(engine, round_, clients),
        engine.strategy.proximal_mu,
        steps,
        [engine.client_rank(c) for c in clients],
    )
    seconds = (time.perf_counter() - t0) / len(clients)
    sent = [engine.client_state_to_send(u) for u in updates]
    return [ClientFit(attacked_update(engine, received, u, round_), seconds) for u in sent]


def run_client_groups(loop, tally, received: State, round_: int, k: int) -> None:
    """Train ``tally``'s sampled clients K at a time from ``received`` (the global state) and
    hand each update to ``loop``'s round (``record_update``, ``strategy.add``), as
    :meth:`~flora_lightning.federation.loop.FederatedLoop.run_round` does one at a time."""
    ready, caps = [], []
    for client in tally.clients:
        admitted, steps = admit_client(loop, tally, round_, client)
        if admitted:  # a dropout sends nothing
            ready.append(client)
            caps.append(steps)
    for i in range(0, len(ready), k):
        group = ready[i : i + k]
        try:
            fits = fit_client_group(loop, received, group, round_, caps[i : i + k])
        except Exception as err:
            if loop.on_client_error == "raise":
                raise
            # no kept state was written (the store is written after the whole fit); each
            # client starts its next round fresh, as in the sequential round
            exclude_failed(loop, tally, group, round_, err, "batched fit")
            continue
        for fit in fits:
            loop.record_update(tally, fit.update, fit.seconds)
            loop.strategy.add(fit.update)
