"""Multi-layer perceptron: dense layers, relu/tanh/identity/logistic hidden
activations, softmax, linear or sigmoid (multilabel) output.

The layout follows ``base.Model``: layer ``layer{l}`` owns ``W`` of shape
(sizes[l], sizes[l+1]) then ``b`` of shape (sizes[l+1],). The compiled kernels
(``dmlcore._ext.mlp``) do the work; this file validates, allocates the
per-call workspace with NumPy, and turns kernel status into clear errors.
"""
from __future__ import annotations

import math
import threading

import numpy as np

from dmlcore._ext import mlp as _kernels
from dmlcore.models.base import Model

# Bytes of workspace a call aims for: rows are processed in blocks of this
# size, so memory stays bounded whatever the partition (and gemm still sees
# hundreds of rows per call).
_WORKSPACE_BYTES = 2 << 20
_MIN_BLOCK, _MAX_BLOCK = 64, 4096


_thread_scratch = threading.local()


def _scratch(size, dtype):
    """A float array of ``size`` elements owned by the calling thread, reused
    by its next call of the same size and dtype (its contents are garbage).

    Kernel workspaces come from here: a fresh multi-hundred-KB array per call
    costs page faults on every step (Dask workers return freed memory to the
    OS above 64 KiB, MALLOC_TRIM_THRESHOLD_).
    """
    cached = getattr(_thread_scratch, "array", None)
    if cached is None or cached.size != size or cached.dtype != dtype:
        cached = _thread_scratch.array = np.empty(size, dtype=dtype)
    return cached


