# cython: language_level=3
"""Fused loss + gradient kernels for the GLMs (squared, logistic, softmax).

Naming: ``loss_grad_<loss>(X, y, coef, grad_out, ...) -> loss_sum``.  Every
kernel returns the SUM of the per-row losses and overwrites ``grad_out`` with
the SUM of the per-row gradients; the caller divides once.  With
``sample_weight=w`` both sums are weighted (sum_i w_i loss_i, sum_i w_i grad_i):
a weight of 2 is the row counted twice, and the caller divides by sum w.
``coef`` and ``grad_out`` use the Model layout: W (row-major) then b.
"""
# Design
# ------
# Three layers, as in scikit-learn's ``_loss.pyx.tp``:
#
# 1. Pointwise math on one vector of samples, in C (``loss_impl.h``): the
#    vectorised ``exp`` / ``log`` / ``log1p`` (Cephes/fdlibm range reduction,
#    ~1 ulp, NaN propagates) and the per-sample loss and dloss/dz, written with
#    GCC vector extensions so they vectorise without -ffast-math.  Stable forms:
#      squared   l = (z - y)^2 / 2                           r = z - y
#      logistic  l = log1p(exp(-|z|)) + max(z, 0) - y z      r = sigmoid(z) - y
#      softmax   l = log sum_k exp(z_k - max z) - (z_y - max z)
#                r = softmax(z) - onehot(y)
# 2. Loops over cache-sized blocks of rows, in C (``loss_impl.h``): for each
#    block, z = Xb.w + b (the only read of X from memory; the next block is
#    prefetched), the pointwise stage, then g += Xb^T r while Xb is still in
#    L1.  One pass over X, one thread, no GIL, no allocation per block.  Block
#    sums are flushed into float64 accumulators, so float32 totals stay exact
#    to float32 precision over millions of rows.  A second copy of every loop is
#    compiled for AVX2+FMA and picked at run time on x86_64.
# 3. This thin Python layer: validates shapes and dtypes (O(1)), converts the
#    buffers (``const floating[...]`` so read-only arrays from Dask work),
#    releases the GIL, and turns the kernel's flags into ``ValueError``:
#    labels outside the classes (checked inside the kernel, one flag), and
#    NaN/inf in the inputs, detected from the non-finite loss sum -- no second
#    pass over X.
#
import numpy as np
from cython cimport floating
from libc.stdint cimport int32_t, int64_t
from libc.math cimport isfinite

cdef extern from "loss_kernels.h" nogil:
    int64_t dml_block_bytes
    int64_t dml_prefetch_blocks
    int dml_simd_request
    int dml_cpu_has_avx2()
    int dml_use_avx2()
    int dml_glm_d(int kind, const double *X, const double *y, const double *w, int64_t n,
                  int64_t p, const double *coef, double *grad, int compute_grad,
                  double *loss_out, int *bad_out)
    int dml_glm_f(int kind, const float *X, const float *y, const float *w, int64_t n,
                  int64_t p, const float *coef, float *grad, int compute_grad,
                  double *loss_out, int *bad_out)
    int dml_softmax_d(const double *X, const int64_t *y, const double *w, int64_t n,
                      int64_t p, int64_t K, const double *coef, double *grad,
                      int compute_grad, double *loss_out, int *bad_out)
    int dml_softmax_f(const float *X, const int64_t *y, const float *w, int64_t n,
                      int64_t p, int64_t K, const float *coef, float *grad,
                      int compute_grad, double *loss_out, int *bad_out)
    void dml_vexp_d(const double *x, double *out, int64_t n)
    void dml_vexp_f(const float *x, float *out, int64_t n)
    void dml_vlog_d(const double *x, double *out, int64_t n)
    void dml_vlog_f(const float *x, float *out, int64_t n)
    void dml_vlog1p_d(const double *x, double *out, int64_t n)
    void dml_vlog1p_f(const float *x, float *out, int64_t n)
    void dml_vlog1p_unit_d(const double *x, double *out, int64_t n)
    void dml_vlog1p_unit_f(const float *x, float *out, int64_t n)

DEF KIND_SQUARED = 0
DEF KIND_LOGISTIC = 1


