"""Generalised linear models: ``Linear``, ``Logistic``, ``Softmax``.

Each is one layer named ``"linear"`` in the flat parameter vector (see
``base.Model``): ``W`` then ``b``.  ``loss_grad`` calls the fused one-pass
kernels of ``dmlcore._ext.loss`` (sums over rows, no regularisation); this
module only converts the inputs where needed and checks the layout. X may be
a ``scipy.sparse`` matrix: it is used as CSR (converted once if another
format) and streamed by the CSR kernels without densifying.

``init(seed)`` draws the weights from N(0, 0.01^2) with ``numpy.random.
default_rng(seed)`` (seed-dependent and small, so the losses start near their
value at zero) and sets the biases to 0.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._ext import loss as _loss
from ..penalty import linear_strengths, logistic_strengths
from .base import Model

_INIT_SCALE = 0.01


class _GLM(Model):
    """Shared plumbing: one layer ``"linear"`` with W (n_features, k), b (k,)."""

    kind = None
    # what the workflow runner needs of a registered kind (``dmlcore.workflow.build``)
    inferred_keys = ("n_features",)   # constructor keywords filled in from the data
    extra_keys = ()                   # file keys beyond the remaining constructor keywords
    accepts_sparse = True             # trains on scipy.sparse CSR rows
    binary = False                    # labels 0/1 only
    # a workflow's model-section penalty: its keys, their defaults, their meaning
    penalty_keys = ("penalty", "l1_ratio", "C")
    penalty_defaults = ("l2", None, 1.0)
    _strengths = staticmethod(logistic_strengths)

    @classmethod
    def penalty(cls, config, n):
        """``(l1, weight_decay)`` on the mean loss that the penalty keys of ``config``
        ask for (scikit-learn's meanings, ``dmlcore.penalty``); ``n``: the total weight."""
        values = [config.get(k, d) for k, d in zip(cls.penalty_keys, cls.penalty_defaults)]
        return cls._strengths(*values, n)

    @classmethod
    def for_data(cls, n_features, n_outputs, **config):
        """This kind for data of ``n_features`` columns (None: not known yet, a placeholder)."""
        return cls(n_features=n_features or 4, **config)

    @classmethod
    def fixed_classes(cls, config):
        """The class count ``config`` fixes (None: the labels tell)."""
        return None

    def __init__(self, n_features: int):
        n_features = _check_positive_int("n_features", n_features)
        self.n_features = n_features

    def _layer_shapes(self):
        """One output (Linear, Logistic): W (n_features,), b (1,); Softmax overrides."""
        return [("linear", (self.n_features,), (1,))]

    # ---- parameters ------------------------------------------------------
    def init(self, seed=0, dtype=np.float64) -> np.ndarray:
        """Flat parameters: W ~ N(0, 0.01^2) from ``default_rng(seed)``, b = 0."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        rng = np.random.default_rng(seed)
        params = np.zeros(self.n_params, dtype=dtype)
        view = self.views(params)["linear"]
        view["W"][...] = rng.normal(0.0, _INIT_SCALE, size=view["W"].shape)
        return params

    # ---- input conversion ------------------------------------------------
    def _prepare(self, params, X, grad=None):
        params = self._check_params(params)
        X = X.tocsr() if sp.issparse(X) else np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(
                f"X: expected shape (n_samples, {self.n_features}), got {X.shape}")
        if X.dtype != params.dtype:
            raise ValueError(
                f"dtype mix: X is {X.dtype} but params are {params.dtype} "
                "(X, params and grad must share a dtype)")
        if not sp.issparse(X) and not X.flags.c_contiguous:
            X = np.ascontiguousarray(X)
        if not params.flags.c_contiguous:
            params = np.ascontiguousarray(params)
        if grad is not None:
            if not isinstance(grad, np.ndarray):
                raise ValueError("grad must be a numpy array (the output buffer)")
            if grad.shape != (self.n_params,):
                raise ValueError(f"grad: expected shape ({self.n_params},), got {grad.shape}")
            if grad.dtype != X.dtype:
                raise ValueError(
                    f"dtype mix: X is {X.dtype} but grad is {grad.dtype} "
                    "(X, params and grad must share a dtype)")
            if not grad.flags.writeable or not grad.flags.c_contiguous:
                raise ValueError("grad must be a writeable contiguous array")
        return params, X

    def _check_y_shape(self, X, y):
        y = np.asarray(y)
        if y.shape != (X.shape[0],):
            raise ValueError(f"y: expected shape ({X.shape[0]},), got {y.shape}")
        return y

    def _kernel(self, X, y, params, grad, w, trainable):
        """The model's loss kernel on dense or CSR ``X`` (already prepared)."""
        compute_grad = self._compute_grad(trainable)
        K = self.n_classes if self.loss == "softmax" else None
        if sp.issparse(X):
            return _loss.loss_grad_csr(self.loss, X, y, params, grad, n_classes=K,
                                       sample_weight=w, compute_grad=compute_grad)
        dense = getattr(_loss, "loss_grad_" + self.loss)
        args = (X, y, params, grad) + ((K,) if K is not None else ())
        return dense(*args, sample_weight=w, compute_grad=compute_grad)

    def _compute_grad(self, trainable):
        self.trainable_mask(trainable)              # validates the names
        return trainable is None or "linear" in trainable

    def decision_function(self, params, X) -> np.ndarray:
        """Raw linear predictor X W + b (shape (n,) for k = 1, else (n, k))."""
        params = self._check_params(params)
        X = (X.tocsr().astype(params.dtype, copy=False) if sp.issparse(X)
             else np.asarray(X, dtype=params.dtype))
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(
                f"X: expected shape (n_samples, {self.n_features}), got {X.shape}")
        v = self.views(params)["linear"]
        z = np.asarray(X @ v["W"]) + v["b"]
        return z

    def to_config(self) -> dict:
        return {"kind": self.kind, "n_features": self.n_features}


class Linear(_GLM):
    """Linear regression: y-hat = X w + b, loss 1/2 sum (y-hat - y)^2."""

    kind = "linear"
    loss = "squared"  # the kernel of dmlcore._ext.loss
    penalty_keys = ("penalty", "l1_ratio", "alpha")      # Ridge, or Lasso/ElasticNet
    penalty_defaults = ("l2", None, 0.0)
    _strengths = staticmethod(linear_strengths)
    is_classifier = False
    n_outputs = 1

    def loss_grad(self, params, X, y, grad, trainable=None, sample_weight=None) -> float:
        params, X = self._prepare(params, X, grad)
        y = self._check_y_shape(X, y)
        w = self._row_weights(X.shape[0], sample_weight, X.dtype)
        if y.dtype != X.dtype or not y.flags.c_contiguous:
            y = np.ascontiguousarray(y, dtype=X.dtype)
        return self._kernel(X, y, params, grad, w, trainable)

    def predict(self, params, X) -> np.ndarray:
        """y-hat, shape (n,)."""
        return self.decision_function(params, X)


class Logistic(_GLM):
    """Binary logistic regression: P(y=1) = sigmoid(X w + b), log-loss."""

    kind = "logistic"
    loss = "logistic"  # the kernel of dmlcore._ext.loss
    binary = True

    @classmethod
    def fixed_classes(cls, config):
        return 2

    is_classifier = True
    n_outputs = 1
    n_classes = 2

    def loss_grad(self, params, X, y, grad, trainable=None, sample_weight=None) -> float:
        params, X = self._prepare(params, X, grad)
        y = self._check_y_shape(X, y)
        w = self._row_weights(X.shape[0], sample_weight, X.dtype)
        if y.dtype != X.dtype or not y.flags.c_contiguous:
            if not (y.dtype.kind in "biuf"):
                raise ValueError(f"y: labels must be 0/1 numbers or booleans, got {y.dtype}")
            y = np.ascontiguousarray(y, dtype=X.dtype)
        return self._kernel(X, y, params, grad, w, trainable)

    def predict(self, params, X) -> np.ndarray:
        """P(y = 1 | x), shape (n,)."""
        z = self.decision_function(params, X)
        out = np.empty_like(z)
        pos = z >= 0
        e = np.exp(-np.abs(z))
        out[pos] = 1.0 / (1.0 + e[pos])
        out[~pos] = e[~pos] / (1.0 + e[~pos])
        return out


class Softmax(_GLM):
    """Multinomial logistic regression: softmax(X W + b), cross-entropy."""

    kind = "softmax"
    loss = "softmax"  # the kernel of dmlcore._ext.loss
    inferred_keys = ("n_features", "n_classes")
    extra_keys = ("n_classes",)       # may be given; else the labels tell

    @classmethod
    def for_data(cls, n_features, n_outputs, **config):
        """Sized for ``n_features`` columns and ``n_outputs`` classes (unless ``n_classes``)."""
        config.setdefault("n_classes", n_outputs or 3)
        return cls(n_features=n_features or 4, **config)

    @classmethod
    def fixed_classes(cls, config):
        return config.get("n_classes")

    is_classifier = True

    def __init__(self, n_features: int, n_classes: int):
        super().__init__(n_features)
        n_classes = _check_positive_int("n_classes", n_classes)
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.n_classes = n_classes

    @property
    def n_outputs(self) -> int:
        return self.n_classes

    def _layer_shapes(self):
        return [("linear", (self.n_features, self.n_classes), (self.n_classes,))]

    def loss_grad(self, params, X, y, grad, trainable=None, sample_weight=None) -> float:
        params, X = self._prepare(params, X, grad)
        y = self._check_y_shape(X, y)
        w = self._row_weights(X.shape[0], sample_weight, X.dtype)
        if y.dtype != np.int64 or not y.flags.c_contiguous:
            if y.dtype.kind in "biu":
                y = np.ascontiguousarray(y, dtype=np.int64)
            elif y.dtype.kind == "f":
                yi = y.astype(np.int64)
                if not np.array_equal(yi, y):
                    raise ValueError("y: class labels must be integers, "
                                     "got non-integer (or NaN) float values")
                y = yi
            else:
                raise ValueError(f"y: class labels must be integers, got {y.dtype}")
        return self._kernel(X, y, params, grad, w, trainable)

    def predict(self, params, X) -> np.ndarray:
        """Class probabilities, shape (n, n_classes)."""
        z = self.decision_function(params, X)
        z = z - z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z

    def to_config(self) -> dict:
        return {"kind": self.kind, "n_features": self.n_features,
                "n_classes": self.n_classes}


def _check_positive_int(name, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)
