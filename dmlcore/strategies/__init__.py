"""Training strategies: how the workers' computations are combined."""
from .base import RunContext, Strategy
from .sync import SyncSGD

__all__ = ["RunContext", "Strategy", "SyncSGD"]
