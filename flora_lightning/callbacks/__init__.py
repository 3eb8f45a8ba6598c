"""Fabric callbacks for the federated loop."""

from flora_lightning.callbacks.base import Callback

__all__ = ["Callback"]
