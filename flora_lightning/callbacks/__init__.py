"""Fabric callbacks for the federated loop.

Turn them on in the config, e.g. ``--trainer.callbacks '[{class_path: MemoryProfiler},
{class_path: SpeedupVsFFT, init_args: {steps: 3}}]'``. :class:`CommunicationLogger` is always on
(the loop adds it when not given).
"""

from flora_lightning.callbacks.base import Callback
from flora_lightning.callbacks.communication import CommunicationLogger
from flora_lightning.callbacks.federated import FederatedEvaluation
from flora_lightning.callbacks.memory import MemoryProfiler
from flora_lightning.callbacks.personalized import PersonalizedEvaluation
from flora_lightning.callbacks.speedup import SpeedupVsFFT

__all__ = [
    "Callback",
    "CommunicationLogger",
    "FederatedEvaluation",
    "MemoryProfiler",
    "PersonalizedEvaluation",
    "SpeedupVsFFT",
]
