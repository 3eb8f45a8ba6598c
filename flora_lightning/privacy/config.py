"""``PrivacyConfig``: which differential-privacy level a run uses, and its parameters.

Two levels, each with the Gaussian mechanism and an accountant (see ``accountant.py``):

- ``sample``: DP-SGD inside every client's local fit (``dpsgd.py``): each example's gradient is
  clipped to ``max_grad_norm``, the sum gets noise ``N(0, (noise_multiplier * max_grad_norm)^2)``.
  The guarantee is per training example of a client.
- ``client``: DP-FedAvg on the server (``client_dp.py``): each client's update is clipped to
  ``clip_norm`` (fixed, or adapted by the quantile method), the round's mean gets noise of std
  ``noise_multiplier * clip_norm / clients_per_round``. The guarantee is per client.

Either ``noise_multiplier`` is given, or ``target_epsilon`` and the run picks the noise for the
planned rounds (:func:`~flora_lightning.privacy.accountant.noise_for_target`).
:func:`check_compatible` refuses the strategy and method combinations that are not supported,
before any training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flora_lightning.finite_values import check_finite_fields

LEVELS = ("none", "sample", "client")
SAMPLINGS = ("poisson", "shuffle")
ACCOUNTANTS = ("rdp", "prv")


@dataclass
class PrivacyConfig:
    """Differential privacy of a run (``--privacy.*``); ``level: none`` trains without it."""

    level: Literal["none", "sample", "client"] = "none"
    """none; sample (DP-SGD in each local fit); client (DP-FedAvg on the server)."""
    noise_multiplier: float | None = None
    """sigma: the Gaussian noise std in units of the clip bound (null: from target_epsilon)."""
    target_epsilon: float | None = None
    """The epsilon to reach after the planned rounds; picks noise_multiplier (null: give it)."""
    delta: float = 1e-5
    """delta of the (epsilon, delta) guarantee (the released code: 1e-5); below 1/#records."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus accountant: rdp (Renyi DP, the released code's) or prv (tighter, numerical)."""
    max_grad_norm: float = 1.0
    """sample level: the L2 bound of each example's gradient (the released code: 1.0)."""
    sampling: Literal["poisson", "shuffle"] = "poisson"
    """sample level: how each client's DP-SGD batches are drawn. poisson (the released code's,
    Opacus' default): every example joins each step with probability q = batch_size / n, and the
    accountant's q-subsampled bound holds; shuffle: fixed-size batches of a shuffled epoch,
    accounted as if Poisson, which is an approximation, not a bound."""
    per_example_chunk: int | None = None
    """sample level: examples whose gradients are computed at once; lower it when a batch's
    per-example backward (batch x classes captions through a LoRA text tower) runs out of
    memory (null: the whole batch). The result does not depend on it."""
    clip_norm: float = 1.0
    """client level: the L2 bound of each client's update, over all communicated tensors (with
    adaptive_clipping: its initial value)."""
    adaptive_clipping: bool = False
    """client level: adapt clip_norm each round towards the target_unclipped_quantile of the
    update norms (Andrew et al., 2021), from a noised count of unclipped clients."""
    target_unclipped_quantile: float = 0.5
    """adaptive clipping: gamma, the share of client updates to leave unclipped (the paper's
    target quantile: clip_norm settles where this share of update norms lies at or below it)."""
    target_clipped_quantile: float | None = None
    """Refused (renamed target_unclipped_quantile): it was applied with the opposite sign, so
    the bound moved away from its target; null only."""
    clip_norm_lr: float = 0.2
    """adaptive clipping: the geometric learning rate of clip_norm."""
    clipped_count_stddev: float | None = None
    """adaptive clipping: std of the noise on the clipped count (null: clients_per_round / 20,
    Flower's default)."""

    log_client_stats: bool = False
    """With DP on: still write per-client training losses (summary.json, TensorBoard) and the
    per-client label counts (label_table.txt). They are computed from the clients' data and are
    NOT covered by epsilon; off by default."""

    def __post_init__(self) -> None:
        check_finite_fields(self, lambda field: f"privacy.{field}")
        if self.level not in LEVELS:
            raise ValueError(f"privacy.level must be one of {list(LEVELS)} (got {self.level!r}).")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(
                f"privacy.accountant must be one of {list(ACCOUNTANTS)} (got {self.accountant!r})."
            )
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ValueError(
                f"privacy.noise_multiplier must be >= 0 (got {self.noise_multiplier}); "
                "e.g. 1.0, or leave it null and set privacy.target_epsilon."
            )
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(
                f"privacy.target_epsilon must be > 0 (got {self.target_epsilon}); e.g. 8.0, "
                "or leave it null for no privacy target."
            )
        if not 0 < self.delta < 1:
            raise ValueError(
                f"privacy.delta must be in (0, 1) (got {self.delta}); e.g. 1e-5, below one "
                "over the number of protected records."
            )
        if self.sampling not in SAMPLINGS:
            raise ValueError(
                f"privacy.sampling must be one of {list(SAMPLINGS)} (got {self.sampling!r})."
            )
        if not self.max_grad_norm > 0:
            raise ValueError(
                f"privacy.max_grad_norm must be > 0 (got {self.max_grad_norm}); e.g. 1.0."
            )
        if self.per_example_chunk is not None and self.per_example_chunk < 1:
            raise ValueError(
                f"privacy.per_example_chunk must be >= 1 or null (got {self.per_example_chunk})."
            )
        if not self.clip_norm > 0:
            raise ValueError(f"privacy.clip_norm must be > 0 (got {self.clip_norm}); e.g. 1.0.")
        if self.target_clipped_quantile is not None:
            raise ValueError(
                f"privacy.target_clipped_quantile={self.target_clipped_quantile} is no longer "
                "accepted: earlier versions counted clipped updates but applied the update for "
                "unclipped ones, so clip_norm moved away from its target. Set "
                "privacy.target_unclipped_quantile, the share of updates to leave unclipped "
                f"(the same target is {1 - self.target_clipped_quantile:g})."
            )
        if not 0 <= self.target_unclipped_quantile <= 1:
            raise ValueError(
                "privacy.target_unclipped_quantile must be in [0, 1] "
                f"(got {self.target_unclipped_quantile}); e.g. 0.5."
            )
        if not self.clip_norm_lr > 0:
            raise ValueError(f"privacy.clip_norm_lr must be > 0 (got {self.clip_norm_lr}).")
        if self.clipped_count_stddev is not None and not self.clipped_count_stddev >= 0:
            raise ValueError(
                f"privacy.clipped_count_stddev must be >= 0 or null "
                f"(got {self.clipped_count_stddev})."
            )
        self._check_level_fields()

    def _check_level_fields(self) -> None:
        given = self.noise_multiplier is not None, self.target_epsilon is not None
        if self.level == "none":
            # Settings that only mean something under DP: a run that silently trains without
            # privacy while its config asks for noise would be worse than an error.
            stray = [
                name
                for name, on in (
                    ("noise_multiplier", given[0]),
                    ("target_epsilon", given[1]),
                    ("adaptive_clipping", self.adaptive_clipping),
                )
                if on
            ]
            if stray:
                raise ValueError(
                    f"privacy.{stray[0]} is set but privacy.level is none: set privacy.level "
                    "to sample or client, or remove it."
                )
            return
        if all(given):
            raise ValueError(
                "privacy.noise_multiplier and privacy.target_epsilon are both set: give one "
                "(target_epsilon picks the noise multiplier for the planned rounds)."
            )
        if not any(given):
            raise ValueError(
                f"privacy.level={self.level} needs privacy.noise_multiplier (e.g. 1.0) or "
                "privacy.target_epsilon (e.g. 8.0)."
            )
        if self.adaptive_clipping and self.level != "client":
            raise ValueError(
                "privacy.adaptive_clipping applies to privacy.level=client only (sample level "
                "clips each example to privacy.max_grad_norm); set it to false."
            )

    @property
    def enabled(self) -> bool:
        """True for sample or client level."""
        return self.level != "none"

    @property
    def releases_client_stats(self) -> bool:
        """True when per-client statistics may go to the run's outputs (no DP, or the user
        asked for them with log_client_stats)."""
        return not self.enabled or self.log_client_stats

    @property
    def clip(self) -> float:
        """The clip bound of this level: max_grad_norm (sample) or clip_norm (client)."""
        return self.max_grad_norm if self.level == "sample" else self.clip_norm