# ---- validation (O(1), Python level) ----------------------------------------
def _check_common(name, X, coef, grad_out, n_coef):
    if not isinstance(X, np.ndarray):
        raise ValueError(f"{name}: X must be a numpy array, got {type(X).__name__}")
    if X.ndim != 2:
        raise ValueError(f"{name}: X must be 2-D, got shape {X.shape}")
    if not X.flags.c_contiguous:
        raise ValueError(f"{name}: X must be C-contiguous")
    _check_coef_grad(name, X, coef, grad_out, n_coef)


def _check_coef_grad(name, X, coef, grad_out, n_coef):
    """X's dtype, and ``coef``/``grad_out`` as (n_coef,) contiguous vectors of it."""
    if X.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: X dtype must be float32 or float64, got {X.dtype}")
    for arg, val in (("coef", coef), ("grad_out", grad_out)):
        if not isinstance(val, np.ndarray):
            raise ValueError(f"{name}: {arg} must be a numpy array, got {type(val).__name__}")
        if val.dtype != X.dtype:
            raise ValueError(
                f"{name}: dtype mix: X is {X.dtype} but {arg} is {val.dtype} "
                "(X, coef and grad_out must share a dtype)")
        if val.shape != (n_coef,):
            raise ValueError(f"{name}: {arg} must have shape ({n_coef},), got {val.shape}")
        if not val.flags.c_contiguous:
            raise ValueError(f"{name}: {arg} must be contiguous")
    if not grad_out.flags.writeable:
        raise ValueError(f"{name}: grad_out must be writeable")


def _check_row_vector(name, X, arg, value):
    """``value`` (argument ``arg``) as the kernels take it: (n,) contiguous of X's dtype."""
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name}: {arg} must be a numpy array, got {type(value).__name__}")
    if value.shape != (X.shape[0],):
        raise ValueError(f"{name}: {arg} must have shape ({X.shape[0]},), got {value.shape}")
    if value.dtype != X.dtype:
        raise ValueError(
            f"{name}: dtype mix: X is {X.dtype} but {arg} is {value.dtype} "
            f"({arg} must have X's dtype)")
    if not value.flags.c_contiguous:
        raise ValueError(f"{name}: {arg} must be contiguous")
    return value


def _check_y_float(name, X, y):
    _check_row_vector(name, X, "y", y)


