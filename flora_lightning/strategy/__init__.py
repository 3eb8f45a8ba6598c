"""Aggregation strategies (one per module, Flower style)."""

from flora_lightning.strategy.base import ClientUpdate, State, Strategy, state_bytes
from flora_lightning.strategy.fedavg import FedAvg
from flora_lightning.strategy.fedopt import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
)
from flora_lightning.strategy.fedprox import FedProx
from flora_lightning.strategy.hetero_rank import SvdRedistribution, ZeroPaddingAverage, for_rank
from flora_lightning.strategy.lora_product import LoraProductAverage
from flora_lightning.strategy.robust import Krum, Median, MultiKrum, TrimmedMean
from flora_lightning.strategy.sparsity_weighted import SparsityWeightedAverage

__all__ = [
    "ClientUpdate",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Krum",
    "LoraProductAverage",
    "Median",
    "MultiKrum",
    "ServerOptimizer",
    "SparsityWeightedAverage",
    "State",
    "Strategy",
    "SvdRedistribution",
    "TrimmedMean",
    "ZeroPaddingAverage",
    "for_rank",
    "state_bytes",
]
