"""Training strategies: how the workers' computations are combined."""
from .base import RunContext, Strategy
from .fedavg import FedAvg
from .ps import ParameterServer
from .sync import SyncSGD

REGISTRY = {"sync": SyncSGD, "ps": ParameterServer, "fedavg": FedAvg}

__all__ = ["RunContext", "Strategy", "SyncSGD", "ParameterServer", "FedAvg", "REGISTRY"]