class MLP(Model):
    """``MLP(sizes, activation="relu" | "tanh" | "identity" | "logistic",
    output="softmax" | "linear" | "sigmoid")``.

    ``sizes`` = [n_features, hidden..., n_outputs]. ``output="softmax"`` is a
    classifier over ``sizes[-1]`` classes (cross-entropy, integer labels);
    ``output="linear"`` a regressor with loss 1/2 sum (y_hat - y)^2;
    ``output="sigmoid"`` a multilabel classifier: ``sizes[-1]`` independent
    binary outputs, y an (n, sizes[-1]) 0/1 indicator matrix, loss the binary
    cross-entropy summed over outputs.
    """

    # what the workflow runner needs of a registered kind (``dmlcore.workflow.build``)
    inferred_keys = ("sizes",)        # filled in from the data: [n_features, *hidden, K]
    extra_keys = ("sizes", "hidden")  # sizes may be given; hidden: the widths in between
    accepts_sparse = False
    binary = False

    @classmethod
    def for_data(cls, n_features, n_outputs, **config):
        """Sized ``[n_features, *hidden, n_outputs]`` unless ``sizes`` is given (then its
        first width must be ``n_features``); None sizes: not known yet, placeholders."""
        if "sizes" in config and "hidden" in config:
            raise ValueError("give hidden (sizes inferred from the data) or sizes, not both")
        hidden = config.pop("hidden", [])
        if "sizes" not in config:
            config["sizes"] = [n_features or 4, *hidden, n_outputs or 3]
        elif n_features is not None and config["sizes"][0] != n_features:
            raise ValueError(f"sizes starts with {config['sizes'][0]} inputs, the data have "
                             f"{n_features} features")
        return cls(**config)

    @classmethod
    def fixed_classes(cls, config):
        """The output width ``sizes`` fixes (None: the labels tell)."""
        return config["sizes"][-1] if "sizes" in config else None

    def __init__(self, sizes, activation="relu", output="softmax"):
        try:
            sizes = [int(s) for s in sizes]
        except (TypeError, ValueError):
            raise ValueError(f"sizes: expected a list of integers, got {sizes!r}") from None
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes: need at least 2 positive widths, got {sizes}")
        if activation not in _kernels.ACTIVATIONS:
            raise ValueError(f"activation: {activation!r} is not one of "
                             f"{', '.join(_kernels.ACTIVATIONS)}")
        if output not in _kernels.OUTPUTS:
            raise ValueError(f"output: {output!r} is not one of {', '.join(_kernels.OUTPUTS)}")
        if output == "softmax" and sizes[-1] < 2:
            raise ValueError(f"sizes: a softmax output needs >= 2 classes, got {sizes[-1]}")
        self.sizes = sizes
        self.activation = activation
        self.output = output
        self._sizes_arr = np.asarray(sizes, dtype=np.int64)
        self._act = _kernels.ACTIVATIONS[activation]
        self._out = _kernels.OUTPUTS[output]
        # workspace floats = per_row * block_rows + fixed, for backward / forward
        self._ws = {}
        for backward in (True, False):
            fixed = _kernels.workspace_size(self._sizes_arr, 0, backward)
            self._ws[backward] = (_kernels.workspace_size(self._sizes_arr, 1, backward) - fixed, fixed)

    # ---- layout and metadata -----------------------------------------------
    def _layer_shapes(self):
        return [(f"layer{l}", (self.sizes[l], self.sizes[l + 1]), (self.sizes[l + 1],))
                for l in range(len(self.sizes) - 1)]

    @property
    def n_params(self) -> int:
        # same value as base.Model.n_params, computed once: it is read on
        # every kernel call (base recomputes it from the layer shapes)
        n = self.__dict__.get("_n_params")
        if n is None:
            n = self.__dict__["_n_params"] = super().n_params
        return n

    @property
    def is_classifier(self) -> bool:
        """True for integer class labels (softmax); the multilabel sigmoid
        output takes a float indicator matrix, like a regressor's targets."""
        return self.output == "softmax"

    @property
    def is_multilabel(self) -> bool:
        return self.output == "sigmoid"

    @property
    def n_features(self) -> int:
        return self.sizes[0]

    @property
    def n_outputs(self) -> int:
        return self.sizes[-1]

    @property
    def n_classes(self):
        """Number of classes (softmax output), None for a regressor."""
        return self.sizes[-1] if self.is_classifier else None

    def to_config(self) -> dict:
        return {"kind": "mlp", "sizes": list(self.sizes),
                "activation": self.activation, "output": self.output}

    # ---- parameters ----------------------------------------------------------
    def init(self, seed, dtype=np.float64) -> np.ndarray:
        """Uniform initialisation, deterministic by ``seed``: He (relu) or
        Glorot (tanh, identity) limits for the hidden layers, Glorot for the
        output layer, sqrt(2 / (fan_in + fan_out)) everywhere for logistic
        (scikit-learn's choice), biases 0. The draw is in float64, then cast, so float32 and float64
        parameters agree."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        rng = np.random.default_rng(seed)
        params = np.zeros(self.n_params, dtype=np.float64)
        views = self.views(params)
        n_layers = len(self.sizes) - 1
        for l, name in enumerate(self.layer_names):
            fan_in, fan_out = self.sizes[l], self.sizes[l + 1]
            if self.activation == "logistic":
                limit = np.sqrt(2.0 / (fan_in + fan_out))
            elif l < n_layers - 1 and self.activation == "relu":
                limit = np.sqrt(6.0 / fan_in)
            else:
                limit = np.sqrt(6.0 / (fan_in + fan_out))
            views[name]["W"][...] = rng.uniform(-limit, limit, size=(fan_in, fan_out))
        return params.astype(dtype, copy=False)

    # ---- validation ----------------------------------------------------------
    def _check_X(self, params, X):
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ValueError(f"X: expected shape (n, {self.sizes[0]}), got {X.shape}")
        if X.dtype != params.dtype:
            raise ValueError(f"X: dtype {X.dtype} does not match params' dtype {params.dtype} "
                             "(X, params and grad must share float32 or float64)")
        row_ok = X.shape[0] <= 1 or (X.strides[0] >= X.shape[1] * X.itemsize
                                     and X.strides[0] % X.itemsize == 0)
        if X.strides[1] != X.itemsize or not row_ok:
            X = np.ascontiguousarray(X)     # the kernel takes any row stride, not a column stride
        return X

    def _check_y(self, y, n, dtype):
        y = np.asarray(y)
        if self.is_classifier:
            if y.ndim != 1 or y.shape[0] != n:
                raise ValueError(f"y: expected {n} integer labels of shape ({n},), got shape {y.shape}")
            if y.dtype.kind == "f":
                if not np.isfinite(y).all():
                    raise ValueError("y: labels contain NaN or infinity")
                if (y != np.round(y)).any():
                    raise ValueError("y: class labels must be integers")
            elif y.dtype.kind not in "iu":
                raise ValueError(f"y: class labels must be integers, got dtype {y.dtype}")
            return np.ascontiguousarray(y, dtype=np.int64)
        k = self.sizes[-1]
        if y.ndim == 1 and k == 1:
            y = y.reshape(n if y.shape[0] == n else -1, 1)
        if y.shape != (n, k):
            want = f"({n},) or ({n}, 1)" if k == 1 else f"({n}, {k})"
            raise ValueError(f"y: expected shape {want}, got {np.shape(y)}")
        if y.dtype.kind not in "fiub":
            raise ValueError(f"y: targets must be numeric, got dtype {y.dtype}")
        if y.dtype != dtype:
            y = y.astype(dtype)
        if y.shape[0] > 1 and y.strides[1] != y.itemsize:
            y = np.ascontiguousarray(y)
        return y

    def _layer_flags(self, trainable):
        if trainable is None:
            return None
        if isinstance(trainable, str):
            trainable = [trainable]
        names = self.layer_names
        unknown = [t for t in trainable if t not in names]
        if unknown:
            raise ValueError(
                f"trainable: unknown layer(s) {unknown}; layers are {names}")
        wanted = set(trainable)
        return np.array([name in wanted for name in names], dtype=np.uint8)

    def _workspace(self, n, dtype, backward, block_rows):
        """(block_rows, workspace array) for a call on n rows: blocks sized so
        that the workspace is about _WORKSPACE_BYTES (within [64, 4096] rows)."""
        per_row, fixed = self._ws[backward]
        if block_rows is not None:
            if int(block_rows) < 1:
                raise ValueError(f"block_rows: must be >= 1, got {block_rows}")
            rows = int(block_rows)
        else:
            rows = _WORKSPACE_BYTES // max(1, per_row * dtype.itemsize)
            rows = max(1, min(max(n, 1), max(_MIN_BLOCK, min(_MAX_BLOCK, rows))))
        return rows, _scratch(per_row * rows + fixed, dtype)

    def _raise_non_finite(self, params, X, y=None, sample_weight=None):
        """The loss or probe came out non-finite: say which input is to blame."""
        if sample_weight is not None and not np.isfinite(sample_weight).all():
            raise ValueError("sample_weight: contains NaN or infinity")
        if not np.isfinite(X).all():
            rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
            raise ValueError(f"X: contains NaN or infinity (first at row {rows[0]})")
        if y is not None and y.dtype.kind == "f" and not np.isfinite(y).all():
            raise ValueError("y: contains NaN or infinity")
        if not np.isfinite(params).all():
            bad = int(np.flatnonzero(~np.isfinite(params))[0])
            layer = next(name for name, s in self.layer_slices.items() if s.start <= bad < s.stop)
            raise ValueError(f"params: contain NaN or infinity (first in {layer})")

    # ---- kernels ---------------------------------------------------------------
    def loss_grad(self, params, X, y, grad, trainable=None, sample_weight=None, *,
                  block_rows=None) -> float:
        """Overwrite ``grad`` with the SUM over rows of the gradient; return the
        SUM of the per-row losses (cross-entropy, 1/2 squared error, or binary
        cross-entropy summed over the outputs).

        ``trainable`` (layer names): frozen layers' entries are 0 and the
        backward pass stops at the lowest trainable layer. ``sample_weight``
        (n,): both sums are weighted (sum_i w_i loss_i). ``block_rows``
        overrides the row-block size (memory bound) used by the kernel.
        """
        params = self._check_params(params)
        X = self._check_X(params, X)
        if not isinstance(grad, np.ndarray):
            raise TypeError(f"grad: expected a numpy array, got {type(grad).__name__}")
        if grad.shape != (self.n_params,):
            raise ValueError(f"grad: expected shape ({self.n_params},), got {grad.shape}")
        if grad.dtype != params.dtype:
            raise ValueError(f"grad: dtype {grad.dtype} does not match params' dtype {params.dtype}")
        if not grad.flags.c_contiguous or not grad.flags.writeable:
            raise ValueError("grad: must be a contiguous, writable array (it is overwritten)")
        n = X.shape[0]
        y = self._check_y(y, n, params.dtype)
        flags = self._layer_flags(trainable)
        rows, work = self._workspace(n, params.dtype, True, block_rows)
        w = self._row_weights(n, sample_weight, params.dtype)
        if self.is_classifier:
            loss, bad_row = _kernels.loss_grad_softmax(
                X, y, params, self._sizes_arr, self._act, flags, grad, work, rows, w)
            if bad_row >= 0:
                grad[...] = 0
                raise ValueError(
                    f"y: label {int(y[bad_row])} at row {bad_row} is outside the classes "
                    f"0..{self.sizes[-1] - 1}")
        else:
            kernel = (_kernels.loss_grad_sigmoid if self.is_multilabel
                      else _kernels.loss_grad_squared)
            loss = kernel(X, y, params, self._sizes_arr, self._act, flags, grad, work, rows, w)
        if not math.isfinite(loss):
            self._raise_non_finite(params, X, y, w)
        return float(loss)

    def predict(self, params, X, *, block_rows=None) -> np.ndarray:
        """Softmax: class probabilities (n, K). Sigmoid: per-output
        probabilities (n, k). Linear: (n,) when the output size is 1, else
        (n, k). Rows are processed in blocks."""
        params = self._check_params(params)
        X = self._check_X(params, X)
        n = X.shape[0]
        out = np.empty((n, self.sizes[-1]), dtype=params.dtype)
        rows, work = self._workspace(n, params.dtype, False, block_rows)
        probe = _kernels.forward(X, params, self._sizes_arr, self._act, self._out,
                                 out, work, rows)
        if not math.isfinite(probe):
            self._raise_non_finite(params, X)
            raise ValueError("predict: activations overflowed to infinity "
                             "(the parameters have likely diverged)")
        if self.output == "linear" and self.sizes[-1] == 1:
            return out.reshape(n)
        return out
