"""``SecAggConfig``: the SecAgg+ settings of the secure-aggregation apps (run-config ``secagg-*``).

The secure-aggregation ServerApp and ClientApp (:mod:`~flora_lightning.flower.secagg_server`,
:mod:`~flora_lightning.flower.secagg_client`) read the same run config as the plain apps plus
these keys, all optional::

    secagg-num-shares = 1.0                 # int > 2: shares per secret; float: share of the
                                            # sampled clients (1.0: every client)
    secagg-reconstruction-threshold = 0.5   # int: shares needed to reconstruct; float: share
                                            # of num-shares (Flower raises it to at least 2)
    secagg-clipping-range = 8.0             # every weighted value is clipped to [-c, c]
    secagg-quantization-range = 4194304     # Q: integers per value (2**22)
    secagg-modulus-range = 4294967296       # masks live in [0, 2**32)
    secagg-max-weight = 0.0                 # w_max; 0: the largest partition's sample count
    secagg-timeout = 0.0                    # seconds per protocol stage; 0: wait for all

Quantisation tolerance. A client ``k`` with ``n_k`` samples sends ``r_k * w_k`` quantised with
stochastic rounding to steps of ``2c / Q``, where ``r_k = round(Q n_k / w_max) / Q``; the
server divides the unmasked sum by ``sum_k r_k``. So, element-wise, for values with
``|r_k w_k| <= c`` (nothing clipped),

    |secagg - sum_k r_k w_k / sum_k r_k| < K * (2c / Q) / sum_k r_k ~= 2 c K w_max / (Q N)

with ``K`` clients aggregated and ``N = sum_k n_k``; and the weights ``r_k`` differ from
``n_k / w_max`` by at most ``1 / (2Q)`` each, which moves the mean by at most
``max_k |w_k - mean| * K / (2 Q sum_k r_k)``. :func:`quantisation_bound` gives the sum of both.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.server.workflow import SecAggPlusWorkflow

from flora_lightning.finite_values import check_finite_fields

PREFIX = "secagg-"
"""Run-config keys with this prefix belong to :class:`SecAggConfig`."""


@dataclass(frozen=True)
class SecAggConfig:
    """Flower's :class:`~flwr.server.workflow.SecAggPlusWorkflow` settings (same meaning)."""

    num_shares: int | float = 1.0
    """Shares of each client's secrets: an int (> 2) or a share of the sampled clients."""
    reconstruction_threshold: int | float = 0.5
    """Shares that reconstruct a secret: an int (< num_shares) or a share of num_shares; the
    protocol survives while every client keeps this many live neighbours."""
    clipping_range: float = 8.0
    """Values ``r_k * w_k`` are clipped to ``[-clipping_range, clipping_range]``."""
    quantization_range: int = 2**22
    """Integers each value is quantised to (``Q``)."""
    modulus_range: int = 2**32
    """Range of the masks (a power of 2 above ``quantization_range * clients``)."""
    max_weight: float = 0.0
    """``w_max`` of the weights ``n_k / w_max``; 0 takes the largest partition's size (the
    finest weights that never exceed 1)."""
    timeout: float = 0.0
    """Seconds the server waits for the replies of each stage; 0: until all have replied."""

    def __post_init__(self) -> None:
        check_finite_fields(self, lambda field: PREFIX + field.replace("_", "-"))
        if not self.max_weight >= 0:
            raise ValueError(
                f"secagg-max-weight must be >= 0 (got {self.max_weight}); 0 uses the largest "
                "partition's sample count."
            )
        if not self.timeout >= 0:
            raise ValueError(f"secagg-timeout must be >= 0 (got {self.timeout}); 0: no limit.")
        if not self.clipping_range > 0:
            raise ValueError(f"secagg-clipping-range must be > 0 (got {self.clipping_range}).")
        try:  # Flower's own checks of shares, threshold and ranges, before anything runs
            self.workflow(self.max_weight or 1.0)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"SecAgg+ run config: {err} (set it with the run-config key secagg-<name>, "
                "dashes for underscores, e.g. secagg-num-shares)."
            ) from err

    def workflow(self, max_weight: float) -> SecAggPlusWorkflow:
        """Flower's SecAgg+ workflow with these settings and the resolved ``max_weight``."""
        return SecAggPlusWorkflow(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            max_weight=max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus_range,
            timeout=self.timeout or None,
        )

    @classmethod
    def from_run_config(cls, run_config: dict) -> SecAggConfig:
        """The ``secagg-*`` keys of a run config (dash- or underscore-keyed)."""
        known = set(cls.__dataclass_fields__)
        values = {}
        for key, value in run_config.items():
            name = key.replace("-", "_").removeprefix(PREFIX.replace("-", "_"))
            if name not in known:
                raise ValueError(
                    f"unknown run-config key {key!r}; SecAgg+ keys are "
                    f"{sorted(PREFIX + k.replace('_', '-') for k in known)}."
                )
            values[name] = value
        return cls(**values)


def split_run_config(run_config: dict) -> tuple[dict, dict]:
    """``(flora keys, secagg keys)`` of a run config: the plain apps' keys and ``secagg-*``."""
    secagg = {k: v for k, v in run_config.items() if k.replace("_", "-").startswith(PREFIX)}
    flora = {k: v for k, v in run_config.items() if k not in secagg}
    return flora, secagg


def quantisation_bound(config: SecAggConfig, weights: list[float], spread: float) -> float:
    """Largest element-wise gap between SecAgg+'s weighted mean and the exact one.

    Args:
        config: the protocol settings (``max_weight`` already resolved, > 0).
        weights: the aggregated clients' sample counts ``n_k``.
        spread: ``max_k |w_k - mean|`` over the elements (how far an update is from the mean).
    """
    q, c = config.quantization_range, config.clipping_range
    ratios = [round(q * n / config.max_weight) / q for n in weights]
    total = sum(ratios)
    rounding = len(weights) * (2 * c / q) / total  # stochastic rounding: < 1 step each
    weighting = spread * len(weights) / (2 * q * total)  # each r_k off by <= 1/(2Q)
    return rounding + weighting