def check_compatible(privacy: PrivacyConfig, strategy, method) -> None:
    """Refuse, before training, a privacy level the strategy or method cannot honour.

    Args:
        privacy: the run's privacy settings.
        strategy: the configured aggregation strategy (an instance or its class).
        method: the method (a :class:`~flora_lightning.methods.base.FederatedCLIPModule`
            instance or class).

    Raises:
        ValueError: naming the field to change:

        - any DP level with :class:`~flora_lightning.strategy.LoraProductAverage`: its
          aggregate is a non-linear function (SVD of the mean product) of each client's factors,
          so neither the client-level sensitivity bound (a clipped update moves the mean by at
          most ``clip_norm / n``) nor noise-then-post-process applies; at sample level the SVD
          is post-processing and would be fine, but it has no test here yet.
        - client level with any strategy other than plain FedAvg: DP-FedAvg replaces the
          aggregation (:class:`~flora_lightning.privacy.client_dp.DPFedAvg`).
        - sample level with FedFFT: per-example gradients hold ``batch x`` every trainable
          parameter (151 M at ViT-B/32: 19 GB per 32 examples).
    """
    if not privacy.enabled:
        return
    from flora_lightning.methods.fedfft import FedFFT
    from flora_lightning.strategy import FedAvg, LoraProductAverage

    strategy_cls = strategy if isinstance(strategy, type) else type(strategy)
    method_cls = method if isinstance(method, type) else type(method)
    if issubclass(strategy_cls, LoraProductAverage):
        raise ValueError(
            f"privacy.level={privacy.level} is not supported with trainer.strategy="
            "LoraProductAverage (its SVD of the mean B·A breaks the DP sensitivity analysis "
            "and is untested under DP): use FedAvg, with model.lora.freeze_a for an exact "
            "mean of the LoRA products (FFA-LoRA), or set privacy.level=none."
        )
    if privacy.level == "client" and strategy_cls is not FedAvg:
        from flora_lightning.privacy.client_dp import DPFedAvg

        if not issubclass(strategy_cls, DPFedAvg):
            raise ValueError(
                f"privacy.level=client replaces the aggregation with DP-FedAvg; "
                f"trainer.strategy={strategy_cls.__name__} cannot be combined with it: use "
                "FedAvg or set privacy.level=none."
            )
    if privacy.level == "sample" and issubclass(method_cls, FedFFT):
        raise ValueError(
            "privacy.level=sample needs per-example gradients of every trainable parameter, "
            "batch x 151 M floats for FedFFT at ViT-B/32: choose a parameter-efficient "
            "model.class_path (FLoRA, FedLC, FedVMLC, FedAA), or privacy.level=client."
        )
