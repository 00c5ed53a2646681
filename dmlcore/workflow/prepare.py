"""Preparing a run's data: load, check, split off the holdout, partition.

``prepare_data(spec, client, wf, say)`` returns ``PreparedData``: the
``PartitionedData`` on ``client``'s workers, the evaluation set as
in-memory ``(X, y)`` (its dtype the training data's) or None, and the
sizes the model is built for (features; classes or targets). Every failure
is a ``WorkflowError`` naming the data key it comes from.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import registry
from .._util import is_dask
from ..data import partition
from .labels import _labels_for, _n_classes
from .schema import _Checker, _located
from .sources import _check_shapes, _load_source, _load_weights, _source_label

# data keys that are not partition() keywords
_NOT_PARTITION = ("source", "test", "partitions", "max_rows", "dtype", "weights")


def _to_numpy(a, client):
    import scipy.sparse as sp   # imported when data are loaded, not with the workflow package

    if sp.issparse(a):
        return a.tocsr()
    if is_dask(a):
        return np.asarray(client.compute(a).result() if client is not None else a.compute())
    return np.asarray(a)


def _or_list(names):
    """``a, b or c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass
class PreparedData:
    data: object                  # PartitionedData
    eval_data: tuple | None       # (X, y) numpy, or None
    n_features: int
    n_outputs: int                # classes (classifiers) or targets (regression)


def prepare_data(spec, client, wf, say=None):
    """Load, check and partition the data of ``spec`` on ``client``.

    ``say`` (a print-like callable, optional) gets one line before loading, one
    before partitioning and a one-line summary of the partitions' skew.
    """
    import scipy.sparse as sp

    say = say or (lambda message: None)
    check = _Checker(wf, spec.assignment)
    d = spec.data
    classify = spec.classifier
    say(f"loading data: {_source_label(d['source'])} ...")
    with _located(check, ("data", "source")):
        X, y = _load_source(d["source"], client)
        _check_shapes(X, y)
    weights = None
    if "weights" in d:
        with _located(check, ("data", "weights")):
            weights = _load_weights(d["weights"], int(X.shape[0]))
    with _located(check, ("data", "source")):
        if "max_rows" in d:
            X, y = X[:d["max_rows"]], y[:d["max_rows"]]
            weights = None if weights is None else weights[:d["max_rows"]]
    eval_data = None
    test = d.get("test")
    if test is not None and "holdout" in test:
        n = int(X.shape[0])
        k = test["holdout"]
        k = int(round(k * n)) if isinstance(k, float) else int(k)
        if not 1 <= k < n:
            check.fail(("data", "test", "split"), f"a holdout of {k} rows leaves no training "
                       f"data (the source has {n} rows)")
        if is_dask(X):      # synthetic and file data sets: the last rows are the holdout
            Xt, yt = X[n - k:], y[n - k:]
            X, y = X[:n - k], y[:n - k]
            weights = None if weights is None else weights[:n - k]
        else:
            order = np.random.default_rng(d.get("seed", 0)).permutation(n)
            Xt, yt = X[order[n - k:]], y[order[n - k:]]
            keep = np.sort(order[:n - k])
            X, y = X[keep], y[keep]
            weights = None if weights is None else weights[keep]
        with _located(check, ("data", "test")):
            eval_data = (_to_numpy(Xt, client), _to_numpy(yt, client))
    elif test is not None:
        with _located(check, ("data", "test", "source")):
            Xt, yt = _load_source(test["source"], client)
            _check_shapes(Xt, yt, "the test X")
            eval_data = (_to_numpy(Xt, client), _to_numpy(yt, client))

    if sp.issparse(X) and not registry.resolve("model", spec.model_kind).accepts_sparse:
        sparse_kinds = [k for k in registry.kinds("model")
                        if registry.resolve("model", k).accepts_sparse]
        check.fail(("model", "kind"), f"the data are sparse (a CSR .npz); model kind "
                   f"{spec.model_kind!r} takes dense data: use {_or_list(sparse_kinds)}")
    with _located(check, ("data", "source")):
        y = _to_numpy(y, client)
        y = _labels_for(y, spec, "the labels")
        dtype = d.get("dtype")
        if dtype is not None and np.dtype(X.dtype) != np.dtype(dtype):
            X = X.astype(dtype)
    n_outputs = 1
    if classify:
        classes = np.unique(y)
        n_outputs = _n_classes(spec, classes, check)
    elif y.ndim == 2:
        n_outputs = y.shape[1]
    if eval_data is not None:
        with _located(check, ("data", "test")):
            Xt, yt = eval_data
            if Xt.shape[1] != X.shape[1]:
                raise ValueError(f"the test set has {Xt.shape[1]} features, the training "
                                 f"data {X.shape[1]}")
            values = Xt.data if sp.issparse(Xt) else Xt
            if values.dtype.kind != "f" or not np.isfinite(values).all():
                bad = int((~np.isfinite(np.asarray(values, dtype=np.float64))).sum())
                raise ValueError(f"the test X contains {bad} NaN or infinite value(s)")
            yt = _labels_for(yt, spec, "the test labels")
            if classify:
                outside = np.setdiff1d(np.unique(yt), np.arange(n_outputs))
                if outside.size:
                    raise ValueError(f"the test labels hold {outside[:5].tolist()}, outside "
                                     f"the classes 0..{n_outputs - 1} of the training data")
            dtype = np.dtype(X.dtype) if np.dtype(X.dtype).kind == "f" else np.float64
            eval_data = (Xt.astype(dtype) if sp.issparse(Xt)
                         else np.ascontiguousarray(Xt, dtype=dtype), yt)
    kwargs = {k: v for k, v in d.items() if k not in _NOT_PARTITION}
    if weights is not None:
        kwargs["sample_weight"] = weights
    if "partitions" in d:
        kwargs["n_partitions"] = d["partitions"]
    say(f"partitioning {int(X.shape[0])} rows x {int(X.shape[1])} features into "
        f"{d.get('partitions', 'the default number of')} partitions "
        f"(scheme {d.get('scheme', 'iid')}) ...")
    with _located(check, ("data",)):
        data = partition(X, y, client=client, **kwargs)
    say(_skew_summary(data))
    if eval_data is not None and eval_data[0].dtype != data.dtype:
        eval_data = (eval_data[0].astype(data.dtype), eval_data[1])
    return PreparedData(data=data, eval_data=eval_data, n_features=data.n_features,
                        n_outputs=int(n_outputs))



def _skew_summary(data):
    """One line: rows per partition (min/mean/max) and, for labels, the largest skew."""
    rows = np.asarray(data.partition_sizes)
    line = (f"partitions: {data.n_partitions}, rows per partition {int(rows.min())}/"
            f"{rows.mean():.0f}/{int(rows.max())} (min/mean/max, imbalance "
            f"{rows.max() / rows.mean():.2f})")
    counts = getattr(data, "_class_count", None)
    if data.classes is not None and counts is not None:
        counts = np.asarray(counts, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            local = counts / counts.sum(axis=1, keepdims=True)
        tv = 0.5 * np.abs(local - counts.sum(axis=0) / counts.sum()).sum(axis=1)
        line += (f", label skew (total variation from the global mix) max "
                 f"{float(np.nanmax(tv)):.2f}")
    return line

