"""dmlcore: train models on data partitioned across a Dask cluster.

    import dmlcore as dml
    data = dml.partition(X, y, n_partitions=8)
    result = dml.fit(dml.models.MLP([784, 256, 10]), data, dml.SyncSGD(batch_size=64),
                     dml.optim.SGD(lr=0.1, momentum=0.9), epochs=5)
"""
__version__ = "0.1.0"

from . import datasets, models, optim
from .data import PartitionedData, partition
from .estimators import LinearRegression, LogisticRegression, MLPClassifier, MLPRegressor
from .strategies import FedAvg, ParameterServer, SyncSGD
from .train import FitResult, fit

__all__ = ["datasets", "models", "optim", "partition", "PartitionedData", "SyncSGD",
           "ParameterServer", "FedAvg", "fit", "FitResult", "LinearRegression",
           "LogisticRegression", "MLPClassifier", "MLPRegressor"]
