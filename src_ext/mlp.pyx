# cython: language_level=3
"""MLP dense forward and backward on BLAS gemm, float32 and float64, nogil.

Parameters are ONE flat vector: W_l (row-major) then b_l for each layer
(``dmlcore.models.base``); losses and gradients are SUMS over rows.

Naming: ``_gemm`` is the thin BLAS wrapper; ``_bias_act_*``, ``_softmax_*``,
``_squared_*`` are the fused passes; ``_forward_block``/``_backward_block`` run
one block; ``loss_grad_softmax``, ``loss_grad_squared`` and ``forward`` are the
Python entry points (validate, then release the GIL).
"""
# Design
# ------
# Layout. Parameters are ONE flat vector. Layer l (0-based, L layers, widths
# ``sizes[0..L]``) holds W_l, shape (sizes[l], sizes[l+1]) row-major, then b_l,
# shape (sizes[l+1],), back to back (see ``dmlcore.models.base``).
#
# Forward, on a block of B rows (everything row-major, X may have a row stride):
#
#     Z_l = A_{l-1} @ W_l              gemm (A_{-1} = X)
#     A_l = act(Z_l + b_l)             one fused pass: bias, activation, finiteness probe
#
# The last layer has no activation: Z_{L-1} + b is the logits (softmax) or the
# prediction (linear); its bias is fused into the loss pass.
#
# Loss and output delta, per row (sums over rows, never means):
#
#     softmax:  loss = logsumexp(z) - z_y        D = softmax(z) - onehot(y)
#     linear:   loss = 1/2 sum_k (z_k - y_k)^2    D = z - y
#     sigmoid:  loss = sum_k log1p(e^-|z_k|) + max(z_k, 0) - y_k z_k
#                                                 D = sigmoid(z) - y   (multilabel)
#
# Backward, accumulated over row blocks (gemm beta = 1 after the first block):
#
#     gW_l += A_{l-1}^T @ D_l          gb_l += sum over rows of D_l
#     D_{l-1} = (D_l @ W_l^T) * act'(A_{l-1})       act' read from the output A:
#                                                   relu 1[a > 0], tanh 1 - a^2,
#                                                   identity 1, logistic a (1 - a)
#
# Early stop: ``trainable[l]`` flags the layers whose gradient is wanted. Delta
# propagation stops at the lowest flagged layer (nothing below it is computed);
# the entries of unflagged layers are set to 0.
#
# Workspace for a block of B rows (see ``workspace_size``): the activations A_l
# of every layer (B x sizes[l+1] each, D_l overwrites A_l in place), one scratch
# block B x (widest hidden layer) for D_l @ W_l^T, and one row of the widest
# layer for the finiteness probe.
#
# Non-finite detection costs no second pass over X: every fused bias+activation
# pass adds (z - z) into a per-column accumulator (0 for finite z, NaN for NaN
# or +-inf, and vectorisable, unlike a scalar reduction); the accumulator sum is
# added to the returned loss (or returned as the probe by ``forward``). A NaN or
# inf anywhere in X, y or params therefore makes the returned sum non-finite.
#
from cython cimport floating
from libc.math cimport exp, expf, log, logf, log1p, log1pf, tanh, tanhf
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport sgemm, dgemm

import numpy as np

ACTIVATIONS = {"relu": 0, "tanh": 1, "identity": 2, "logistic": 3}
OUTPUTS = {"softmax": 0, "linear": 1, "sigmoid": 2}

cdef enum:
    ACT_RELU = 0
    ACT_TANH = 1
    ACT_IDENTITY = 2
    ACT_LOGISTIC = 3
    OUT_SOFTMAX = 0
    OUT_LINEAR = 1
    OUT_SIGMOID = 2


# ---- BLAS ------------------------------------------------------------------
cdef inline void _gemm(bint trans_a, bint trans_b, int m, int n, int k,
                       floating alpha, const floating *a, int lda,
                       const floating *b, int ldb, floating beta,
                       floating *c, int ldc) noexcept nogil:
    """Row-major C (m x n) := alpha op(A) @ op(B) + beta C (col-major gemm on C^T = op(B)^T op(A)^T)."""
    cdef char ta = b'T' if trans_b else b'N'
    cdef char tb = b'T' if trans_a else b'N'
    if floating is float:
        sgemm(&ta, &tb, &n, &m, &k, &alpha, <float *> b, &ldb,
              <float *> a, &lda, &beta, c, &ldc)
    else:
        dgemm(&ta, &tb, &n, &m, &k, &alpha, <double *> b, &ldb,
              <double *> a, &lda, &beta, c, &ldc)


cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)


cdef inline floating _tanh(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)


cdef inline floating _sigmoid(floating x) noexcept nogil:
    """1 / (1 + exp(-x)), without overflow for either sign (NaN stays NaN)."""
    cdef floating e
    if x >= 0:
        return 1 / (1 + _exp(-x))
    e = _exp(x)
    return e / (1 + e)


cdef inline floating _log1p(floating x) noexcept nogil:
    if floating is float:
        return log1pf(x)
    else:
        return log1p(x)


# ---- fused elementwise passes ------------------------------------------------
cdef void _bias_act(floating *z, const floating *b, Py_ssize_t rows,
                    Py_ssize_t cols, int act, floating *probe) noexcept nogil:
    """IN/OUT z (rows x cols): z := act(z + b); OUT probe[j] += (z - z)."""
    cdef Py_ssize_t i, j
    cdef floating t
    cdef floating *row
    for i in range(rows):
        row = z + i * cols
        if act == ACT_RELU:
            for j in range(cols):
                t = row[j] + b[j]
                probe[j] += t - t
                row[j] = 0 if t < 0 else t      # keeps NaN (NaN < 0 is false)
        elif act == ACT_TANH:
            for j in range(cols):
                t = row[j] + b[j]
                probe[j] += t - t
                row[j] = _tanh(t)
        elif act == ACT_IDENTITY:
            for j in range(cols):
                t = row[j] + b[j]
                probe[j] += t - t
                row[j] = t
        else:
            for j in range(cols):
                t = row[j] + b[j]
                probe[j] += t - t
                row[j] = _sigmoid(t)


cdef void _act_backward(floating *a, const floating *s, Py_ssize_t count,
                        int act) noexcept nogil:
    """IN/OUT a: the activation output A, overwritten by D = s * act'(A)."""
    cdef Py_ssize_t i
    cdef floating t
    if act == ACT_RELU:
        for i in range(count):
            a[i] = s[i] if a[i] > 0 else 0
    elif act == ACT_TANH:
        for i in range(count):
            t = a[i]
            a[i] = s[i] * (1 - t * t)
    elif act == ACT_IDENTITY:
        memcpy(a, s, count * sizeof(floating))
    else:
        for i in range(count):
            t = a[i]
            a[i] = s[i] * t * (1 - t)


cdef void _col_sum(const floating *d, Py_ssize_t rows, Py_ssize_t cols,
                   floating *out) noexcept nogil:
    """OUT out (cols,) += sum over rows of d (rows x cols)."""
    cdef Py_ssize_t i, j
    cdef const floating *row
    for i in range(rows):
        row = d + i * cols
        for j in range(cols):
            out[j] += row[j]


cdef Py_ssize_t _softmax_xent(floating *z, const floating *b,
                              const int64_t *labels, const floating *w, Py_ssize_t rows,
                              Py_ssize_t k, double *loss) noexcept nogil:
    """IN/OUT z: logits without bias -> D = w_i (softmax(z + b) - onehot(y)).

    Adds sum of w_i (logsumexp(z) - z_y) to *loss (w NULL: all 1). Returns -1,
    or the row (in this block) of the first label outside [0, k).
    """
    cdef Py_ssize_t i, j
    cdef int64_t y
    cdef floating m, s, e, zy, inv, wi = 1
    cdef floating *row
    cdef double acc = 0
    for i in range(rows):
        y = labels[i]
        if y < 0 or y >= k:
            return i
        row = z + i * k
        for j in range(k):
            row[j] += b[j]
        m = row[0]
        for j in range(1, k):
            if row[j] > m:
                m = row[j]
        zy = row[y]
        s = 0
        for j in range(k):
            e = _exp(row[j] - m)
            row[j] = e
            s += e
        # NaN or inf logits make s or m non-finite, hence the loss.
        if w != NULL:
            wi = w[i]
        acc += <double> wi * (log(<double> s) + <double> m - <double> zy)
        inv = wi / s
        for j in range(k):
            row[j] *= inv
        row[y] -= wi
    loss[0] += acc
    return -1


