"""``CommunicationLogger``: bytes sent up and down, per round, per client and in total.

The loop measures what travels (``bytes_up`` = sum over the round's clients of their update's
``numel * element_size``; ``bytes_down`` = the global state's bytes times the number of
clients) and keeps the running totals in each round record, where a resumed run finds them.
This callback is the one place that reports them: the loop adds it by default, so every run
logs ``comm/*`` to TensorBoard once.
"""

from __future__ import annotations

from flora_lightning.callbacks.base import Callback
from flora_lightning.strategy import state_bytes

MB = 1e6
"""Bytes in a megabyte (decimal, as network traffic is counted)."""


class CommunicationLogger(Callback):
    """Logs communication per round and cumulatively.

    TensorBoard, at step ``round``: ``comm/bytes_up``, ``comm/bytes_down``,
    ``comm/bytes_up_total``, ``comm/bytes_down_total``, ``comm/mb_up_total``,
    ``comm/mb_down_total`` and ``comm/client_{id}_bytes_up``. Round record: ``mb_up_total``,
    ``mb_down_total`` and ``client_bytes_up`` (per client). Summary: ``bytes_up_total``,
    ``bytes_down_total``, ``mb_up_total`` and ``mb_down_total`` of the whole run.
    """

    def __init__(self) -> None:
        self.client_bytes_up: dict[int, int] = {}

    def on_round_start(self, loop, round: int, clients: list[int]) -> None:
        self.client_bytes_up = {}

    def on_client_fit_end(self, loop, model, update) -> None:
        self.client_bytes_up[update.client_id] = state_bytes(update.state)

    def round_fields(self, loop, record) -> dict:
        return {
            "mb_up_total": record.bytes_up_total / MB,
            "mb_down_total": record.bytes_down_total / MB,
            "client_bytes_up": {str(c): b for c, b in sorted(self.client_bytes_up.items())},
        }

    def on_round_end(self, loop, round: int, record) -> None:
        keys = ("bytes_up", "bytes_down", "bytes_up_total", "bytes_down_total")
        scalars = {f"comm/{key}": record[key] for key in (*keys, "mb_up_total", "mb_down_total")}
        scalars.update(
            {f"comm/client_{c}_bytes_up": b for c, b in sorted(self.client_bytes_up.items())}
        )
        loop.fabric.log_dict(scalars, step=round)
        self.client_bytes_up = {}

    def summary_fields(self, loop, summary: dict) -> dict:
        if not loop.history:
            return {}
        last = loop.history[-1]
        return {
            "bytes_up_total": last.bytes_up_total,
            "bytes_down_total": last.bytes_down_total,
            "mb_up_total": last.bytes_up_total / MB,
            "mb_down_total": last.bytes_down_total / MB,
        }
