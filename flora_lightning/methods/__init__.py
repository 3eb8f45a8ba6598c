"""Federated methods: each is a small :class:`FederatedCLIPModule` subclass."""

from flora_lightning.methods.base import FederatedCLIPModule, OptimizerConfig
from flora_lightning.methods.flora import FLoRA, LoraSettings

__all__ = ["FLoRA", "FederatedCLIPModule", "LoraSettings", "OptimizerConfig"]
