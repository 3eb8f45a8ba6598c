"""Byzantine-robust aggregation: coordinate-wise Median and TrimmedMean, Krum and MultiKrum.

FedAvg's mean follows any single client arbitrarily far: one update scaled by 1e6 moves the
global model by ``1e6 / n`` times as much. These strategies bound what a minority of arbitrary
("Byzantine") updates can do, each under its own assumption. Let the round's ``n`` accepted
updates be ``w_1 .. w_n`` (each the whole communicated state; for LoRA the factors ``A`` and
``B`` as sent, exactly the tensors :class:`~flora_lightning.strategy.FedAvg` averages).

- :class:`Median` (Yin et al., 2018): per coordinate ``j``, ``w[j] = median_k w_k[j]`` (the
  mean of the two middle values when ``n`` is even, as ``numpy.median`` and Flower's
  ``FedMedian``). Sample counts are ignored: a weighted median would let one client that
  claims many samples decide every coordinate.
- :class:`TrimmedMean` (Yin et al., 2018): per coordinate, sort ``w_1[j] .. w_n[j]``, drop the
  ``k = floor(beta * n)`` smallest and the ``k`` largest and take the unweighted mean of the
  ``n - 2k`` left (as Flower's ``FedTrimmedAvg``). ``beta < 0.5`` leaves at least one value
  (``2 floor(beta n) <= 2 beta n < n``). Sample counts are ignored, as for the median.
- :class:`Krum` (Blanchard et al., 2017): with ``f`` the assumed number of Byzantine updates,
  each update gets the score ``s(i) = sum_{j in N_i} ||w_i - w_j||^2``, ``N_i`` its
  ``n - f - 2`` nearest other updates, the distance over the whole flattened state (every
  tensor, float64). Krum returns the update with the smallest score. It needs ``n > 2f + 2``
  (``n - f - 2 >= 1`` neighbours and an honest majority among them).
- :class:`MultiKrum` (Blanchard et al., 2017; as Flower's ``Krum`` with
  ``num_nodes_to_keep``): the sample-weighted mean ``sum_i n_i w_i / sum_i n_i`` of the ``m``
  updates with the smallest scores (``m = n - f`` by default; ``m = 1`` is Krum).

A tie in the Krum score goes to the lower client id: updates are ordered by client id before
scoring, so the result does not depend on the order replies arrive in (Flower delivers them in
any order). All four are stateless across rounds (nothing to resume: the base class's empty
:meth:`~flora_lightning.strategy.Strategy.state_dict`). Unlike the streaming FedAvg they keep
every accepted update of the round until :meth:`aggregate`: memory grows with ``n`` times the
communicated state (a few MB per client for LoRA; FedFFT's full model per client).

Trust: every strategy here still relies on :meth:`~flora_lightning.strategy.Strategy.add`'s
checks (names, shapes, finite values) and on the server choosing who takes part; they bound
the effect of values, not of identities (a Sybil with many clients is many updates).
"""

from __future__ import annotations

import math

import torch

from flora_lightning.strategy.base import ClientUpdate, State, Strategy


