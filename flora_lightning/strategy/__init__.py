"""Aggregation strategies (one per module, Flower style)."""

from flora_lightning.strategy.base import ClientUpdate, State, Strategy, state_bytes
from flora_lightning.strategy.fedavg import FedAvg
from flora_lightning.strategy.lora_product import LoraProductAverage

__all__ = ["ClientUpdate", "FedAvg", "LoraProductAverage", "State", "Strategy", "state_bytes"]