cdef void _squared(floating *z, const floating *b, const floating *y,
                   Py_ssize_t ldy, const floating *w, Py_ssize_t rows, Py_ssize_t k,
                   double *loss) noexcept nogil:
    """IN/OUT z: prediction without bias -> D = w_i (z + b - y);
    *loss += 1/2 sum w_i (z + b - y)^2 (w NULL: all 1)."""
    cdef Py_ssize_t i, j
    cdef floating d, wi = 1
    cdef floating *row
    cdef double acc = 0
    for i in range(rows):
        row = z + i * k
        if w != NULL:
            wi = w[i]
        for j in range(k):
            d = row[j] + b[j] - y[i * ldy + j]
            row[j] = wi * d
            acc += <double> wi * d * d
    loss[0] += 0.5 * acc


cdef void _sigmoid_xent(floating *z, const floating *b, const floating *y,
                        Py_ssize_t ldy, const floating *w, Py_ssize_t rows, Py_ssize_t k,
                        double *loss) noexcept nogil:
    """IN/OUT z: logits without bias -> D = w_i (sigmoid(z + b) - y) (y in [0, 1]).

    Adds sum over rows and outputs of w_i (log1p(exp(-|z|)) + max(z, 0) - y z)
    (binary cross-entropy, stable for either sign) to *loss (w NULL: all 1).
    """
    cdef Py_ssize_t i, j
    cdef floating t, yt, wi = 1
    cdef floating *row
    cdef double acc = 0
    for i in range(rows):
        row = z + i * k
        if w != NULL:
            wi = w[i]
        for j in range(k):
            t = row[j] + b[j]
            yt = y[i * ldy + j]
            acc += <double> wi * (_log1p(_exp(-(t if t >= 0 else -t))) + (t if t > 0 else 0)
                                  - yt * t)
            row[j] = wi * (_sigmoid(t) - yt)
    loss[0] += acc


cdef double _sigmoid_predict(floating *z, const floating *b, Py_ssize_t rows,
                             Py_ssize_t k) noexcept nogil:
    """IN/OUT z: logits without bias -> sigmoid(z + b). Returns sum(z - z) (0 if finite)."""
    cdef Py_ssize_t i, j
    cdef floating t
    cdef double probe = 0
    for i in range(rows):
        for j in range(k):
            t = z[i * k + j] + b[j]
            probe += t - t
            z[i * k + j] = _sigmoid(t)
    return probe


cdef double _softmax_predict(floating *z, const floating *b, Py_ssize_t rows,
                             Py_ssize_t k) noexcept nogil:
    """IN/OUT z: logits without bias -> softmax(z + b). Returns sum(z - z) (0 if finite)."""
    cdef Py_ssize_t i, j
    cdef floating m, s, inv
    cdef floating *row
    cdef double probe = 0
    for i in range(rows):
        row = z + i * k
        for j in range(k):
            row[j] += b[j]
            probe += row[j] - row[j]
        m = row[0]
        for j in range(1, k):
            if row[j] > m:
                m = row[j]
        s = 0
        for j in range(k):
            row[j] = _exp(row[j] - m)
            s += row[j]
        inv = 1 / s
        for j in range(k):
            row[j] *= inv
    return probe


cdef double _linear_predict(floating *z, const floating *b, Py_ssize_t rows,
                            Py_ssize_t k) noexcept nogil:
    """IN/OUT z := z + b. Returns sum(z - z) (0 if finite)."""
    cdef Py_ssize_t i, j
    cdef double probe = 0
    for i in range(rows):
        for j in range(k):
            z[i * k + j] += b[j]
            probe += z[i * k + j] - z[i * k + j]
    return probe