class KeepUpdates(Strategy):
    """A round that keeps its accepted updates (ordered by client id at :meth:`aggregate`).

    Args:
        min_clients: fewest accepted client updates for a round to count.
        max_num_samples: largest sample count an update may claim (None: unbounded).
    """

    def __init__(self, min_clients: int = 1, max_num_samples: int | None = None) -> None:
        super().__init__(min_clients=min_clients, max_num_samples=max_num_samples)
        self._updates: list[ClientUpdate] = []

    def start_round(self, global_state: State) -> None:
        self._updates = []

    def accumulate(self, update: ClientUpdate) -> None:
        state = {name: tensor.detach().clone() for name, tensor in update.state.items()}
        self._updates.append(
            ClientUpdate(update.client_id, state, update.num_samples, update.train_loss)
        )

    def updates(self) -> list[ClientUpdate]:
        """The round's accepted updates, by client id."""
        return sorted(self._updates, key=lambda u: u.client_id)

    def stacked(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of every update, stacked on dim 0 in float64 ``[n, *shape]``."""
        device = self.global_state[name].device
        return torch.stack([u.state[name].to(device, torch.float64) for u in self.updates()])

    def cast(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` in the global tensor ``name``'s dtype."""
        return value.to(self.global_state[name].dtype)


class Median(KeepUpdates):
    """Coordinate-wise median of the clients' tensors; sample counts are ignored.

    Args:
        min_clients: fewest accepted client updates for a round to count.
        max_num_samples: largest sample count an update may claim (None: unbounded; the
            median does not weigh by it, but a claim above it is still refused).
    """

    def aggregate(self) -> State:
        return {name: self.cast(name, coordinate_median(self.stacked(name)))
                for name in self.global_state}  # fmt: skip


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Median over dim 0; the mean of the two middle values when dim 0 is even (numpy's
    convention; ``torch.median`` returns the lower one)."""
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class TrimmedMean(KeepUpdates):
    """Coordinate-wise mean after dropping the ``floor(beta * n)`` smallest and largest values.

    Args:
        beta: fraction trimmed from each end, in [0, 0.5) (0: the unweighted mean). Default
            0.2, Flower's ``FedTrimmedAvg``'s.
        min_clients: fewest accepted client updates for a round to count.
        max_num_samples: largest sample count an update may claim (None: unbounded).
    """

    def __init__(
        self, beta: float = 0.2, min_clients: int = 1, max_num_samples: int | None = None
    ) -> None:
        super().__init__(min_clients=min_clients, max_num_samples=max_num_samples)
        if not (math.isfinite(beta) and 0 <= beta < 0.5):
            raise ValueError(
                f"trainer.strategy.beta must be in [0, 0.5) (got {beta}): it is the fraction "
                "trimmed from each end, and at least one value must be left per coordinate."
            )
        self.beta = beta

    def trimmed(self, n: int) -> int:
        """How many values are dropped from each end with ``n`` updates."""
        return math.floor(self.beta * n)

    def aggregate(self) -> State:
        new_state = {}
        for name in self.global_state:
            stacked = self.stacked(name)
            k = self.trimmed(stacked.shape[0])
            kept = stacked.sort(dim=0).values[k : stacked.shape[0] - k]
            new_state[name] = self.cast(name, kept.mean(dim=0))
        return new_state


class Krum(KeepUpdates):
    """The one update closest to its ``n - f - 2`` nearest others (Blanchard et al., 2017).

    Args:
        f: assumed number of Byzantine updates per round (Flower's ``num_malicious_nodes``).
        min_clients: fewest accepted updates for a round to count; null: ``2f + 3``, the
            fewest Krum can score (``n > 2f + 2``). A smaller value is refused.
        max_num_samples: largest sample count an update may claim (None: unbounded).
    """

    def __init__(
        self, f: int = 1, min_clients: int | None = None, max_num_samples: int | None = None
    ) -> None:
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ValueError(f"trainer.strategy.f must be an integer >= 0 (got {f!r}).")
        needed = 2 * f + 3
        if min_clients is not None and min_clients < needed:
            raise ValueError(
                f"trainer.strategy.min_clients={min_clients} is below what {type(self).__name__} "
                f"with f={f} needs: n > 2f + 2 = {needed - 1} updates; set "
                f"--trainer.strategy.min_clients {needed} (or leave it null), or a smaller f."
            )
        super().__init__(
            min_clients=needed if min_clients is None else min_clients,
            max_num_samples=max_num_samples,
        )
        self.f = f

    def scores(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """``s(i)``: summed squared distances of update ``i`` to its ``n - f - 2`` nearest.

        Raises:
            RuntimeError: ``n <= 2f + 2`` (e.g. a Flower ``min-clients`` below Krum's need).
        """
        n = len(updates)
        if n <= 2 * self.f + 2:
            raise RuntimeError(
                f"{type(self).__name__} with f={self.f} needs more than 2f + 2 = "
                f"{2 * self.f + 2} updates and got {n}; lower trainer.strategy.f or sample "
                "more clients (trainer.join_ratio)."
            )
        squared = torch.zeros(n, n, dtype=torch.float64)
        for name in self.global_state:  # one tensor at a time: n x tensor in memory
            flat = self.stacked(name).reshape(n, -1)
            for i in range(n):  # differences, not cdist's |a|^2 + |b|^2 - 2ab (cancellation)
                squared[i] += (flat - flat[i]).pow(2).sum(dim=1).cpu()
        # each row sorted: position 0 is the update itself (distance 0)
        nearest = squared.sort(dim=1).values[:, 1 : n - self.f - 1]
        return nearest.sum(dim=1)

    def selected(self) -> list[ClientUpdate]:
        """The update with the smallest score (ties: the lower client id)."""
        updates = self.updates()
        return [updates[int(torch.argmin(self.scores(updates)))]]

    def aggregate(self) -> State:
        chosen = self.selected()
        weight = float(sum(u.num_samples for u in chosen))
        new_state = {}
        for name, tensor in self.global_state.items():
            total = torch.zeros_like(tensor, dtype=torch.float64)
            for update in chosen:
                total.add_(update.state[name].to(tensor.device, torch.float64),
                           alpha=update.num_samples)  # fmt: skip
            new_state[name] = self.cast(name, total / weight)
        return new_state


class MultiKrum(Krum):
    """Sample-weighted mean of the ``m`` updates with the smallest Krum scores.

    Args:
        f: assumed number of Byzantine updates per round.
        m: how many updates are averaged; null: ``n - f`` (Blanchard et al.'s choice). Capped
            at the round's ``n``.
        min_clients: fewest accepted updates for a round to count; null: ``2f + 3``.
        max_num_samples: largest sample count an update may claim (None: unbounded); the
            weights of the mean are the claimed counts.
    """

    def __init__(
        self,
        f: int = 1,
        m: int | None = None,
        min_clients: int | None = None,
        max_num_samples: int | None = None,
    ) -> None:
        super().__init__(f=f, min_clients=min_clients, max_num_samples=max_num_samples)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"trainer.strategy.m must be an integer >= 1 or null (got {m!r}).")
        self.m = m

    def selected(self) -> list[ClientUpdate]:
        """The ``m`` updates with the smallest scores (stable: ties keep client-id order)."""
        updates = self.updates()
        scores = self.scores(updates)
        m = min(len(updates) - self.f if self.m is None else self.m, len(updates))
        order = torch.sort(scores, stable=True).indices[:m]
        return [updates[int(i)] for i in order]
