"""Differential privacy: sample-level DP-SGD, client-level DP-FedAvg, and their accountant.

- ``config.py``: :class:`PrivacyConfig` (``--privacy.*``) and :func:`check_compatible`;
- ``accountant.py``: epsilon from Opacus' RDP/PRV accountants, per run or per client;
- ``client_dp.py``: :class:`DPFedAvg`, the client-level strategy (clip, mean, noise);
- ``dpsgd.py``: :class:`DPSGDStep`, the local step of sample-level DP-SGD.
"""

from flora_lightning.privacy.accountant import (
    Accountant,
    ClientAccountants,
    local_steps,
    noise_for_target,
    resolve_noise_multiplier,
)
from flora_lightning.privacy.client_dp import DPFedAvg
from flora_lightning.privacy.config import PrivacyConfig, check_compatible
from flora_lightning.privacy.dpsgd import DPSGDStep

__all__ = [
    "Accountant",
    "ClientAccountants",
    "DPFedAvg",
    "DPSGDStep",
    "PrivacyConfig",
    "check_compatible",
    "local_steps",
    "noise_for_target",
    "resolve_noise_multiplier",
]