# ---- one block of rows -------------------------------------------------------
cdef void _forward_hidden(const floating *x, Py_ssize_t ldx, Py_ssize_t rows,
                          const floating *params, const int64_t *sizes,
                          const Py_ssize_t *offs, int n_layers, int act,
                          floating **acts, floating *out_last,
                          floating *probe) noexcept nogil:
    """Forward through every layer; the last layer's X W (no bias) goes to out_last.

    acts[l] (rows x sizes[l+1]) receives A_l for the hidden layers.
    """
    cdef int l
    cdef const floating *inp = x
    cdef int ld_in = <int> ldx
    cdef int n_in, n_out
    cdef floating *dst
    for l in range(n_layers):
        n_in = <int> sizes[l]
        n_out = <int> sizes[l + 1]
        dst = out_last if l == n_layers - 1 else acts[l]
        _gemm(False, False, <int> rows, n_out, n_in, <floating> 1.0,
              inp, ld_in, params + offs[l], n_out, <floating> 0.0, dst, n_out)
        if l < n_layers - 1:
            _bias_act(dst, params + offs[l] + sizes[l] * sizes[l + 1],
                      rows, n_out, act, probe)
            inp = dst
            ld_in = n_out


cdef void _backward_block(const floating *x, Py_ssize_t ldx, Py_ssize_t rows,
                          const floating *params, const int64_t *sizes,
                          const Py_ssize_t *offs, int n_layers, int act,
                          const unsigned char *trainable, int lowest,
                          bint first_block, floating **acts, floating *scratch,
                          floating *grad) noexcept nogil:
    """acts[L-1] holds D_{L-1}; accumulate gW_l, gb_l for flagged l >= lowest
    (trainable NULL: every layer)."""
    cdef int l
    cdef int n_in, n_out, ld_in
    cdef const floating *inp
    cdef floating *d
    cdef Py_ssize_t n_w
    for l in range(n_layers - 1, lowest - 1, -1):
        n_in = <int> sizes[l]
        n_out = <int> sizes[l + 1]
        n_w = sizes[l] * sizes[l + 1]
        d = acts[l]
        if l == 0:
            inp = x
            ld_in = <int> ldx
        else:
            inp = acts[l - 1]
            ld_in = n_in
        if trainable == NULL or trainable[l]:
            _gemm(True, False, n_in, n_out, <int> rows, <floating> 1.0,
                  inp, ld_in, d, n_out,
                  <floating> (0.0 if first_block else 1.0),
                  grad + offs[l], n_out)
            _col_sum(d, rows, n_out, grad + offs[l] + n_w)
        if l > lowest:
            _gemm(False, True, <int> rows, n_in, n_out, <floating> 1.0,
                  d, n_out, params + offs[l], n_out, <floating> 0.0,
                  scratch, n_in)
            _act_backward(acts[l - 1], scratch, rows * n_in, act)


# ---- Python layer ------------------------------------------------------------
cdef struct Layout:
    int n_layers
    Py_ssize_t n_params
    Py_ssize_t sum_widths       # sum of sizes[1..L]
    Py_ssize_t sum_hidden       # sum of sizes[1..L-1]
    Py_ssize_t widest           # max of sizes[1..L]
    Py_ssize_t widest_hidden    # max of sizes[1..L-1] (0 without hidden layers)


def _as_sizes(sizes):
    """The widths as a contiguous 1-D int64 array (no copy when already one)."""
    if not (isinstance(sizes, np.ndarray) and sizes.dtype == np.int64
            and sizes.ndim == 1 and sizes.flags.c_contiguous):
        sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    if sizes.ndim != 1 or sizes.shape[0] < 2:
        raise ValueError(f"sizes: need at least 2 widths, got {sizes.tolist()}")
    return sizes


cdef Layout _layout(const int64_t[::1] sizes, Py_ssize_t *offs) except *:
    """Validate the widths; fill offs[0..L] (start of each layer; offs[L] = n_params)."""
    cdef Layout lay
    cdef int l
    cdef Py_ssize_t start = 0
    lay.n_layers = <int> sizes.shape[0] - 1
    lay.sum_widths = lay.sum_hidden = lay.widest = lay.widest_hidden = 0
    for l in range(lay.n_layers + 1):
        if sizes[l] < 1 or sizes[l] > 2147483647:
            raise ValueError(f"sizes: widths must be in [1, 2**31), got {np.asarray(sizes).tolist()}")
    for l in range(lay.n_layers):
        if offs != NULL:
            offs[l] = start
        start += sizes[l] * sizes[l + 1] + sizes[l + 1]
        lay.sum_widths += sizes[l + 1]
        lay.widest = max(lay.widest, sizes[l + 1])
        if l < lay.n_layers - 1:
            lay.sum_hidden += sizes[l + 1]
            lay.widest_hidden = max(lay.widest_hidden, sizes[l + 1])
    if offs != NULL:
        offs[lay.n_layers] = start
    lay.n_params = start
    return lay


