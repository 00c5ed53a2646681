# cython: language_level=3
"""Reductions on flat parameter/gradient vectors (float32 or float64).

Design
------
Parameters and gradients are ONE contiguous vector per model, so every
aggregation in dmlcore (tree-sum of gradients, FedAvg's weighted mean, norms
for clipping and logging) is one of the few kernels below.

- ``_axpy``, ``_dot`` (float64), ``_gemv_t`` are thin fused wrappers over
  ``scipy.linalg.cython_blas`` (one-line docstring of the math each), chunked
  so that lengths beyond a BLAS int still work; ``_add`` and the float32
  ``_dot`` (double accumulators) are plain loops.
- The ``def`` functions are the Python layer: they check shapes, dtypes (all
  arguments share float32 or float64) and writability, then release the GIL.
- IN vectors are ``const floating[::1]`` (read-only buffers, as Dask hands
  them, are accepted; non-contiguous inputs are copied); OUT vectors must be
  contiguous and writable and are returned (``np.shares_memory(result, out)``).
- float32 dot products accumulate in double; results are Python floats.
"""
from cython cimport floating
from scipy.linalg.cython_blas cimport saxpy, daxpy, ddot, sgemv, dgemv

import numpy as np

cdef Py_ssize_t _CHUNK = 1 << 30     # below INT_MAX, for BLAS int lengths


# ---- BLAS wrappers -----------------------------------------------------------
cdef void _axpy(Py_ssize_t n, floating alpha, const floating *x,
                floating *y) noexcept nogil:
    """y := alpha x + y"""
    cdef int m, one = 1
    cdef Py_ssize_t start = 0
    while start < n:
        m = <int> (_CHUNK if n - start > _CHUNK else n - start)
        if floating is float:
            saxpy(&m, &alpha, <float *> x + start, &one, y + start, &one)
        else:
            daxpy(&m, &alpha, <double *> x + start, &one, y + start, &one)
        start += m


cdef double _dot(Py_ssize_t n, const floating *x,
                 const floating *y) noexcept nogil:
    """sum_i x_i y_i in double: ddot for float64; for float32 an 8-way
    double-accumulator loop (OpenBLAS's dsdot was measured to lose float32
    precision, so it is not used)."""
    cdef int m, one = 1
    cdef Py_ssize_t start = 0, i, j, n8
    cdef double acc = 0.0
    cdef double a[8]
    if floating is float:
        for j in range(8):
            a[j] = 0.0
        n8 = n - n % 8
        i = 0
        while i < n8:
            for j in range(8):
                a[j] += <double> x[i + j] * <double> y[i + j]
            i += 8
        for i in range(n8, n):
            acc += <double> x[i] * <double> y[i]
        for j in range(8):
            acc += a[j]
    else:
        while start < n:
            m = <int> (_CHUNK if n - start > _CHUNK else n - start)
            acc += ddot(&m, <double *> x + start, &one, <double *> y + start, &one)
            start += m
    return acc


cdef void _gemv_t(Py_ssize_t k, Py_ssize_t n, floating alpha,
                  const floating *V, const floating *w,
                  floating *out) noexcept nogil:
    """out (n,) := alpha V^T w for row-major V (k x n) (col-major gemv 'N' on V^T)."""
    cdef int rows = <int> n, cols = <int> k, one = 1
    cdef floating beta = 0
    cdef char trans = b'N'
    if floating is float:
        sgemv(&trans, &rows, &cols, &alpha, <float *> V, &rows,
              <float *> w, &one, &beta, out, &one)
    else:
        dgemv(&trans, &rows, &cols, &alpha, <double *> V, &rows,
              <double *> w, &one, &beta, out, &one)


cdef void _add(Py_ssize_t n, const floating *x, floating *out) noexcept nogil:
    """out := out + x"""
    cdef Py_ssize_t i
    for i in range(n):
        out[i] += x[i]


# ---- Python layer --------------------------------------------------------------
def _vector(name, a, dtype=None):
    """An IN vector: 1-D float32/float64, made contiguous (a copy only if needed)."""
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D vector, got shape {a.shape}")
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: dtype must be float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{name}: dtype {a.dtype} does not match {np.dtype(dtype)}")
    return np.ascontiguousarray(a)


