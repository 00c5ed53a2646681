"""dmlcore: train models on data partitioned across a Dask cluster.

    import dmlcore as dml
    data = dml.partition(X, y, n_partitions=8)
    result = dml.fit(dml.models.MLP([784, 256, 10]), data, dml.SyncSGD(batch_size=64),
                     dml.optim.SGD(lr=0.1, momentum=0.9), epochs=5)

The public names are imported on first use (``dml.fit`` imports the training
code, ``dml.LogisticRegression`` scikit-learn), so ``import dmlcore`` and the
``dmlcore`` command stay fast; ``from dmlcore import *`` imports them all.
"""
import importlib

__version__ = "0.1.0"

# public name -> module that defines it (a submodule name maps to itself)
_LAZY = {
    "datasets": ".datasets", "models": ".models", "optim": ".optim",
    "partition": ".data", "PartitionedData": ".data",
    "LinearRegression": ".estimators", "LogisticRegression": ".estimators",
    "MLPClassifier": ".estimators", "MLPRegressor": ".estimators",
    "SyncSGD": ".strategies", "ParameterServer": ".strategies", "FedAvg": ".strategies",
    "fit": ".train", "FitResult": ".train",
    "load": ".outputs",
}

__all__ = ["datasets", "models", "optim", "partition", "PartitionedData", "SyncSGD",
           "ParameterServer", "FedAvg", "fit", "FitResult", "LinearRegression",
           "LogisticRegression", "MLPClassifier", "MLPRegressor", "load"]


def __getattr__(name):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'dmlcore' has no attribute {name!r}")
    module = importlib.import_module(target, __name__)
    value = module if target == "." + name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