def _check_class_labels(name, X, y):
    if not isinstance(y, np.ndarray):
        raise ValueError(f"{name}: y must be a numpy array, got {type(y).__name__}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"{name}: y must have shape ({X.shape[0]},), got {y.shape}")
    if y.dtype != np.int64:
        raise ValueError(f"{name}: y must be int64 class labels, got {y.dtype}")
    if not y.flags.c_contiguous:
        raise ValueError(f"{name}: y must be contiguous")


def _raise_bad_labels(name, y, n_classes=None):
    """The kernel flagged a label: 0/1 expected (``n_classes`` None), else [0, K)."""
    if n_classes is None:
        wrong, allowed = y[(y != 0) & (y != 1)], "0 or 1"
    else:
        wrong, allowed = y[(y < 0) | (y >= n_classes)], f"in [0, {n_classes})"
    raise ValueError(f"{name}: labels must be {allowed}, found {wrong[:5].tolist()} "
                     f"({wrong.size} bad label(s))")


def _raise_non_finite(name, loss):
    raise ValueError(
        f"{name}: the loss is {loss}: NaN or inf in the inputs (X, y or coef), "
        "or an overflow of the linear predictor")


# ---- fused-type cores ---------------------------------------------------------
def _glm(int kind, const floating[:, ::1] X, const floating[::1] y,
         const floating[::1] w, const floating[::1] coef, floating[::1] grad_out,
         bint compute_grad):
    """Squared (kind 0) or logistic (kind 1) loss sum; writes grad_out.

    IN  X (n, p), y (n), w (n) row weights or None (all 1), coef (p + 1): w then b
    OUT grad_out (p + 1): sum over rows of w_i dloss_i/d(w, b)
    Returns (sum_i w_i loss_i, bad_label_flag).
    """
    cdef int64_t n = X.shape[0], p = X.shape[1]
    cdef double loss = 0.0
    cdef int bad = 0, rc
    cdef const floating *xp = &X[0, 0] if n > 0 and p > 0 else NULL
    cdef const floating *yp = &y[0] if n > 0 else NULL
    cdef const floating *wp = &w[0] if w is not None and n > 0 else NULL
    with nogil:
        if floating is double:
            rc = dml_glm_d(kind, xp, yp, wp, n, p, &coef[0], &grad_out[0],
                           compute_grad, &loss, &bad)
        else:
            rc = dml_glm_f(kind, xp, yp, wp, n, p, &coef[0], &grad_out[0],
                           compute_grad, &loss, &bad)
    if rc != 0:
        raise MemoryError("loss kernel: could not allocate scratch buffers")
    return loss, bad


def _softmax(const floating[:, ::1] X, const long long[::1] y, const floating[::1] w,
             const floating[::1] coef, floating[::1] grad_out, int64_t n_classes,
             bint compute_grad):
    """Softmax cross-entropy loss sum; writes grad_out.

    IN  X (n, p), y (n) int64 labels, w (n) row weights or None (all 1),
        coef (p*K + K): W (p, K) row-major then b
    OUT grad_out (p*K + K): weighted sums over rows
    Returns (sum_i w_i loss_i, bad_label_flag).
    """
    cdef int64_t n = X.shape[0], p = X.shape[1]
    cdef double loss = 0.0
    cdef int bad = 0, rc
    cdef const floating *xp = &X[0, 0] if n > 0 and p > 0 else NULL
    cdef const int64_t *yp = <const int64_t *> &y[0] if n > 0 else NULL
    cdef const floating *wp = &w[0] if w is not None and n > 0 else NULL
    with nogil:
        if floating is double:
            rc = dml_softmax_d(xp, yp, wp, n, p, n_classes, &coef[0], &grad_out[0],
                               compute_grad, &loss, &bad)
        else:
            rc = dml_softmax_f(xp, yp, wp, n, p, n_classes, &coef[0], &grad_out[0],
                               compute_grad, &loss, &bad)
    if rc != 0:
        raise MemoryError("loss kernel: could not allocate scratch buffers")
    return loss, bad


def _check_weight(name, X, sample_weight):
    """``sample_weight`` as the kernels take it: None, or (n,) contiguous of X's dtype."""
    if sample_weight is None:
        return None
    return _check_row_vector(name, X, "sample_weight", sample_weight)


# ---- public kernels -------------------------------------------------------------
def loss_grad_squared(X, y, coef, grad_out, *, sample_weight=None, bint compute_grad=True):
    """Squared error: returns sum_i (x_i.w + b - y_i)^2 / 2, fills grad_out.

    IN  X (n, p) float32/float64 C-contiguous (read-only is fine)
    IN  y (n) dtype of X;  coef (p + 1) dtype of X: w then b
    IN  sample_weight (n) dtype of X, or None (all 1): every sum is weighted
    OUT grad_out (p + 1) dtype of X: overwritten with the sum over rows of the
        gradient (zeros if compute_grad is False)
    Raises ValueError on bad shapes/dtypes or NaN/inf in the inputs.
    """
    name = "loss_grad_squared"
    _check_common(name, X, coef, grad_out, X.shape[1] + 1 if X.ndim == 2 else -1)
    _check_y_float(name, X, y)
    w = _check_weight(name, X, sample_weight)
    loss, _ = _glm(KIND_SQUARED, X, y, w, coef, grad_out, compute_grad)
    if not isfinite(loss):
        _raise_non_finite(name, loss)
    return loss


def loss_grad_logistic(X, y, coef, grad_out, *, sample_weight=None, bint compute_grad=True):
    """Log-loss: returns sum_i log(1 + exp(z_i)) - y_i z_i, z = X.w + b.

    IN  X (n, p) float32/float64 C-contiguous (read-only is fine)
    IN  y (n) dtype of X, values in {0, 1};  coef (p + 1): w then b
    IN  sample_weight (n) dtype of X, or None (all 1): every sum is weighted
    OUT grad_out (p + 1): overwritten with sum_i (sigmoid(z_i) - y_i) (x_i, 1)
        (zeros if compute_grad is False)
    Raises ValueError on bad shapes/dtypes, labels other than 0/1, NaN/inf.
    """
    name = "loss_grad_logistic"
    _check_common(name, X, coef, grad_out, X.shape[1] + 1 if X.ndim == 2 else -1)
    _check_y_float(name, X, y)
    w = _check_weight(name, X, sample_weight)
    loss, bad = _glm(KIND_LOGISTIC, X, y, w, coef, grad_out, compute_grad)
    if bad:
        _raise_bad_labels(name, y)
    if not isfinite(loss):
        _raise_non_finite(name, loss)
    return loss


def loss_grad_softmax(X, y, coef, grad_out, n_classes, *, sample_weight=None,
                      bint compute_grad=True):
    """Softmax cross-entropy: returns sum_i logsumexp(z_i) - z_{i, y_i}.

    IN  X (n, p) float32/float64 C-contiguous (read-only is fine)
    IN  y (n) int64 labels in [0, n_classes)
    IN  coef (p*K + K): W (p, K) row-major then b (K), K = n_classes
    IN  sample_weight (n) dtype of X, or None (all 1): every sum is weighted
    OUT grad_out (p*K + K): overwritten with the sum over rows of
        x_i (softmax(z_i) - onehot(y_i)) and (softmax(z_i) - onehot(y_i))
        (zeros if compute_grad is False)
    Raises ValueError on bad shapes/dtypes, labels outside [0, K), NaN/inf.
    """
    name = "loss_grad_softmax"
    n_classes = int(n_classes)
    if n_classes < 1:
        raise ValueError(f"{name}: n_classes must be >= 1, got {n_classes}")
    p = X.shape[1] if isinstance(X, np.ndarray) and X.ndim == 2 else -1
    _check_common(name, X, coef, grad_out, (p * n_classes + n_classes) if p >= 0 else -1)
    _check_class_labels(name, X, y)
    w = _check_weight(name, X, sample_weight)
    loss, bad = _softmax(X, y, w, coef, grad_out, n_classes, compute_grad)
    if bad:
        _raise_bad_labels(name, y, n_classes)
    if not isfinite(loss):
        _raise_non_finite(name, loss)
    return loss


# ---- the vectorised math, exposed for tests and reuse -----------------------------
def _map(const floating[::1] x, floating[::1] out, int which):
    cdef int64_t n = x.shape[0]
    if n == 0:
        return
    with nogil:
        if floating is double:
            if which == 0:
                dml_vexp_d(&x[0], &out[0], n)
            elif which == 1:
                dml_vlog_d(&x[0], &out[0], n)
            elif which == 2:
                dml_vlog1p_d(&x[0], &out[0], n)
            else:
                dml_vlog1p_unit_d(&x[0], &out[0], n)
        else:
            if which == 0:
                dml_vexp_f(&x[0], &out[0], n)
            elif which == 1:
                dml_vlog_f(&x[0], &out[0], n)
            elif which == 2:
                dml_vlog1p_f(&x[0], &out[0], n)
            else:
                dml_vlog1p_unit_f(&x[0], &out[0], n)


def _map_checked(name, x, out, int which):
    x = np.asarray(x)
    if x.ndim != 1 or x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: x must be a 1-D float32/float64 array")
    if out is None:
        out = np.empty_like(x)
    if out.dtype != x.dtype or out.shape != x.shape:
        raise ValueError(f"{name}: out must match x's shape and dtype")
    _map(np.ascontiguousarray(x), out, which)
    return out


def vexp(x, out=None):
    """exp(x), vectorised (~1 ulp).  IN x (n,) float; OUT out (n,) (allocated if None)."""
    return _map_checked("vexp", x, out, 0)


def vlog(x, out=None):
    """log(x), vectorised (~1 ulp).  IN x (n,) float; OUT out (n,) (allocated if None)."""
    return _map_checked("vlog", x, out, 1)


def vlog1p(x, out=None):
    """log1p(x), vectorised (~1 ulp).  IN x (n,) float; OUT out (n,) (allocated if None)."""
    return _map_checked("vlog1p", x, out, 2)


def _vlog1p_unit(x, out=None):
    """log1p(x) for x in [0, 1] only: the fast variant inside the logistic kernel."""
    return _map_checked("_vlog1p_unit", x, out, 3)


# ---- introspection and tuning ---------------------------------------------------
def simd_info():
    """Which code path runs: {"cpu_avx2_fma": bool, "active": "avx2+fma" | "baseline"}."""
    return {"cpu_avx2_fma": bool(dml_cpu_has_avx2()),
            "active": "avx2+fma" if dml_use_avx2() else "baseline"}


def _set_simd(mode):
    """Testing/benchmarking: mode "auto" or "baseline" (force the portable path)."""
    global dml_simd_request
    if mode == "auto":
        dml_simd_request = -1
    elif mode == "baseline":
        dml_simd_request = 0
    else:
        raise ValueError("mode must be 'auto' or 'baseline'")


def _tuning(block_bytes=None, prefetch_blocks=None):
    """Get (and optionally set) the block size in bytes and the prefetch distance."""
    global dml_block_bytes, dml_prefetch_blocks
    if block_bytes is not None:
        if block_bytes < 256:
            raise ValueError("block_bytes must be >= 256")
        dml_block_bytes = block_bytes
    if prefetch_blocks is not None:
        if prefetch_blocks < 0:
            raise ValueError("prefetch_blocks must be >= 0")
        dml_prefetch_blocks = prefetch_blocks
    return {"block_bytes": dml_block_bytes, "prefetch_blocks": dml_prefetch_blocks}


# ---- CSR (scipy.sparse) kernels -------------------------------------------------
# The C bodies are in csr_impl.h: per block of rows, z_i = sum_k data[k]
# w[indices[k]] + b, the pointwise stage, then g[indices[k]] += data[k] r_i.
# Sums go to a float64 accumulator (``acc``), so float32 totals keep float32
# precision; entries of features no row touches stay 0. Indices: int32 or
# int64 (``csr_index``), as scipy.sparse makes them.
cdef extern from "loss_kernels.h" nogil:
    int64_t dml_csr_block
    int dml_csr_glm(int f64, int i64, int kind, const void *data, const void *ind,
                    const void *indptr, int64_t n, int64_t p, const void *y, const void *w,
                    const void *coef, double *acc, int compute_grad, double *loss_out,
                    int *bad_out)
    int dml_csr_softmax(int f64, int i64, const void *data, const void *ind,
                        const void *indptr, int64_t n, int64_t p, int64_t K, const int64_t *y,
                        const void *w, const void *coef, double *acc, int compute_grad,
                        double *loss_out, int *bad_out)

ctypedef fused csr_index:
    int32_t
    int64_t


def csr_block_rows(Py_ssize_t rows=-1):
    """Get (and with ``rows`` >= 0 set) the CSR kernels' rows per block;
    0 lets them choose from the problem's size (see loss_kernels.h)."""
    global dml_csr_block
    if rows >= 0:
        dml_csr_block = rows
    return dml_csr_block


def _glm_csr(int kind, const floating[::1] data, const csr_index[::1] indices,
             const csr_index[::1] indptr, const floating[::1] y, const floating[::1] w,
             const floating[::1] coef, double[::1] acc, bint compute_grad):
    """Squared (kind 0) / logistic (kind 1) loss over CSR rows; ``acc`` (p + 1)
    receives the gradient sums (zeroed by the caller). Returns (loss, bad)."""
    cdef int64_t n = indptr.shape[0] - 1, p = coef.shape[0] - 1
    cdef double loss = 0.0
    cdef int bad = 0, rc = 0
    cdef const floating *wp = &w[0] if w is not None and n > 0 else NULL
    cdef const floating *dp = &data[0] if data.shape[0] > 0 else NULL
    cdef const csr_index *ip = &indices[0] if indices.shape[0] > 0 else NULL
    with nogil:
        rc = dml_csr_glm(sizeof(floating) == 8, sizeof(csr_index) == 8, kind, dp, ip,
                         &indptr[0], n, p, &y[0] if n > 0 else NULL, wp, &coef[0], &acc[0],
                         compute_grad, &loss, &bad)
    if rc != 0:
        raise MemoryError("loss_grad_csr: could not allocate the block scratch")
    return loss, bad


def _softmax_csr(const floating[::1] data, const csr_index[::1] indices,
                 const csr_index[::1] indptr, const int64_t[::1] y, const floating[::1] w,
                 const floating[::1] coef, Py_ssize_t K, double[::1] acc, bint compute_grad):
    """Softmax cross-entropy over CSR rows; ``acc`` (p*K + K) receives the
    gradient sums (zeroed by the caller). Returns (loss, bad)."""
    cdef int64_t n = indptr.shape[0] - 1, p = (coef.shape[0] - K) // K
    cdef double loss = 0.0
    cdef int bad = 0, rc = 0
    cdef const floating *wp = &w[0] if w is not None and n > 0 else NULL
    cdef const floating *dp = &data[0] if data.shape[0] > 0 else NULL
    cdef const csr_index *ip = &indices[0] if indices.shape[0] > 0 else NULL
    cdef const int64_t *yp = &y[0] if n > 0 else NULL
    with nogil:
        rc = dml_csr_softmax(sizeof(floating) == 8, sizeof(csr_index) == 8, dp, ip, &indptr[0],
                             n, p, K, yp, wp, &coef[0], &acc[0], compute_grad, &loss, &bad)
    if rc != 0:
        raise MemoryError("loss_grad_csr: could not allocate the block scratch")
    return loss, bad


def _check_csr(name, X, coef, grad_out, n_coef):
    """The CSR arrays of ``X`` (a scipy.sparse matrix) as the kernels take them."""
    import scipy.sparse as sp

    if not sp.issparse(X) or X.format != "csr":
        raise ValueError(f"{name}: X must be a scipy.sparse CSR matrix, got {type(X).__name__}")
    _check_coef_grad(name, X, coef, grad_out, n_coef)
    index = np.int32 if X.indices.dtype == X.indptr.dtype == np.int32 else np.int64
    indices, indptr = X.indices.astype(index, copy=False), X.indptr.astype(index, copy=False)
    return (np.ascontiguousarray(X.data), np.ascontiguousarray(indices),
            np.ascontiguousarray(indptr))


def loss_grad_csr(kind, X, y, coef, grad_out, *, n_classes=None, sample_weight=None,
                  bint compute_grad=True):
    """The GLM losses of ``loss_grad_squared`` / ``_logistic`` / ``_softmax`` on a
    scipy.sparse CSR ``X``, streaming its stored entries (no densifying).

    IN  kind "squared" | "logistic" | "softmax"; X (n, p) CSR float32/float64;
        y (n) of X's dtype (int64 labels for softmax); coef (p + 1) or
        (p*K + K); sample_weight (n) of X's dtype or None
    OUT grad_out: overwritten with the (weighted) sum over rows of the gradient
    Returns the (weighted) loss sum; ValueError on bad labels or NaN/inf.
    """
    name = f"loss_grad_csr({kind})"
    n, p = X.shape
    K = 1 if kind != "softmax" else int(n_classes)
    n_coef = p + 1 if kind != "softmax" else p * K + K
    data, indices, indptr = _check_csr(name, X, coef, grad_out, n_coef)
    w = _check_weight(name, X, sample_weight)
    acc = np.zeros(n_coef, dtype=np.float64)
    if kind == "softmax":
        _check_class_labels(name, X, y)
        loss, bad = _softmax_csr(data, indices, indptr, y, w, coef, K, acc, compute_grad)
        if bad:
            _raise_bad_labels(name, y, K)
    elif kind in ("squared", "logistic"):
        _check_row_vector(name, X, "y", y)
        loss, bad = _glm_csr(KIND_SQUARED if kind == "squared" else KIND_LOGISTIC, data,
                             indices, indptr, y, w, coef, acc, compute_grad)
        if bad:
            _raise_bad_labels(name, y)
    else:
        raise ValueError(f"{name}: kind must be squared, logistic or softmax")
    if not isfinite(loss):
        _raise_non_finite(name, loss)
    grad_out[...] = acc
    return loss
