"""PrivacyConfig: bad settings fail at construction naming ``privacy.<field>``; unsupported
strategy and method combinations fail in ``check_compatible``."""

from __future__ import annotations

import pytest

from flora_lightning.methods import FLoRA
from flora_lightning.methods.fedfft import FedFFT
from flora_lightning.methods.fedlc import FedLC
from flora_lightning.privacy import DPFedAvg, PrivacyConfig, check_compatible
from flora_lightning.strategy import FedAvg, LoraProductAverage


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(level="sample", noise_multiplier=-0.1), "privacy.noise_multiplier must be >= 0"),
        (dict(level="client", noise_multiplier=1.0, clip_norm=0.0), "privacy.clip_norm"),
        (dict(level="client", noise_multiplier=1.0, clip_norm=-1.0), "privacy.clip_norm"),
        (dict(level="sample", noise_multiplier=1.0, max_grad_norm=0.0), "privacy.max_grad_norm"),
        (dict(level="sample", noise_multiplier=1.0, delta=0.0), "privacy.delta"),
        (dict(level="sample", noise_multiplier=1.0, delta=1.0), "privacy.delta"),
        (dict(level="sample", target_epsilon=0.0), "privacy.target_epsilon must be > 0"),
        (dict(level="sample", target_epsilon=-3.0), "privacy.target_epsilon must be > 0"),
        (
            dict(level="sample", noise_multiplier=1.0, target_epsilon=8.0),
            "privacy.noise_multiplier and privacy.target_epsilon are both set",
        ),
        (dict(level="client"), "needs privacy.noise_multiplier"),
        (dict(level="none", noise_multiplier=1.0), "privacy.noise_multiplier is set but"),
        (dict(level="none", target_epsilon=4.0), "privacy.target_epsilon is set but"),
        (dict(level="none", adaptive_clipping=True), "privacy.adaptive_clipping is set but"),
        (
            dict(level="sample", noise_multiplier=1.0, adaptive_clipping=True),
            "privacy.adaptive_clipping applies to privacy.level=client",
        ),
        (dict(level="secure"), "privacy.level must be one of"),
        (dict(level="sample", noise_multiplier=1.0, accountant="gdp"), "privacy.accountant"),
        (
            dict(level="client", noise_multiplier=1.0, target_unclipped_quantile=1.5),
            "privacy.target_unclipped_quantile",
        ),
        (  # the old name, whose meaning was inverted, is refused with the equivalent target
            dict(level="client", noise_multiplier=1.0, target_clipped_quantile=0.3),
            r"privacy.target_clipped_quantile=0.3 is no longer accepted.*target is 0.7",
        ),
        (dict(level="sample", noise_multiplier=1.0, sampling="fixed"), "privacy.sampling"),
        (dict(level="client", noise_multiplier=1.0, clip_norm_lr=0.0), "privacy.clip_norm_lr"),
        (
            dict(level="sample", noise_multiplier=1.0, per_example_chunk=0),
            "privacy.per_example_chunk",
        ),
        (
            dict(level="client", noise_multiplier=1.0, clipped_count_stddev=-1.0),
            "privacy.clipped_count_stddev",
        ),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PrivacyConfig(**kwargs)


def test_valid_settings_and_the_clip_of_each_level():
    assert not PrivacyConfig().enabled
    sample = PrivacyConfig(level="sample", noise_multiplier=0.0, max_grad_norm=0.5, clip_norm=3)
    assert sample.enabled and sample.clip == 0.5
    client = PrivacyConfig(level="client", target_epsilon=4.0, clip_norm=3.0)
    assert client.clip == 3.0 and client.noise_multiplier is None


def test_lora_product_average_is_refused_at_both_levels():
    for level in ("sample", "client"):
        privacy = PrivacyConfig(level=level, noise_multiplier=1.0)
        with pytest.raises(ValueError, match="trainer.strategy=LoraProductAverage"):
            check_compatible(privacy, LoraProductAverage(), FLoRA)


def test_client_level_takes_fedavg_or_dpfedavg_only():
    privacy = PrivacyConfig(level="client", noise_multiplier=1.0)
    check_compatible(privacy, FedAvg(), FLoRA)
    check_compatible(privacy, DPFedAvg(1.0, 1.0, num_sampled_clients=2), FLoRA)

    class Median(FedAvg):
        pass

    with pytest.raises(ValueError, match="trainer.strategy=Median cannot be combined"):
        check_compatible(privacy, Median, FLoRA)


def test_sample_level_refuses_full_fine_tuning():
    privacy = PrivacyConfig(level="sample", noise_multiplier=1.0)
    check_compatible(privacy, FedAvg, FLoRA)
    check_compatible(privacy, FedAvg, FedLC)
    with pytest.raises(ValueError, match="privacy.level=sample needs per-example gradients"):
        check_compatible(privacy, FedAvg, FedFFT)
    # Without DP nothing is refused.
    check_compatible(PrivacyConfig(), LoraProductAverage, FedFFT)
