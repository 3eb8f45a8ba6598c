"""DPFedAvg: client-level differential privacy on the server (McMahan et al., 2018).

With global state ``w`` sent to the ``m`` clients sampled this round and client ``k`` returning
``w_k``, every client's update, taken over all communicated tensors together, is clipped to L2
norm ``C`` (Flower's ``FlatClip``):

    Δ_k = w_k − w,     Δ'_k = Δ_k · min(1, C / ||Δ_k||₂)

and the new global state is their unweighted mean plus Gaussian noise, drawn once per round:

    w' = w + (Σ_k Δ'_k) / m + N(0, (σ C / m)² I)

One client changes the sum by at most ``C``, so the mean's sensitivity is ``C / m`` and the noise
std ``σ C / m`` (Flower's ``compute_stdv``) makes each round a Gaussian mechanism with noise
multiplier ``σ``; the accountant composes rounds with client sampling rate ``m / N``.

The mean is **unweighted** (``num_samples`` is ignored), the standard for client-level DP: a
sample-weighted mean lets a large client move it by ``n_k C / Σ n`` > ``C / m``. Flower's
``DifferentialPrivacyServerSideFixedClipping`` clips, hands the clipped replies to the wrapped
strategy (sample-weighted FedAvg unless the weights are equal) and adds ``σ C / m`` noise; with
its accountant enabled it refuses unequal weights, i.e. it requires this unweighted mean. The
denominator is the fixed ``m`` (McMahan et al.'s fixed-denominator estimator): a rejected update
contributes zero rather than shrinking ``m``, so the sensitivity stays ``C / m``.

**Adaptive clipping** (Andrew et al., 2021, as TF Privacy's ``QuantileEstimatorQuery`` does
it): the server counts the clients whose update was left *unclipped* (``b_k = 1`` when
``||Δ_k|| <= C``), centres each bit (``b_k − 1/2``, so one client moves the sum by at most 1/2),
noises the sum with std ``σ_b``, and moves ``C`` geometrically towards the ``γ`` quantile of the
norms, ``γ`` being the target share of *unclipped* updates (``privacy.target_unclipped_quantile``):

    f = clamp((Σ_k (b_k − 1/2) + N(0, σ_b²)) / m + 1/2, 0, 1)
    C ← C · exp(−η (f − γ))

Too many unclipped updates (``f > γ``) shrink ``C``; too few grow it, so ``C`` settles where a
share ``γ`` of the norms lies at or below it. The centred count has sensitivity 1/2, so it is a
Gaussian query with noise multiplier ``2 σ_b``; composed with the update's (multiplier ``σ_Δ``),
the pair spends what one query of multiplier ``(σ_Δ⁻² + (2 σ_b)⁻²)^(−1/2)`` does, which is the
``σ`` given to the accountant when ``σ_Δ = (σ⁻² − (2 σ_b)⁻²)^(−1/2)`` (``σ_b`` defaulting to
``m / 20``).

**Where we differ from Flower 1.42.** Its adaptive wrappers count the *clipped* updates (its
``norm_bit``), do not centre the count, and then apply the same ``exp(−η (fraction − γ))``:
the bound moves the wrong way (four updates of norms 2, 4, 6, 8 drive ``C`` to 0 from below the
median and to infinity from above it), and the uncentred count has sensitivity 1, so the noise
split above under-reports ε (at ``m = 10``, ``σ_b = 0.5``, ``σ = 0.9`` the pair's multiplier is
0.49, not 0.9). They also scale the round's noise by the already updated ``C``, which does not
match that round's sensitivity. The ServerApp's wrappers (:mod:`flora_lightning.flower.dp`)
replace those steps with the functions here, so both runtimes are right and equal.

**Noise.** Round ``r`` draws from NumPy's legacy generator seeded with ``[seed, r]``
(``np.random.RandomState``), in Flower's order and dtype: with adaptive clipping first the
count's ``normal(Σ b_k, σ_b)``, then, tensor by tensor in the state's order,
``normal(0, σ_Δ C / m, shape)`` cast to the tensor's dtype and added to the mean (Flower's
``add_gaussian_noise_inplace``). Flower's DP wrappers draw from NumPy's *global* generator; the
ServerApp seeds it with the same ``[seed, r]`` around each aggregation, so a Flower run through
Flower's own wrappers (server- or client-side clipping) equals ``flora fit`` for the same seed,
and a resumed run draws what the uninterrupted one does.

On Flower (``clip_and_noise=False``) the wrapper clips (or each node's clipping mod does) and
adds the noise; this strategy then only takes the fixed-denominator mean of the clipped
updates and records, through :meth:`record_release`, the bound and noise the wrapper used.

The math follows ``flwr.supercore.differential_privacy`` (the tests check it against those
functions); it is written in torch here because Flower is an optional extra.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flora_lightning.finite_values import check_finite
from flora_lightning.strategy.base import ClientUpdate, State, Strategy


def update_norm(update: State) -> float:
    """L2 norm of all tensors of ``update`` flattened together (Flower's ``get_norm``)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip_factor(norm: float, clip_norm: float) -> float:
    """``min(1, C / norm)``: the FlatClip scale (1 for a zero update)."""
    return 1.0 if norm <= clip_norm else clip_norm / norm


def noise_stddev(noise_multiplier: float, clip_norm: float, num_sampled_clients: int) -> float:
    """``σ C / m``: the std of the noise on the round's mean (Flower's ``compute_stdv``)."""
    return noise_multiplier * clip_norm / num_sampled_clients


def next_clip_norm(clip_norm: float, unclipped_fraction: float, target: float, lr: float) -> float:
    """``C · exp(−η (f − γ))``: the geometric step towards the ``γ`` quantile of the norms."""
    return clip_norm * math.exp(-lr * (unclipped_fraction - target))


def noisy_unclipped_fraction(
    unclipped: int, accepted: int, num_sampled_clients: int, stddev: float, rng
) -> float:
    """The noised share of unclipped updates, as TF Privacy's quantile estimator computes it.

    Each accepted update's bit is centred (``b − 1/2``: sensitivity 1/2), the sum gets one
    ``rng.normal(·, stddev)`` draw, is divided by the ``m`` sampled clients (the fixed
    denominator) and shifted back by 1/2, then clamped to ``[0, 1]`` (post-processing).

    Args:
        unclipped: accepted updates with norm ``<= C``.
        accepted: accepted updates this round (failed clients contribute no bit).
        num_sampled_clients: ``m``.
        stddev: ``σ_b``.
        rng: ``np.random.RandomState`` (or the ``np.random`` module, Flower's global one).
    """
    centred = unclipped - accepted / 2
    noised = float(rng.normal(centred, stddev))
    return min(1.0, max(0.0, noised / num_sampled_clients + 0.5))


def adaptive_noise_params(
    noise_multiplier: float, num_sampled_clients: int, clipped_count_stddev: float | None
) -> tuple[float, float]:
    """``(σ_b, σ_Δ)`` for adaptive clipping at total noise multiplier ``σ``.

    ``σ_b`` defaults to ``m / 20``, and ``σ_Δ = (σ⁻² − (2 σ_b)⁻²)^(−1/2)`` so the update and the
    *centred* count (sensitivity 1/2, :func:`noisy_unclipped_fraction`) together spend what
    ``σ`` does. With ``σ = 0`` both are 0 (no privacy, the count is exact).

    Raises:
        ValueError: naming ``privacy.clipped_count_stddev`` when ``σ >= 2 σ_b`` (no ``σ_Δ``).
    """
    if noise_multiplier == 0:
        return (clipped_count_stddev or 0.0), 0.0
    if clipped_count_stddev is None:
        clipped_count_stddev = num_sampled_clients / 20
    if noise_multiplier >= 2 * clipped_count_stddev:
        raise ValueError(
            f"privacy.clipped_count_stddev={clipped_count_stddev} (default: clients per round "
            f"/ 20) is too small for privacy.noise_multiplier={noise_multiplier}: it must "
            "exceed noise_multiplier / 2; raise it or sample more clients per round."
        )
    update_sigma = (noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5
    return clipped_count_stddev, update_sigma


class DPFedAvg(Strategy):
    """Client-level DP-FedAvg: clipped client updates, unweighted mean, Gaussian noise.

    Args:
        noise_multiplier: σ (``privacy.noise_multiplier``).
        clip_norm: C, the bound on each client's update norm (with ``adaptive``: its start).
        num_sampled_clients: m, the clients sampled per round (the noise divisor).
        seed: the run's seed; round ``r``'s noise comes from a generator seeded by
            ``(seed, r)``.
        adaptive: adapt ``clip_norm`` by the quantile method.
        target_unclipped_quantile: γ, the share of client updates to leave unclipped
            (adaptive; Andrew et al.'s target quantile).
        clip_norm_lr: η, the geometric step of ``clip_norm`` (adaptive).
        clipped_count_stddev: σ_b (adaptive; None: ``m / 20``).
        min_clients: fewest accepted updates for a round to count.
        clip_and_noise: clip, noise and adapt here (``flora fit``); False: the updates
            arrive clipped and Flower's DP wrapper adds the noise (the ServerApp).
    """

    def __init__(
        self,
        noise_multiplier: float,
        clip_norm: float,
        num_sampled_clients: int,
        seed: int = 42,
        adaptive: bool = False,
        target_unclipped_quantile: float = 0.5,
        clip_norm_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
        min_clients: int = 1,
        max_num_samples: int | None = None,
        clip_and_noise: bool = True,
    ) -> None:
        super().__init__(min_clients=min_clients, max_num_samples=max_num_samples)
        check_finite({
            "privacy.noise_multiplier": noise_multiplier,
            "privacy.clip_norm": clip_norm,
            "privacy.target_unclipped_quantile": target_unclipped_quantile,
            "privacy.clip_norm_lr": clip_norm_lr,
            "privacy.clipped_count_stddev": clipped_count_stddev,
        })  # fmt: skip
        if not noise_multiplier >= 0:
            raise ValueError(f"privacy.noise_multiplier must be >= 0 (got {noise_multiplier}).")
        if not clip_norm > 0:
            raise ValueError(f"privacy.clip_norm must be > 0 (got {clip_norm}).")
        if num_sampled_clients < 1:
            raise ValueError(
                f"DPFedAvg needs num_sampled_clients >= 1 (got {num_sampled_clients}): pass "
                "the loop's clients per round (trainer.join_ratio x data.num_clients)."
            )
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.num_sampled_clients = num_sampled_clients
        self.seed = seed
        self.adaptive = adaptive
        self.clip_and_noise = clip_and_noise
        if not 0 <= target_unclipped_quantile <= 1:
            raise ValueError(
                "privacy.target_unclipped_quantile must be in [0, 1] "
                f"(got {target_unclipped_quantile}); e.g. 0.5."
            )
        self.target_unclipped_quantile = target_unclipped_quantile
        self.clip_norm_lr = clip_norm_lr
        self.clipped_count_stddev, self.update_noise_multiplier = (
            adaptive_noise_params(noise_multiplier, num_sampled_clients, clipped_count_stddev)
            if adaptive
            else (0.0, noise_multiplier)
        )
        self.rounds_done = 0
        """Rounds aggregated so far; round ``rounds_done + 1`` is the next (noise seed)."""
        self.norms: dict[int, float] = {}
        """Client id -> its update's norm before clipping, this round."""
        self.round_clip_norm = clip_norm
        """The clip bound this round's updates were clipped to (adaptive: before the update)."""
        self.round_noise_std = 0.0
        """The std of the noise added to the last aggregate."""
        self._sum: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(
        cls,
        privacy,
        noise_multiplier: float,
        num_sampled_clients: int,
        seed: int = 42,
        min_clients: int = 1,
        max_num_samples: int | None = None,
    ) -> DPFedAvg:
        """The strategy of a :class:`~flora_lightning.privacy.config.PrivacyConfig` at client
        level, with its noise multiplier resolved (given, or from ``target_epsilon``)."""
        return cls(
            noise_multiplier=noise_multiplier,
            clip_norm=privacy.clip_norm,
            num_sampled_clients=num_sampled_clients,
            seed=seed,
            adaptive=privacy.adaptive_clipping,
            target_unclipped_quantile=privacy.target_unclipped_quantile,
            clip_norm_lr=privacy.clip_norm_lr,
            clipped_count_stddev=privacy.clipped_count_stddev,
            min_clients=min_clients,
            max_num_samples=max_num_samples,
        )

    def start_round(self, global_state: State) -> None:
        self._sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        self.norms = {}
        self.round_clip_norm = self.clip_norm

    def accumulate(self, update: ClientUpdate) -> None:
        delta = {
            name: tensor.to(self._sum[name].device, torch.float64)
            - self.global_state[name].to(self._sum[name].device, torch.float64)
            for name, tensor in update.state.items()
        }
        norm = update_norm(delta)
        self.norms[update.client_id] = norm
        factor = clip_factor(norm, self.round_clip_norm) if self.clip_and_noise else 1.0
        for name, d in delta.items():
            self._sum[name].add_(d, alpha=factor)

    def aggregate(self) -> State:
        round_ = self.rounds_done + 1
        m = self.num_sampled_clients
        new_state = {}
        for name, total in self._sum.items():  # insertion order: the global state's
            reference = self.global_state[name]
            new_state[name] = (reference.to(total.device, torch.float64) + total / m).to(
                device=reference.device, dtype=reference.dtype
            )
        if self.clip_and_noise:
            self._release(new_state, self.noise_generator(round_))
        self.rounds_done = round_
        return new_state

    def _release(self, state: State, rng: np.random.RandomState) -> None:
        """Flower's order: the count's noise and ``C``'s update (adaptive), then each
        tensor's noise, scaled by the ``C`` of this round."""
        if self.adaptive:
            unclipped = sum(norm <= self.round_clip_norm for norm in self.norms.values())
            fraction = noisy_unclipped_fraction(
                unclipped, len(self.norms), self.num_sampled_clients,
                self.clipped_count_stddev, rng,
            )  # fmt: skip
            self.clip_norm = next_clip_norm(
                self.round_clip_norm, fraction, self.target_unclipped_quantile, self.clip_norm_lr
            )
        std = noise_stddev(self.update_noise_multiplier, self.round_clip_norm,
                           self.num_sampled_clients)  # fmt: skip
        for tensor in state.values():
            noise = rng.normal(0, std, tuple(tensor.shape))
            tensor.add_(torch.from_numpy(noise).to(device=tensor.device, dtype=tensor.dtype))
        self.round_noise_std = std

    def record_release(self, round_clip_norm: float, clip_norm: float, noise_std: float) -> None:
        """What Flower's wrapper did this round (``clip_and_noise=False``): the bound the
        updates were clipped to, the bound for the next round, the noise's std."""
        self.round_clip_norm, self.clip_norm = round_clip_norm, clip_norm
        self.round_noise_std = noise_std

    def noise_words(self, round_: int) -> list[int]:
        """The seed words of round ``round_``'s noise: ``[seed, round]``."""
        return [self.seed, round_]

    def noise_generator(self, round_: int) -> np.random.RandomState:
        """The generator of round ``round_``'s noise (what Flower's wrapper draws from, once
        the ServerApp seeds NumPy's global generator with :meth:`noise_words`)."""
        return np.random.RandomState(self.noise_words(round_))

    def state_dict(self) -> State:
        """What a resume needs, as tensors (saved with the resume state): the rounds done
        (noise seeds) and the current clip bound."""
        return {
            "rounds_done": torch.tensor(self.rounds_done, dtype=torch.int64),
            "clip_norm": torch.tensor(self.clip_norm, dtype=torch.float64),
        }

    def load_state_dict(self, state: State) -> None:
        self.rounds_done = int(state["rounds_done"])
        self.clip_norm = float(state["clip_norm"])
