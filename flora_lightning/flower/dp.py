"""Client-level DP on Flower with Flower's own wrappers: server- or client-side clipping.

With ``privacy.level client`` the ServerApp wraps its :class:`FloraFedAvg` in one of Flower's
DP strategy wrappers (``flwr.serverapp.strategy``), chosen by the run config's ``dp-clipping``
and the YAML's ``privacy.adaptive_clipping``:

==============  ================================================  ==========================
dp-clipping     fixed ``clip_norm``                               adaptive
==============  ================================================  ==========================
``server``      ``DifferentialPrivacyServerSideFixedClipping``    ``...ServerSideAdaptive...``
``client``      ``DifferentialPrivacyClientSideFixedClipping``    ``...ClientSideAdaptive...``
                + ``fixedclipping_mod`` on every node             + ``adaptiveclipping_mod``
==============  ================================================  ==========================

Flower clips each update (on the server, or on the node so the server never sees it
unclipped), the wrapped :class:`FloraFedAvg` takes the unweighted, fixed-denominator mean
(the YAML's :class:`~flora_lightning.privacy.DPFedAvg` with ``clip_and_noise=False``), and
Flower adds ``N(0, (σ C / m)²)`` to it. What this module adds to Flower's classes, each for
``flora fit``'s result (see :mod:`flora_lightning.privacy.client_dp`):

- **seeded noise**: Flower draws from NumPy's global generator; each aggregation runs with it
  seeded by ``[seed, round]`` (the previous global state restored after), the words
  ``flora fit`` seeds its own generator with, so the two runtimes draw the same noise;
- **error, dropped and malformed replies** are recorded in the round and left out before
  Flower's wrapper sees them (:meth:`FloraFedAvg.screen`: names, dtypes and shapes those sent,
  fields that parse, finite values, Flower's ``norm_bit`` with client-side adaptive clipping).
  The wrapper would skip the whole round for one error reply, raise on fewer arrays or a
  shape that does not broadcast, and silently broadcast a ``(1,)`` array; ``flora fit`` skips
  the failed client, and the fixed denominator keeps the sensitivity at ``C / m``;
- **adaptive clipping** (:class:`QuantileRelease`): Flower 1.42 counts the *clipped* updates
  (its ``norm_bit``), noises the raw count and applies ``C · exp(−η (fraction − γ))``, which
  expects the *unclipped* share: its bound runs away from the quantile (to 0 or to infinity),
  and the raw count's sensitivity 1 breaks the noise split its ``compute_adaptive_noise_params``
  assumes (sensitivity 1/2), under-reporting ε. Here the wrappers' count and step are replaced
  by :func:`~flora_lightning.privacy.client_dp.noisy_unclipped_fraction` and
  :func:`~flora_lightning.privacy.client_dp.next_clip_norm` (the centred unclipped count over
  the ``m`` sampled clients, TF Privacy's estimator), the noise is scaled by the ``C`` this
  round's updates were clipped to (Flower scales it by the already updated ``C``), and a
  round that is not aggregated leaves ``C`` unchanged.

The bound used, the next bound and the noise std go back to the DPFedAvg after each round
(:meth:`DPFedAvg.record_release`), so the round record, ``summary.json`` and the resume state
read as in ``flora fit``; a resumed ServerApp starts the wrapper from the restored bound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import KEY_NORM_BIT, compute_stdv

from flora_lightning.flower.server_strategy import FloraFedAvg
from flora_lightning.privacy.client_dp import DPFedAvg, next_clip_norm, noisy_unclipped_fraction

CLIPPING_SIDES = ("server", "client")
"""Values of the run config's ``dp-clipping``: where Flower clips each update."""


@contextlib.contextmanager
def numpy_global_seed(words: list[int]) -> Iterator[None]:
    """NumPy's global generator seeded with ``words`` inside, restored after."""
    saved = np.random.get_state()
    np.random.seed(words)
    try:
        yield
    finally:
        np.random.set_state(saved)


