"""Federated methods: each is a small :class:`FederatedCLIPModule` subclass."""

from flora_lightning.methods.base import FederatedCLIPModule, OptimizerConfig
from flora_lightning.methods.fedaa import FedAA
from flora_lightning.methods.fedfft import FedFFT
from flora_lightning.methods.fedlc import FedLC
from flora_lightning.methods.fedvmlc import FedVMLC
from flora_lightning.methods.flora import FLoRA, LoraSettings

METHODS: dict[str, type[FederatedCLIPModule]] = {
    "flora": FLoRA,
    "fedfft": FedFFT,
    "fedlc": FedLC,
    "fedvmlc": FedVMLC,
    "fedaa": FedAA,
}
"""Short names (as in ``configs/<stem>_<name>.yaml``) of the methods the paper compares."""

__all__ = [
    "METHODS",
    "FLoRA",
    "FedAA",
    "FedFFT",
    "FedLC",
    "FedVMLC",
    "FederatedCLIPModule",
    "LoraSettings",
    "OptimizerConfig",
]