def _out_vector(name, a, dtype=None):
    """An OUT vector: 1-D float32/float64 ndarray, contiguous and writable."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    a = _vector(name, a, dtype)
    if not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"{name}: must be a contiguous, writable array")
    return a


def _same_length(n, **vectors):
    for name, v in vectors.items():
        if v.shape[0] != n:
            raise ValueError(f"{name}: expected length {n}, got {v.shape[0]}")


cdef _axpy_impl(floating alpha, const floating[::1] x, floating[::1] y):
    with nogil:
        _axpy(x.shape[0], alpha, &x[0], &y[0])


def axpy(alpha, x, y):
    """y := alpha * x + y, in place. IN alpha (float), x; IN/OUT y. Returns y."""
    y_arr = _out_vector("y", y)
    x_arr = _vector("x", x, y_arr.dtype)
    _same_length(y_arr.shape[0], x=x_arr)
    if y_arr.shape[0] and alpha != 0:
        if np.may_share_memory(x_arr, y_arr) and x_arr.ctypes.data != y_arr.ctypes.data:
            x_arr = x_arr.copy()          # partial overlap: read before write
        if y_arr.dtype == np.float32:
            _axpy_impl[float](<float> alpha, x_arr, y_arr)
        else:
            _axpy_impl[double](<double> alpha, x_arr, y_arr)
    return y_arr


cdef _add_impl(floating[::1] out, const floating[::1] x):
    with nogil:
        _add(x.shape[0], &x[0], &out[0])


def sum_into(out, x):
    """out := out + x, in place. IN x; IN/OUT out. Returns out."""
    out_arr = _out_vector("out", out)
    x_arr = _vector("x", x, out_arr.dtype)
    _same_length(out_arr.shape[0], x=x_arr)
    if out_arr.shape[0]:
        if np.may_share_memory(x_arr, out_arr) and x_arr.ctypes.data != out_arr.ctypes.data:
            x_arr = x_arr.copy()
        if out_arr.dtype == np.float32:
            _add_impl[float](out_arr, x_arr)
        else:
            _add_impl[double](out_arr, x_arr)
    return out_arr


cdef _wmean_2d(const floating[:, ::1] V, const floating[::1] w, double scale,
               floating[::1] out):
    cdef Py_ssize_t k = V.shape[0], n = V.shape[1], start, m
    cdef Py_ssize_t i
    with nogil:
        if n < _CHUNK:
            _gemv_t(k, n, <floating> scale, &V[0, 0], &w[0], &out[0])
        else:
            for i in range(n):
                out[i] = 0
            for i in range(k):
                _axpy(n, <floating> (scale * w[i]), &V[i, 0], &out[0])


cdef _wmean_list(list vecs, const double[::1] w, double scale, floating[::1] out):
    cdef const floating[::1] v
    cdef Py_ssize_t i, j, n = out.shape[0]
    with nogil:
        for j in range(n):
            out[j] = 0
    for i in range(len(vecs)):
        v = vecs[i]
        with nogil:
            _axpy(n, <floating> (scale * w[i]), &v[0], &out[0])


def weighted_mean(vectors, weights, out):
    """out := sum_i w_i v_i / sum_i w_i.

    IN vectors: a 2-D array (k, n) or a sequence of k 1-D vectors of length n;
    weights (k,) finite, >= 0, with a positive sum. OUT out (n,), which must not
    overlap any input vector. Returns out.
    """
    out_arr = _out_vector("out", out)
    n = out_arr.shape[0]
    w = np.ascontiguousarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"weights: expected a 1-D vector, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights: must be finite and >= 0")
    total = float(w.sum())
    if not total > 0:
        raise ValueError("weights: the sum of the weights must be positive")
    if isinstance(vectors, np.ndarray) and vectors.ndim == 2:
        if vectors.dtype != out_arr.dtype:
            raise ValueError(f"vectors: dtype {vectors.dtype} does not match out's {out_arr.dtype}")
        if vectors.shape != (w.shape[0], n):
            raise ValueError(f"vectors: expected shape ({w.shape[0]}, {n}), got {vectors.shape}")
        if np.may_share_memory(vectors, out_arr):
            raise ValueError("out: must not overlap the input vectors")
        if n == 0:
            return out_arr
        V = np.ascontiguousarray(vectors)
        wt = np.ascontiguousarray(w, dtype=out_arr.dtype)
        if out_arr.dtype == np.float32:
            _wmean_2d[float](V, wt, 1.0 / total, out_arr)
        else:
            _wmean_2d[double](V, wt, 1.0 / total, out_arr)
        return out_arr
    if isinstance(vectors, np.ndarray) and vectors.ndim != 1:
        raise ValueError(f"vectors: expected a 2-D array or a list of 1-D vectors, got shape {vectors.shape}")
    vecs = [_vector(f"vectors[{i}]", v, out_arr.dtype) for i, v in enumerate(vectors)]
    if len(vecs) != w.shape[0]:
        raise ValueError(f"weights: expected {len(vecs)} weights, got {w.shape[0]}")
    for i, v in enumerate(vecs):
        if v.shape[0] != n:
            raise ValueError(f"vectors[{i}]: expected length {n}, got {v.shape[0]}")
        if np.may_share_memory(v, out_arr):
            raise ValueError("out: must not overlap the input vectors")
    if n == 0:
        return out_arr
    if out_arr.dtype == np.float32:
        _wmean_list[float](vecs, w, 1.0 / total, out_arr)
    else:
        _wmean_list[double](vecs, w, 1.0 / total, out_arr)
    return out_arr


cdef double _dot_impl(const floating[::1] x, const floating[::1] y):
    cdef double r
    with nogil:
        r = _dot(x.shape[0], &x[0], &y[0])
    return r


def dot(x, y):
    """sum_i x_i y_i as a Python float (float32 accumulates in double)."""
    x_arr = _vector("x", x)
    y_arr = _vector("y", y, x_arr.dtype)
    _same_length(x_arr.shape[0], y=y_arr)
    if x_arr.shape[0] == 0:
        return 0.0
    if x_arr.dtype == np.float32:
        return _dot_impl[float](x_arr, y_arr)
    return _dot_impl[double](x_arr, y_arr)


def sq_norm(x):
    """sum_i x_i^2 as a Python float (float32 accumulates in double)."""
    x_arr = _vector("x", x)
    if x_arr.shape[0] == 0:
        return 0.0
    if x_arr.dtype == np.float32:
        return _dot_impl[float](x_arr, x_arr)
    return _dot_impl[double](x_arr, x_arr)
