"""Hooks the :class:`~flora_lightning.federation.loop.FederatedLoop` calls through ``fabric.call``.

Subclass :class:`Callback` and override what you need; pass instances in
``--trainer.callbacks``. Hooks receive the loop (the round engine of either runtime), so they
can read ``loop.fabric``, ``loop.round``, ``loop.run_dir`` and log with ``loop.fabric.log_dict``.

Records and the summary are not modified in place: a callback that adds fields to a round's
record or to ``summary.json`` returns them from :meth:`Callback.round_fields` /
:meth:`Callback.summary_fields` (a field already present is refused, naming the callback).
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

    def round_fields(self, loop, record) -> dict:
        """Extra fields for the round's :class:`~flora_lightning.rundir.round_record.RoundRecord` (its
        core fields are set; ``record["bytes_up"]`` reads them); written to summary.json."""
        return {}

    def on_round_end(self, loop, round: int, record) -> None:
        """After aggregation and evaluation; ``record`` is the finished
        :class:`~flora_lightning.rundir.round_record.RoundRecord` (read it, e.g. ``record["test_acc"]``)."""

    def summary_fields(self, loop, summary: dict) -> dict:
        """Extra top-level fields for summary.json (``summary`` holds the core ones)."""
        return {}

    def on_fit_end(self, loop, model, summary: dict) -> None:
        """After the last round, with the summary about to be written."""
