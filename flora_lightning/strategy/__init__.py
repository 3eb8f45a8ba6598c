"""Aggregation strategies (one per module, Flower style)."""

from flora_lightning.strategy.base import ClientUpdate, State, Strategy
from flora_lightning.strategy.fedavg import FedAvg

__all__ = ["ClientUpdate", "FedAvg", "State", "Strategy"]
