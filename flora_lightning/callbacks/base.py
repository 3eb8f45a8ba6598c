"""Hooks the :class:`~flora_lightning.loop.FederatedLoop` calls through ``fabric.call``.

Subclass :class:`Callback` and override what you need; pass instances in
``--trainer.callbacks``. Hooks receive the loop, so they can read ``loop.fabric``,
``loop.round``, ``loop.run_dir`` and log with ``loop.fabric.log_dict``.
"""

from __future__ import annotations


class Callback:
    """No-op base: every hook the loop calls, in the order it calls them."""

    def on_fit_start(self, loop, model) -> None:
        """After setup, before round 0's evaluation."""

    def on_round_start(self, loop, round: int, clients: list[int]) -> None:
        """Before the sampled ``clients`` train."""

    def on_client_fit_start(self, loop, model, client_id: int) -> None:
        """After the global state is loaded into the model, before local training."""

    def on_client_fit_end(self, loop, model, update) -> None:
        """After local training; ``update`` is the :class:`ClientUpdate` about to be aggregated."""

    def on_round_end(self, loop, round: int, record: dict) -> None:
        """After aggregation and evaluation; ``record`` is the round's summary row (mutable)."""

    def on_fit_end(self, loop, model, summary: dict) -> None:
        """After the last round; ``summary`` is about to be written (mutable)."""