cdef inline Py_ssize_t _workspace(const Layout *lay, Py_ssize_t block_rows,
                                  bint backward) noexcept nogil:
    if backward:
        return block_rows * (lay.sum_widths + lay.widest_hidden) + lay.widest
    return block_rows * lay.sum_hidden + lay.widest


def workspace_size(sizes, Py_ssize_t block_rows, bint backward=True):
    """Number of floats of the workspace for ``block_rows`` rows.

    backward=True (loss_grad_*): every layer's activations + one scratch block
    of the widest hidden layer + one probe row. backward=False (forward): the
    hidden activations + one probe row (the output goes straight to ``out``).
    """
    cdef Layout lay = _layout(_as_sizes(sizes), NULL)
    return _workspace(&lay, block_rows, backward)


cdef Layout _check_common(const floating[:, :] X, const floating[::1] params,
                          const int64_t[::1] sizes, floating[::1] work,
                          Py_ssize_t block_rows, bint backward,
                          Py_ssize_t *offs) except *:
    cdef Layout lay = _layout(sizes, offs)
    cdef Py_ssize_t need
    if X.shape[1] != sizes[0]:
        raise ValueError(f"X: expected {sizes[0]} columns, got {X.shape[1]}")
    if params.shape[0] != lay.n_params:
        raise ValueError(f"params: expected {lay.n_params} entries, got {params.shape[0]}")
    if X.shape[0] > 0 and X.strides[1] != <Py_ssize_t> sizeof(floating):
        raise ValueError("X: rows must be contiguous (unit column stride)")
    if X.shape[0] > 1 and (X.strides[0] % <Py_ssize_t> sizeof(floating) != 0
                           or X.strides[0] < X.shape[1] * <Py_ssize_t> sizeof(floating)):
        raise ValueError("X: unsupported row stride")
    if block_rows < 1:
        raise ValueError("block_rows must be >= 1")
    need = _workspace(&lay, block_rows, backward)
    if work.shape[0] < need:
        raise ValueError(f"work: need {need} entries for block_rows={block_rows}, "
                         f"got {work.shape[0]}")
    return lay