class SeededRelease:
    """Mixed in before one of Flower's DP wrappers (see the module docstring)."""

    clipping_norm: float
    noise_multiplier: float
    num_sampled_clients: int
    strategy: FloraFedAvg

    def __init__(self, dp: DPFedAvg, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dp = dp
        self.round_clip_norm = self.clipping_norm

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = self.strategy.screen(server_round, replies)
        self.round_clip_norm = self.clipping_norm
        with numpy_global_seed(self.dp.noise_words(self.dp.rounds_done + 1)):
            arrays, metrics = super().aggregate_train(server_round, usable)
        std = 0.0
        if arrays is None:  # not aggregated: as in flora fit, C stays
            self.clipping_norm = self.round_clip_norm
        else:
            std = compute_stdv(self.noise_multiplier, self.round_clip_norm,
                               self.num_sampled_clients)  # fmt: skip
        self.dp.record_release(self.round_clip_norm, self.clipping_norm, std)
        return arrays, metrics

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        updated, self.clipping_norm = self.clipping_norm, self.round_clip_norm
        try:  # scaled by this round's bound, not the adapted one
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = updated


class QuantileRelease(SeededRelease):
    """Flower's adaptive wrappers with the quantile step of Andrew et al. (module docstring)."""

    clipped_count_stddev: float

    def _noisy_fraction(self, count: int, total: int) -> float:
        # Flower passes the *clipped* count over the ``total`` replies it aggregates (already
        # screened); the noise comes from NumPy's global generator, seeded around the round.
        return noisy_unclipped_fraction(
            total - count, total, self.num_sampled_clients, self.clipped_count_stddev, np.random
        )

    def _geometric_update(self, clipped_fraction: float) -> None:
        # Flower's name; the value is the unclipped share from ``_noisy_fraction`` above.
        self.clipping_norm = next_clip_norm(
            self.clipping_norm, clipped_fraction, self.dp.target_unclipped_quantile,
            self.clip_norm_lr,
        )  # fmt: skip


class ServerSideFixedClipping(SeededRelease, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, seeded (:class:`SeededRelease`)."""


class ClientSideFixedClipping(SeededRelease, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (nodes: ``fixedclipping_mod``), seeded."""


class ServerSideAdaptiveClipping(QuantileRelease, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, seeded, with the quantile step corrected and the
    noise scaled by the round's bound (:class:`QuantileRelease`)."""


class ClientSideAdaptiveClipping(QuantileRelease, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping (nodes: ``adaptiveclipping_mod``), seeded, with
    the quantile step corrected and the noise scaled by the round's bound."""


def with_flower_dp(strategy: FloraFedAvg, dp: DPFedAvg, side: str = "server"):
    """``strategy`` inside the Flower DP wrapper for ``side`` and ``dp``'s settings; ``dp``
    (the strategy's ``average``) now only takes the mean."""
    if side not in CLIPPING_SIDES:
        raise ValueError(f"dp-clipping must be one of {CLIPPING_SIDES} (got {side!r}).")
    dp.clip_and_noise = False
    m = dp.num_sampled_clients
    if dp.adaptive and side == "client":  # the wrapper reads it from every reply's records
        strategy.required_metrics = (*strategy.required_metrics, KEY_NORM_BIT)
    if dp.adaptive:
        wrapper = ServerSideAdaptiveClipping if side == "server" else ClientSideAdaptiveClipping
        return wrapper(
            dp, strategy, dp.noise_multiplier, m,
            initial_clipping_norm=dp.clip_norm,  # the restored bound, on resume
            # Flower's name; only our _geometric_update reads the target (as the unclipped share)
            target_clipped_quantile=dp.target_unclipped_quantile,
            clip_norm_lr=dp.clip_norm_lr,
            clipped_count_stddev=dp.clipped_count_stddev,
        )  # fmt: skip
    wrapper = ServerSideFixedClipping if side == "server" else ClientSideFixedClipping
    return wrapper(dp, strategy, dp.noise_multiplier, dp.clip_norm, m)
