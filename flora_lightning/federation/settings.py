"""The ``trainer.*`` settings' types and checks, torch-free.

:class:`~flora_lightning.federation.loop.FederatedLoop` runs :func:`check_settings` when it is
built, and ``flora`` runs it before torch and the other heavy libraries are imported
(:mod:`flora_lightning.config_check`), so a wrong value is reported at once. Only the standard
library here: this module must stay importable without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flora_lightning.federation.parallel_memory import (
    ParallelClients,
    check_parallel_settings,
)

Precision = Literal["32-true", "16-mixed", "bf16-mixed"]
OnClientError = Literal["skip", "raise"]
OnTooFewUpdates = Literal["raise", "skip"]
ON_TOO_FEW_UPDATES = ("raise", "skip")
"""Values of ``trainer.on_too_few_updates``."""


CudaGraphs = Literal["auto", "off"]
"""Values of ``trainer.cuda_graphs``."""

SHARE_TOLERANCE = 1e-6
"""How far the tiers' shares may sum from 1."""


@dataclass
class RankTier:
    """A share of the clients that trains at one LoRA rank."""

    rank: int
    """LoRA rank of these clients (1 to ``model.lora.rank``)."""
    share: float
    """Share of the clients in (0, 1]; the tiers' shares sum to 1."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"trainer.client_ranks: a tier's rank must be >= 1 (got {self.rank}).")
        if isinstance(self.share, bool) or not (math.isfinite(self.share) and 0 < self.share <= 1):
            raise ValueError(
                f"trainer.client_ranks: a tier's share must be in (0, 1] (got {self.share})."
            )


ClientRanks = list[int] | list[RankTier] | None
"""``trainer.client_ranks``: one rank per client, tiers, or null (all at ``model.lora.rank``)."""


def as_tiers(client_ranks: list) -> list[RankTier] | None:
    """The entries as tiers (dicts become :class:`RankTier`), or None for a list of ranks."""
    is_tier = [isinstance(e, (RankTier, dict)) for e in client_ranks]
    if all(is_tier):
        return [e if isinstance(e, RankTier) else RankTier(**e) for e in client_ranks]
    if any(is_tier) or not all(
        isinstance(e, int) and not isinstance(e, bool) for e in client_ranks
    ):
        raise ValueError(
            f"trainer.client_ranks must be a list of ints (one rank per client) or a list of "
            f"tiers {{rank, share}}, not a mix (got {client_ranks})."
        )
    return None


def check_client_ranks(client_ranks: ClientRanks) -> None:
    """Refuse what is wrong whatever the model and data: empty, ranks < 1, shares not summing
    to 1 (at construction, before anything loads)."""
    if client_ranks is None:
        return
    if not client_ranks:
        raise ValueError("trainer.client_ranks is empty; give one rank per client, tiers or null.")
    tiers = as_tiers(client_ranks)
    if tiers is None:
        low = [r for r in client_ranks if r < 1]
        if low:
            raise ValueError(f"trainer.client_ranks: every rank must be >= 1 (got {low[0]}).")
        return
    total = sum(t.share for t in tiers)
    if abs(total - 1) > SHARE_TOLERANCE:
        raise ValueError(
            f"trainer.client_ranks: the tiers' shares must sum to 1 (got {total:.6g}); e.g. "
            "[{rank: 8, share: 0.2}, {rank: 2, share: 0.8}]."
        )


def check_settings(
    rounds: int,
    local_epochs: int,
    max_local_steps: int | None,
    join_ratio: float,
    precision: str,
    resume_every_n_rounds: int,
    keep_last_checkpoints: int | None,
    on_client_error: str,
    client_ranks: ClientRanks = None,
    client_state_dir: str | None = None,
    cuda_graphs: CudaGraphs = "auto",
    compile: bool = False,
    on_too_few_updates: str = "raise",
    parallel_clients: ParallelClients = 1,
    parallel_memory_mb: float | None = None,
    resume_without_manifest: bool = False,
    **_: object,
) -> None:
    """Refuse bad ``trainer.*`` values, naming the field and the fix."""
    if rounds < 0:
        raise ValueError(f"trainer.rounds must be >= 0 (got {rounds}).")
    if local_epochs < 1:
        raise ValueError(f"trainer.local_epochs must be >= 1 (got {local_epochs}).")
    if max_local_steps is not None and max_local_steps < 1:
        raise ValueError(f"trainer.max_local_steps must be >= 1 or null (got {max_local_steps}).")
    if isinstance(join_ratio, bool) or not (math.isfinite(join_ratio) and 0 < join_ratio <= 1):
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
    if on_client_error not in ("skip", "raise"):
        raise ValueError(
            f"trainer.on_client_error must be skip or raise (got {on_client_error!r})."
        )
    if not isinstance(resume_without_manifest, bool):
        raise ValueError(
            "trainer.resume_without_manifest must be true or false (got "
            f"{resume_without_manifest!r})."
        )
    check_on_too_few_updates(on_too_few_updates)
    check_client_ranks(client_ranks)
    check_capture_settings(cuda_graphs, compile)
    check_parallel_settings(parallel_clients, parallel_memory_mb)
    if client_state_dir is not None and Path(client_state_dir).is_file():
        raise ValueError(
            f"trainer.client_state_dir={client_state_dir!r} is a file; give a folder (created "
            "when missing) or null to keep the clients' optimizer states in memory."
        )


def check_on_too_few_updates(value: str) -> None:
    """Refuse a ``trainer.on_too_few_updates`` other than raise or skip, naming the field."""
    if value not in ON_TOO_FEW_UPDATES:
        raise ValueError(
            f"trainer.on_too_few_updates must be raise or skip (got {value!r}): raise stops the "
            "run at a round with fewer than trainer.strategy.min_clients accepted updates, skip "
            "records that round unaggregated and goes on."
        )


def check_capture_settings(cuda_graphs: str, compile: bool) -> None:
    """Refuse bad ``trainer.cuda_graphs`` / ``trainer.compile`` values, naming the field."""
    if cuda_graphs not in ("auto", "off"):
        raise ValueError(f"trainer.cuda_graphs must be auto or off (got {cuda_graphs!r}).")
    if not isinstance(compile, bool):
        raise ValueError(f"trainer.compile must be true or false (got {compile!r}).")