cdef double _run_loss_grad(const floating[:, :] X, const int64_t *labels,
                           const floating *Y, Py_ssize_t ldy, const floating *weights,
                           int output,
                           const floating[::1] params, sizes_obj, int act,
                           trainable, floating[::1] grad, floating[::1] work,
                           Py_ssize_t block_rows, Py_ssize_t *bad_row) except? -1:
    cdef const int64_t[::1] sizes = sizes_obj
    cdef int n_layers = sizes.shape[0] - 1
    cdef Py_ssize_t *offs = <Py_ssize_t *> malloc((n_layers + 1) * sizeof(Py_ssize_t))
    cdef floating **acts = <floating **> malloc(n_layers * sizeof(floating *))
    cdef const unsigned char[::1] flags
    cdef const unsigned char *fp = NULL
    cdef Layout lay
    cdef Py_ssize_t n = X.shape[0]
    cdef Py_ssize_t ldx = X.strides[0] // sizeof(floating) if n > 1 else X.shape[1]
    cdef Py_ssize_t k, r0, rows, r
    cdef int l, lowest
    cdef double loss = 0.0, probe_sum = 0.0
    cdef floating *probe
    cdef floating *scratch
    cdef const floating *xp = &X[0, 0] if n > 0 else NULL
    cdef const floating *b_last
    if offs == NULL or acts == NULL:
        free(offs)
        free(acts)
        raise MemoryError()
    try:
        lay = _check_common(X, params, sizes, work, block_rows, True, offs)
        if grad.shape[0] != params.shape[0]:
            raise ValueError(f"grad: expected {params.shape[0]} entries, got {grad.shape[0]}")
        if trainable is not None:
            flags = trainable
            if flags.shape[0] != n_layers:
                raise ValueError(f"trainable: expected {n_layers} flags, got {flags.shape[0]}")
            fp = &flags[0]
        lowest = n_layers
        for l in range(n_layers - 1, -1, -1):
            if fp == NULL or fp[l]:
                lowest = l
        k = sizes[n_layers]
        b_last = &params[0] + offs[n_layers - 1] + sizes[n_layers - 1] * k
        bad_row[0] = -1
        with nogil:
            # workspace: acts[0..L-1], then the scratch block, then the probe row
            r = 0
            for l in range(n_layers):
                acts[l] = &work[0] + r * block_rows
                r += sizes[l + 1]
            scratch = &work[0] + lay.sum_widths * block_rows
            probe = scratch + lay.widest_hidden * block_rows
            memset(probe, 0, lay.widest * sizeof(floating))
            # frozen layers are 0; trainable biases accumulate from 0 (weights
            # start with beta = 0); with no rows at all everything is 0.
            for l in range(n_layers):
                if n == 0 or not (fp == NULL or fp[l]):
                    memset(&grad[0] + offs[l], 0, (offs[l + 1] - offs[l]) * sizeof(floating))
                else:
                    memset(&grad[0] + offs[l] + sizes[l] * sizes[l + 1], 0,
                           sizes[l + 1] * sizeof(floating))
            r0 = 0
            while r0 < n:
                rows = block_rows if n - r0 > block_rows else n - r0
                _forward_hidden(xp + r0 * ldx, ldx, rows, &params[0], &sizes[0],
                                offs, n_layers, act, acts, acts[n_layers - 1], probe)
                if labels != NULL:
                    r = _softmax_xent(acts[n_layers - 1], b_last, labels + r0,
                                      weights + r0 if weights != NULL else NULL, rows, k, &loss)
                    if r >= 0:
                        bad_row[0] = r0 + r
                        break
                elif output == OUT_SIGMOID:
                    _sigmoid_xent(acts[n_layers - 1], b_last, Y + r0 * ldy, ldy,
                                  weights + r0 if weights != NULL else NULL, rows, k, &loss)
                else:
                    _squared(acts[n_layers - 1], b_last, Y + r0 * ldy, ldy,
                             weights + r0 if weights != NULL else NULL, rows, k, &loss)
                if lowest < n_layers:
                    _backward_block(xp + r0 * ldx, ldx, rows, &params[0], &sizes[0],
                                    offs, n_layers, act, fp, lowest, r0 == 0,
                                    acts, scratch, &grad[0])
                r0 += rows
            for l in range(lay.widest):
                probe_sum += probe[l]
    finally:
        free(offs)
        free(acts)
    return loss + probe_sum


# ---- OpenBLAS packing buffer ----------------------------------------------------
# OpenBLAS packs gemm operands into a 32 MB buffer that it mmaps once per
# library; a page of it becomes resident only when a gemm first writes there.
# On this project's machines float32 gemm on the MLP's shapes ran well below
# its rate until one gemm with >= ~384 output rows and columns had run in the
# process, and at full rate afterwards, in every thread (figures: the README).
# Our reading: the Haswell kernels prefetch ahead of the packed panels into
# pages that small gemms never write, and on a virtual machine each prefetch
# of a non-resident page costs a failed two-level page walk. Two 512^3 gemms,
# once per process, write those pages.
cdef bint _packing_buffer_resident = False


def make_packing_buffer_resident():
    """Run one 512^3 sgemm and dgemm on SciPy's BLAS, once per process, so
    that the pages of OpenBLAS's packing buffer that later gemms prefetch from
    are resident. Called by every entry point below; idempotent."""
    global _packing_buffer_resident
    if _packing_buffer_resident:
        return
    cdef int n = 512
    cdef float[:, ::1] a32 = np.ones((n, n), np.float32)
    cdef float[:, ::1] c32 = np.empty((n, n), np.float32)
    cdef double[:, ::1] a64 = np.ones((n, n), np.float64)
    cdef double[:, ::1] c64 = np.empty((n, n), np.float64)
    with nogil:
        _gemm(False, False, n, n, n, <float> 1.0, &a32[0, 0], n, &a32[0, 0], n,
              <float> 0.0, &c32[0, 0], n)
        _gemm(False, False, n, n, n, <double> 1.0, &a64[0, 0], n, &a64[0, 0], n,
              <double> 0.0, &c64[0, 0], n)
    _packing_buffer_resident = True


