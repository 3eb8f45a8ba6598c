"""Differential privacy: sample-level DP-SGD, client-level DP-FedAvg, and their accountant.

- ``config.py``: :class:`PrivacyConfig` (``--privacy.*``) and :func:`check_compatible`;
- ``accountant.py``: epsilon from Opacus' RDP/PRV accountants, per run or per client;
- ``client_dp.py``: :class:`DPFedAvg`, the client-level strategy (clip, mean, noise);
- ``dpsgd.py``: :class:`DPSGDStep`, the local step of sample-level DP-SGD.

The names below are imported on first use (PEP 562), so ``privacy.config`` (torch-free) loads
without Opacus and torch: ``flora`` checks ``--privacy.*`` before the heavy imports.
"""

from importlib import import_module

_EXPORTS = {
    "Accountant": "accountant",
    "ClientAccountants": "accountant",
    "local_steps": "accountant",
    "noise_for_target": "accountant",
    "resolve_noise_multiplier": "accountant",
    "DPFedAvg": "client_dp",
    "PrivacyConfig": "config",
    "check_compatible": "config",
    "DPSGDStep": "dpsgd",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
