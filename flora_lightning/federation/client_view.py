"""``ClientView``: what each sampled client receives and sends, for the round engine.

A client's side of a round, the same on both runtimes: the part of the global state it
receives (its LoRA rank's slice under ``trainer.client_ranks``), the model prepared for its fit
(zero-padded beyond its rank, those slots' gradients masked), what it sends afterwards (cut to
its rank, the mask taken off), and whether ``trainer.attack`` makes it an attacker this round.
:class:`~flora_lightning.federation.engine.RoundEngine` mixes it in; see
:mod:`flora_lightning.federation.ranks` for the rank arithmetic.
"""

from __future__ import annotations

from flora_lightning.federation.ranks import RankMask, padded_state, sliced_update
from flora_lightning.strategy import ClientUpdate, State, for_rank


class ClientView:
    """The per-client steps of a round; the engine provides ``model``, ``seed`` and
    ``round_clients``."""

    attack = None
    """Seeded Byzantine clients (:class:`~flora_lightning.federation.attack.Attack`); None: none."""
    ranks: list[int] | None = None
    """Each client's LoRA rank, resolved at the engine's ``set_up``; None: all at the model's."""
    _rank_mask: RankMask | None = None

    def round_attackers(self, round_: int) -> list[int]:
        """``trainer.attack``'s attackers of ``round_`` among its sampled clients (the seeded
        sampler's, which the Flower ServerApp uses too), or [] without an attack."""
        if self.attack is None:
            return []
        return self.attack.attackers(self.seed, round_, self.round_clients(round_))

    def client_rank(self, client: int) -> int | None:
        """``client``'s LoRA rank when it differs from the global model's, else None."""
        if self.ranks is None or self.ranks[client] == self.model.lora.rank:
            return None
        return self.ranks[client]

    def prepare_client(self, global_state: State, client: int) -> None:
        """Load what ``client`` starts its fit from into the model: ``global_state`` (the
        global state, or a rank-``r_k`` slice of it), for a lower-rank client zero-padded
        beyond its rank with those slots' gradients masked until :meth:`client_state_to_send`
        (see :mod:`flora_lightning.federation.ranks`)."""
        if self._rank_mask is not None:
            self._rank_mask.remove()
            self._rank_mask = None
        rank = self.client_rank(client)
        if rank is None:
            self.model.load_communicated_state(global_state)
            return
        params = dict(self.model.trainable_named_parameters())
        self.model.load_communicated_state(padded_state(global_state, rank, params))
        self._rank_mask = RankMask(params, rank)

    def client_state_to_send(self, update: ClientUpdate) -> ClientUpdate:
        """What the client sends after its fit: ``update`` cut to its rank (whole at the
        global rank); takes the gradient mask of :meth:`prepare_client` off."""
        if self._rank_mask is not None:
            self._rank_mask.remove()
            self._rank_mask = None
        rank = self.client_rank(update.client_id)
        return update if rank is None else sliced_update(update, rank)

    def state_for_client(self, global_state: State, client: int) -> State:
        """The part of ``global_state`` ``client`` receives: its rank's slice (views)."""
        rank = self.client_rank(client)
        return global_state if rank is None else for_rank(global_state, rank)