def _check_activation(int activation):
    if activation < ACT_RELU or activation > ACT_LOGISTIC:
        raise ValueError(f"activation code {activation} is not 0 (relu), 1 (tanh), "
                         f"2 (identity) or 3 (logistic)")


cdef const floating *_weights_ptr(const floating[::1] sample_weight, Py_ssize_t n) except? NULL:
    """The row weights' pointer, NULL for None; checks the length."""
    if sample_weight is None:
        return NULL
    if sample_weight.shape[0] != n:
        raise ValueError(f"sample_weight: expected {n} weights, got {sample_weight.shape[0]}")
    if n == 0:
        return NULL
    return &sample_weight[0]


def loss_grad_softmax(const floating[:, :] X, const int64_t[::1] y,
                      const floating[::1] params, sizes, int activation,
                      trainable, floating[::1] grad, floating[::1] work,
                      Py_ssize_t block_rows, const floating[::1] sample_weight=None):
    """Softmax cross-entropy MLP: SUM loss and SUM gradient over the rows of X.

    IN  X (n, sizes[0]), unit column stride (any row stride); y (n,) int64
        labels in [0, sizes[L]); params flat; sizes (L+1,) widths (int64);
        activation 0 relu / 1 tanh / 2 identity / 3 logistic; trainable None (all) or (L,) uint8 flags.
    IN  sample_weight None (all 1) or (n,) row weights of X's dtype: the loss
        and gradient sums are weighted (sum_i w_i loss_i).
    OUT grad (n_params,): overwritten (unflagged layers = 0).
    work: at least ``workspace_size(sizes, block_rows)`` floats.
    Returns (loss_sum, bad_row): bad_row = -1, or the first row whose label is
    outside the classes (then loss and grad are meaningless). A non-finite
    loss_sum means a NaN or inf in X or params.
    """
    make_packing_buffer_resident()
    _check_activation(activation)
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"y: expected {X.shape[0]} labels, got {y.shape[0]}")
    cdef Py_ssize_t bad_row = -1
    cdef int64_t dummy = 0
    cdef const int64_t *labels = &y[0] if y.shape[0] > 0 else &dummy
    cdef const floating *wp = _weights_ptr(sample_weight, X.shape[0])
    loss = _run_loss_grad(X, labels, <const floating *> NULL, 0, wp, OUT_SOFTMAX, params,
                          _as_sizes(sizes),
                          activation, trainable, grad, work, block_rows, &bad_row)
    return loss, bad_row


cdef double _loss_grad_targets(const floating[:, :] X, const floating[:, :] Y,
                               int output, const floating[::1] params, sizes,
                               int activation, trainable, floating[::1] grad,
                               floating[::1] work, Py_ssize_t block_rows,
                               const floating[::1] sample_weight) except? -1:
    """The float-target losses (squared, sigmoid cross-entropy): checks Y, runs."""
    make_packing_buffer_resident()
    _check_activation(activation)
    sizes = _as_sizes(sizes)
    k = sizes[sizes.shape[0] - 1]
    if Y.shape[0] != X.shape[0] or Y.shape[1] != k:
        raise ValueError(f"Y: expected shape ({X.shape[0]}, {k}), "
                         f"got ({Y.shape[0]}, {Y.shape[1]})")
    if Y.shape[0] > 0 and Y.strides[1] != <Py_ssize_t> sizeof(floating):
        raise ValueError("Y: rows must be contiguous (unit column stride)")
    cdef Py_ssize_t ldy = Y.strides[0] // sizeof(floating) if Y.shape[0] > 1 else Y.shape[1]
    cdef Py_ssize_t bad_row = -1
    cdef floating dummy = 0
    cdef const floating *yp = &Y[0, 0] if Y.shape[0] > 0 else &dummy
    cdef const floating *wp = _weights_ptr(sample_weight, X.shape[0])
    return _run_loss_grad(X, NULL, yp, ldy, wp, output, params, sizes, activation, trainable,
                          grad, work, block_rows, &bad_row)


def loss_grad_squared(const floating[:, :] X, const floating[:, :] Y,
                      const floating[::1] params, sizes, int activation,
                      trainable, floating[::1] grad, floating[::1] work,
                      Py_ssize_t block_rows, const floating[::1] sample_weight=None):
    """Linear-output MLP with loss 1/2 sum (y_hat - y)^2: SUM loss and gradient.

    IN  Y (n, sizes[L]) targets, unit column stride; the rest as in
        ``loss_grad_softmax``. OUT grad. Returns loss_sum (non-finite when X,
        Y or params hold a NaN or inf).
    """
    return _loss_grad_targets(X, Y, OUT_LINEAR, params, sizes, activation, trainable,
                              grad, work, block_rows, sample_weight)


