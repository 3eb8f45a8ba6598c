"""Federated methods: each is a small :class:`FederatedCLIPModule` subclass.

The names below are imported on first use (PEP 562), so ``methods.settings`` (torch-free)
loads without torch: ``flora`` checks ``--model.*`` before the heavy imports. ``METHODS``
(short names, as in ``configs/<stem>_<name>.yaml``, of the methods the paper compares, to their
classes) imports every method.
"""

from importlib import import_module

_EXPORTS = {
    "FederatedCLIPModule": "base",
    "OptimizerConfig": "settings",
    "LoraSettings": "settings",
    "FLoRA": "flora",
    "FedFFT": "fedfft",
    "FedLC": "fedlc",
    "FedVMLC": "fedvmlc",
    "FedAA": "fedaa",
}
_SHORT_NAMES = {"flora": "FLoRA", "fedfft": "FedFFT", "fedlc": "FedLC", "fedvmlc": "FedVMLC",
                "fedaa": "FedAA"}  # fmt: skip
__all__ = sorted(["METHODS", *_EXPORTS])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    if name == "METHODS":
        methods = {short: __getattr__(cls) for short, cls in _SHORT_NAMES.items()}
        globals()["METHODS"] = methods
        return methods
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
