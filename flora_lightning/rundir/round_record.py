"""What a round leaves behind: the running :class:`RoundTally` and the finished :class:`RoundRecord`.

Both runtimes fill the same tally while a round runs (``flora fit`` from its clients' updates,
the Flower ServerApp from the replies it receives), and the
:class:`~flora_lightning.rundir.recorder.RunRecorder` turns it, with the evaluation, into the round's
record: one row of ``summary.json["rounds"]``. :meth:`RoundRecord.to_dict` is the only place
that row's layout is written.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class RoundTally:
    """A round while it runs: who trains, what travelled, who was aggregated and who was not.

    Attributes:
        round: the round (0 = evaluation before training).
        clients: client ids sampled for the round.
        started: ``time.perf_counter()`` when the round began (its wall time starts).
        bytes_down: bytes of the global state sent to the clients.
        bytes_up: bytes of the updates received.
        client_bytes_up: client id -> bytes of its update.
        train_loss: client id -> mean local training loss.
        train_seconds: summed local fit time (data loading included).
        accepted: clients whose updates were aggregated.
        rejected: client (or ``"node N"``) -> why its update was left out.
        aggregated: the strategy produced a new global state (enough updates accepted).
        dropped: client -> why it sent nothing (``dropout``, ``deadline``: see
            :mod:`flora_lightning.federation.availability`).
        stragglers: client -> the local steps it completed (fewer than a full fit).
    """

    round: int
    clients: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    bytes_down: int = 0
    bytes_up: int = 0
    client_bytes_up: dict[int, int] = field(default_factory=dict)
    train_loss: dict[int, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    accepted: list[int] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    aggregated: bool = False
    dropped: dict[str, str] = field(default_factory=dict)
    stragglers: dict[str, int] = field(default_factory=dict)


@dataclass
class RoundRecord:
    """One finished round, as ``summary.json["rounds"]`` holds it.

    Callbacks contribute more fields through
    :meth:`Callback.round_fields <flora_lightning.callbacks.base.Callback.round_fields>`;
    they land in :attr:`extra` and are written beside the core fields.
    """

    round: int
    test_acc: float
    test_loss: float
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_up_total: int = 0
    bytes_down_total: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0
    """Local fit time (data loading included); the rest of ``seconds`` minus
    ``eval_seconds`` is loop overhead: state copies, aggregation, sampling, logging."""
    eval_seconds: float = 0.0
    client_train_loss: dict[str, float] = field(default_factory=dict)
    accepted_clients: list[int] = field(default_factory=list)
    rejected_clients: dict[str, str] = field(default_factory=dict)
    dropped_clients: dict[str, str] = field(default_factory=dict)
    """Client -> why it sent nothing this round (``trainer.availability``)."""
    straggler_clients: dict[str, int] = field(default_factory=dict)
    """Client -> the local steps it completed, when fewer than a full fit."""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def core_fields(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"extra"}

    def to_dict(self) -> dict[str, Any]:
        """The summary row: core fields, then the callbacks' fields."""
        row = asdict(self)
        return {**{k: v for k, v in row.items() if k != "extra"}, **row["extra"]}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> RoundRecord:
        """A row of a saved history back as a record (unknown keys go to :attr:`extra`)."""
        core = cls.core_fields()
        return cls(
            **{k: v for k, v in row.items() if k in core},
            extra={k: v for k, v in row.items() if k not in core},
        )

    def __getitem__(self, key: str) -> Any:
        """Read a field by its summary name (``record["test_acc"]``, ``record["mb_up_total"]``)."""
        if key in self.core_fields():
            return getattr(self, key)
        return self.extra[key]

    def __contains__(self, key: str) -> bool:
        return key in self.core_fields() or key in self.extra
