"""Labels for the model: class ids or targets, checked before any cluster starts.

``_labels_for(y, spec, what)`` returns int64 class ids ``0..K-1`` for a
classifier (integral floats and booleans converted) or float targets for a
regressor, and raises ValueError naming ``what`` otherwise. ``_n_classes``
is the class count a run trains (what the model kind fixes, else the
labels'). ``_preflight_files`` checks file sources' shapes and labels, and
that the test classes lie within the training ones.
"""
from __future__ import annotations

import numpy as np

from .. import registry
from .._util import is_dask
from ..datasets import fashion_mnist_files
from .schema import _Checker, _located
from .sources import _check_shapes, _load_files

def _preflight_files(wf, spec):
    """Shapes of file sources (read lazily): X 2-D, y 1-D, equal lengths — before any cluster."""
    check = _Checker(wf)
    items = [(("data", "source"), spec.data["source"])]
    if "test" in spec.data and "source" in spec.data["test"]:
        items.append((("data", "test", "source"), spec.data["test"]["source"]))
    classify = spec.classifier
    classes = {}
    for path, src in items:
        if src["kind"] == "fashion_mnist":
            with _located(check, path):
                fashion_mnist_files(src.get("split", "train"))
            classes[path] = np.arange(10)
            continue
        if src["kind"] != "files":
            continue
        with _located(check, path):
            X, y = _load_files(src)
            _check_shapes(X, y)
            # labels are small (8 bytes a row): check them here, before any cluster
            labels = y.compute(scheduler="sync") if is_dask(y) else np.asarray(y)
            labels = _labels_for(labels, spec, "the test labels" if "test" in path
                                 else "the labels")
            if classify:
                classes[path] = np.unique(labels)
    train, test = classes.get(("data", "source")), classes.get(("data", "test", "source"))
    if classify and train is not None and test is not None and "max_rows" not in spec.data:
        n_classes = _n_classes(spec, train, check)      # as run computes it
        outside = np.setdiff1d(test, np.arange(n_classes))
        if outside.size:
            check.fail(("data", "test", "source"), f"the test labels hold "
                       f"{outside[:5].tolist()}, outside the classes 0..{n_classes - 1} "
                       f"of the training data")

def _labels_for(y, spec, what):
    """Check/convert labels for the model: integer classes >= 0, or float targets."""
    y = np.asarray(y)
    model_kind = spec.model_kind
    if spec.classifier:
        if y.dtype.kind == "f":
            if not np.isfinite(y).all():
                raise ValueError(f"{what} contain NaN or infinite values")
            if not np.all(y == np.round(y)):
                raise ValueError(f"{what} are not integer class ids (e.g. "
                                 f"{y[y != np.round(y)][0]}); model kind {model_kind} is a "
                                 f"classifier")
            y = y.astype(np.int64)
        elif y.dtype.kind == "b":
            y = y.astype(np.int64)
        elif y.dtype.kind not in "iu":
            raise ValueError(f"{what} must be integer class ids, got dtype {y.dtype}")
        if y.size and y.min() < 0:
            raise ValueError(f"{what} hold negative values ({int(y.min())}); classes must be "
                             f"0, 1, ..., K-1")
        if registry.resolve("model", model_kind).binary and y.size and y.max() > 1:
            raise ValueError(f"{what} hold {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}, "
                             f"outside the classes 0, 1 of model kind {model_kind}")
        return y.astype(np.int64, copy=False)
    if y.dtype.kind not in "fiub":
        raise ValueError(f"{what} must be numbers, got dtype {y.dtype}")
    return y.astype(np.float64) if y.dtype.kind != "f" else y

def _n_classes(spec, classes, check):
    top = int(classes.max()) + 1 if classes.size else 2
    given = registry.resolve("model", spec.model_kind).fixed_classes(spec.model_kwargs)
    if given is not None:
        if top > given:
            check.fail(("model",), f"the labels go up to {top - 1}, outside the "
                       f"{given} classes of the model")
        return given
    return max(top, 2)