def loss_grad_sigmoid(const floating[:, :] X, const floating[:, :] Y,
                      const floating[::1] params, sizes, int activation,
                      trainable, floating[::1] grad, floating[::1] work,
                      Py_ssize_t block_rows, const floating[::1] sample_weight=None):
    """Sigmoid outputs with binary cross-entropy summed over the sizes[L]
    outputs (multilabel): SUM loss and gradient over the rows of X.

    IN  Y (n, sizes[L]) 0/1 indicators (any value in [0, 1] works), unit
        column stride; the rest as in ``loss_grad_softmax``. OUT grad.
    Returns loss_sum (non-finite when X, Y or params hold a NaN or inf).
    """
    return _loss_grad_targets(X, Y, OUT_SIGMOID, params, sizes, activation, trainable,
                              grad, work, block_rows, sample_weight)


def forward(const floating[:, :] X, const floating[::1] params, sizes,
            int activation, int output, floating[:, ::1] out,
            floating[::1] work, Py_ssize_t block_rows):
    """Predictions, block by block: OUT out (n, sizes[L]) := softmax probabilities
    (output 0), the linear output (output 1) or sigmoid probabilities (output 2).

    work: at least ``workspace_size(sizes, block_rows, backward=False)``.
    Returns the finiteness probe: 0.0 when every activation is finite, else
    NaN (a NaN or inf in X or params).
    """
    make_packing_buffer_resident()
    _check_activation(activation)
    if output < OUT_SOFTMAX or output > OUT_SIGMOID:
        raise ValueError(f"output code {output} is not 0 (softmax), 1 (linear) or 2 (sigmoid)")
    cdef const int64_t[::1] sz = _as_sizes(sizes)
    cdef int n_layers = sz.shape[0] - 1
    cdef Py_ssize_t n = X.shape[0], k = sz[n_layers]
    cdef Py_ssize_t ldx = X.strides[0] // sizeof(floating) if n > 1 else X.shape[1]
    cdef Py_ssize_t r0, rows, r
    cdef int l
    cdef double probe_sum = 0.0
    cdef floating *probe
    cdef const floating *b_last
    cdef Layout lay
    cdef Py_ssize_t *offs = <Py_ssize_t *> malloc((n_layers + 1) * sizeof(Py_ssize_t))
    cdef floating **acts = <floating **> malloc(n_layers * sizeof(floating *))
    if offs == NULL or acts == NULL:
        free(offs)
        free(acts)
        raise MemoryError()
    try:
        lay = _check_common(X, params, sz, work, block_rows, False, offs)
        if out.shape[0] != n or out.shape[1] != k:
            raise ValueError(f"out: expected shape ({n}, {k})")
        if n == 0:
            return 0.0
        b_last = &params[0] + offs[n_layers - 1] + sz[n_layers - 1] * k
        with nogil:
            r = 0
            for l in range(n_layers - 1):
                acts[l] = &work[0] + r * block_rows
                r += sz[l + 1]
            acts[n_layers - 1] = NULL
            probe = &work[0] + lay.sum_hidden * block_rows
            memset(probe, 0, lay.widest * sizeof(floating))
            r0 = 0
            while r0 < n:
                rows = block_rows if n - r0 > block_rows else n - r0
                _forward_hidden(&X[0, 0] + r0 * ldx, ldx, rows, &params[0],
                                &sz[0], offs, n_layers, activation,
                                acts, &out[r0, 0], probe)
                if output == OUT_SOFTMAX:
                    probe_sum += _softmax_predict(&out[r0, 0], b_last, rows, k)
                elif output == OUT_SIGMOID:
                    probe_sum += _sigmoid_predict(&out[r0, 0], b_last, rows, k)
                else:
                    probe_sum += _linear_predict(&out[r0, 0], b_last, rows, k)
                r0 += rows
            for l in range(lay.widest):
                probe_sum += probe[l]
    finally:
        free(offs)
        free(acts)
    return probe_sum
