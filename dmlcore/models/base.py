"""The model contract shared by every model.

A model is a stateless description of a parameter layout plus compiled
loss/gradient kernels. Parameters are ONE contiguous float vector
(float32 or float64, the dtype of X); ``views`` gives named, zero-copy views
per layer. Every layer owns a weight block ``W`` and a bias block ``b``, laid
out back to back in ``layer_names`` order, so a layer is one contiguous slice
(``layer_slices``) and freezing a layer means skipping one slice.

Kernels return SUMS over rows (loss and gradient), never means: the driver
divides once by the total row count, so any reduction tree is exact.
"""
from __future__ import annotations

import numpy as np


class Model:
    """Base class; subclasses define ``_layer_shapes`` and the kernels.

    Subclass contract:
      ``_layer_shapes`` -> list of (name, W shape, b shape), in layout order.
      ``loss_grad(params, X, y, grad, trainable=None, sample_weight=None)
        -> float``: overwrites ``grad`` (shape (n_params,), dtype of X) with the
        SUM over rows of the per-row gradients and returns the SUM of per-row
        losses (with ``sample_weight`` (n,), both sums are weighted). With
        ``trainable`` (layer names), frozen layers' gradient entries are set to
        0 and, where backpropagation can stop early, not computed.
      ``predict(params, X)``.
      ``is_classifier``, ``n_outputs``, ``to_config()``.
    """

    is_classifier = False

    # ---- layout -----------------------------------------------------------
    def _layer_shapes(self):
        raise NotImplementedError

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _, _ in self._layer_shapes()]

    @property
    def layer_slices(self) -> dict[str, slice]:
        """Layer name -> slice of the flat vector holding its W then b."""
        out, start = {}, 0
        for name, w_shape, b_shape in self._layer_shapes():
            size = int(np.prod(w_shape)) + int(np.prod(b_shape))
            out[name] = slice(start, start + size)
            start += size
        return out

    @property
    def n_params(self) -> int:
        return sum(s.stop - s.start for s in self.layer_slices.values())

    def views(self, params: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Zero-copy views ``{layer: {"W": array, "b": array}}`` into ``params``."""
        params = self._check_params(params)
        out, start = {}, 0
        for name, w_shape, b_shape in self._layer_shapes():
            nw, nb = int(np.prod(w_shape)), int(np.prod(b_shape))
            out[name] = {
                "W": params[start:start + nw].reshape(w_shape),
                "b": params[start + nw:start + nw + nb].reshape(b_shape),
            }
            start += nw + nb
        return out

    def weight_mask(self) -> np.ndarray:
        """Boolean (n_params,): True for weight entries, False for biases.

        Used to apply L2 regularisation to weights only (never intercepts).
        """
        mask = np.zeros(self.n_params, dtype=bool)
        start = 0
        for _, w_shape, b_shape in self._layer_shapes():
            nw, nb = int(np.prod(w_shape)), int(np.prod(b_shape))
            mask[start:start + nw] = True
            start += nw + nb
        return mask

    def trainable_mask(self, trainable=None) -> np.ndarray:
        """Boolean (n_params,): True for the entries of the trainable layers."""
        if trainable is None:
            return np.ones(self.n_params, dtype=bool)
        slices = self.layer_slices
        unknown = [t for t in trainable if t not in slices]
        if unknown:
            raise ValueError(
                f"trainable: unknown layer(s) {unknown}; layers are {self.layer_names}")
        mask = np.zeros(self.n_params, dtype=bool)
        for name in trainable:
            mask[slices[name]] = True
        return mask

    def trainable_view(self, trainable=None) -> "TrainableView":
        """The trainable entries of this model's flat vector (``TrainableView``)."""
        return TrainableView(self, trainable)

    def label_dtype(self, x_dtype) -> np.dtype:
        """The dtype ``loss_grad`` takes labels in without converting them.

        int64 class codes for multi-class outputs; X's dtype otherwise
        (regression targets, and 0/1 labels of a binary logistic model).
        """
        if self.is_classifier and self.n_outputs > 1:
            return np.dtype(np.int64)
        return np.dtype(x_dtype)

    # ---- helpers for subclasses -------------------------------------------
    @staticmethod
    def _row_weights(n, sample_weight, dtype):
        """``sample_weight`` as the kernels take it: None, or (n,) contiguous ``dtype``."""
        if sample_weight is None:
            return None
        w = np.asarray(sample_weight)
        if w.shape != (n,):
            raise ValueError(f"sample_weight: expected shape ({n},), got {w.shape}")
        return np.ascontiguousarray(w, dtype=dtype)

    def _check_params(self, params):
        params = np.asarray(params)
        if params.ndim != 1 or params.shape[0] != self.n_params:
            raise ValueError(
                f"params: expected shape ({self.n_params},), got {params.shape}")
        if params.dtype not in (np.float32, np.float64):
            raise ValueError(f"params: dtype must be float32 or float64, got {params.dtype}")
        return params

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items() if k != "kind")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.to_config() == other.to_config()

    def __hash__(self):
        return hash(repr(self))


class TrainableView:
    """The trainable entries of a model's flat parameter vector.

    ``trainable``: layer names (None = every layer); ``index``: their flat
    indices, or None when every entry trains (then ``gather`` returns the
    vector itself and ``scatter`` copies into it). ``decay_mask``: the
    model's ``weight_mask`` restricted to the trainable entries (what the
    optimizers decay: weights, never biases).
    """

    def __init__(self, model, trainable=None):
        self.trainable = None if trainable is None else list(trainable)
        self.index = (None if self.trainable is None
                      else np.flatnonzero(model.trainable_mask(self.trainable)))
        mask = model.weight_mask()
        self.decay_mask = mask if self.index is None else mask[self.index]

    @property
    def size(self) -> int:
        return self.decay_mask.shape[0]

    def gather(self, params):
        """The trainable entries of ``params`` (``params`` itself when all train)."""
        return params if self.index is None else params[self.index]

    def scatter(self, params, values):
        """Write ``values`` into the trainable entries of ``params`` (in place); returns it."""
        if self.index is None:
            if values is not params:
                params[:] = values
        else:
            params[self.index] = values
        return params
