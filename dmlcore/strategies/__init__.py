"""Training strategies: how the workers' computations are combined (kinds: ``dmlcore.registry``)."""
from .base import RunContext, Strategy
from .fedavg import FedAvg
from .ps import ParameterServer
from .sync import SyncSGD

__all__ = ["RunContext", "Strategy", "SyncSGD", "ParameterServer", "FedAvg"]
