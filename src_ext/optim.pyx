# cython: language_level=3
"""Optimizer updates in place on one flat parameter vector (float32/float64, nogil).

Design
------
- One pass over the vectors per step; the loop-invariant choices (momentum,
  Nesterov, weight decay, mask) are hoisted by the compiler (-O3 unswitching).
- Semantics are PyTorch's ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` with
  dampening 0 and a zero-initialised state, so a step here equals a step there.
- Weight decay is applied where ``decay_mask[i]`` is 1 (weights of trainable
  layers); biases and frozen layers get 0. ``decay_mask=None`` decays all.
- Subnormals: momentum and second-moment buffers decay geometrically into
  the subnormal range, where arithmetic on them is slow on most CPUs
  (``benchmarks/bench_mlp_optim.py`` measures it). Each kernel therefore
  runs with flush-to-zero and denormals-are-zero set -- MXCSR on x86 (saved
  and restored, so the caller's floating-point environment is unchanged),
  FPCR.FZ on aarch64 -- and elsewhere flushes |v| < FLT_MIN (DBL_MIN) to 0
  with a branch-free select.
- IN ``grad`` and ``decay_mask`` are const memoryviews (read-only buffers are
  fine); IN/OUT ``params`` and the state vectors are updated in place.
"""
from cython cimport floating
from libc.float cimport FLT_MIN, DBL_MIN
from libc.math cimport sqrt, sqrtf, fabs, fabsf

import numpy as np

cdef extern from *:
    """
    #if defined(__x86_64__) || defined(_M_X64) || defined(__SSE2__)
    #include <xmmintrin.h>
    #include <pmmintrin.h>
    typedef unsigned int dml_fpstate;
    #define DML_SOFT_FLUSH 0
    #define DML_FTZ_KIND "x86 MXCSR FTZ|DAZ"
    static inline dml_fpstate dml_ftz_enter(void) {
        dml_fpstate saved = _mm_getcsr();
        _mm_setcsr(saved | _MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON);
        __asm__ __volatile__("" ::: "memory");
        return saved;
    }
    static inline void dml_ftz_leave(dml_fpstate saved) {
        __asm__ __volatile__("" ::: "memory");
        _mm_setcsr(saved);
    }
    #elif defined(__aarch64__)
    typedef unsigned long long dml_fpstate;
    #define DML_SOFT_FLUSH 0
    #define DML_FTZ_KIND "aarch64 FPCR.FZ"
    static inline dml_fpstate dml_ftz_enter(void) {
        unsigned long long saved;
        __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved) :: "memory");
        __asm__ __volatile__("msr fpcr, %0" :: "r"(saved | (1ULL << 24)) : "memory");
        return saved;
    }
    static inline void dml_ftz_leave(dml_fpstate saved) {
        __asm__ __volatile__("msr fpcr, %0" :: "r"(saved) : "memory");
    }
    #else
    typedef int dml_fpstate;
    #define DML_SOFT_FLUSH 1
    #define DML_FTZ_KIND "software flush"
    static inline dml_fpstate dml_ftz_enter(void) { return 0; }
    static inline void dml_ftz_leave(dml_fpstate saved) { (void)saved; }
    #endif
    """
    ctypedef int dml_fpstate
    bint DML_SOFT_FLUSH
    const char *DML_FTZ_KIND
    dml_fpstate dml_ftz_enter() noexcept nogil
    void dml_ftz_leave(dml_fpstate saved) noexcept nogil

FLUSH_TO_ZERO = DML_FTZ_KIND.decode()


cdef inline floating _flush(floating x) noexcept nogil:
    """x, or 0 where |x| is subnormal (only where no hardware flush exists)."""
    if not DML_SOFT_FLUSH:
        return x
    if floating is float:
        return x if fabsf(x) >= FLT_MIN else 0
    else:
        return x if fabs(x) >= DBL_MIN else 0


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


# ---- kernels -------------------------------------------------------------------
cdef void _sgd(Py_ssize_t n, floating *p, const floating *g, floating *vel,
               floating lr, floating mu, bint nesterov, floating wd,
               const unsigned char *mask) noexcept nogil:
    """g' = g + wd*mask*p; v = mu v + g'; p -= lr (g' + mu v if nesterov else v)
    (v absent when mu == 0: p -= lr g')."""
    cdef Py_ssize_t i
    cdef floating gi, vi
    cdef dml_fpstate saved = dml_ftz_enter()
    if mu == 0:
        if mask == NULL:
            for i in range(n):
                p[i] = _flush(p[i] - lr * (g[i] + wd * p[i]))
        else:
            for i in range(n):
                p[i] = _flush(p[i] - lr * (g[i] + (wd * mask[i]) * p[i]))
    elif mask == NULL:
        for i in range(n):
            gi = g[i] + wd * p[i]
            vi = _flush(mu * vel[i] + gi)
            vel[i] = vi
            if nesterov:
                p[i] = _flush(p[i] - lr * (gi + mu * vi))
            else:
                p[i] = _flush(p[i] - lr * vi)
    else:
        for i in range(n):
            gi = g[i] + (wd * mask[i]) * p[i]
            vi = _flush(mu * vel[i] + gi)
            vel[i] = vi
            if nesterov:
                p[i] = _flush(p[i] - lr * (gi + mu * vi))
            else:
                p[i] = _flush(p[i] - lr * vi)
    dml_ftz_leave(saved)


cdef void _adam(Py_ssize_t n, floating *p, const floating *g, floating *m,
                floating *v, floating lr, floating b1, floating b2,
                floating eps, floating step_size, floating inv_sqrt_bc2,
                floating wd, bint decoupled,
                const unsigned char *mask) noexcept nogil:
    """Adam (decoupled=False: g += wd*mask*p) / AdamW (p -= lr*wd*mask*p):
    m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= step_size m / (sqrt(v) * inv_sqrt_bc2 + eps), step_size = lr / (1 - b1^t)."""
    cdef Py_ssize_t i
    cdef floating gi, mi, vi, pi, d
    cdef floating c1 = 1 - b1, c2 = 1 - b2
    # branch-free in the loop: exactly one of the two decays is non-zero
    cdef floating wd_grad = 0 if decoupled else wd
    cdef floating wd_param = lr * wd if decoupled else 0
    cdef dml_fpstate saved = dml_ftz_enter()
    if mask == NULL:
        for i in range(n):
            pi = p[i]
            gi = g[i] + wd_grad * pi
            mi = _flush(b1 * m[i] + c1 * gi)
            vi = _flush(b2 * v[i] + c2 * gi * gi)
            m[i] = mi
            v[i] = vi
            p[i] = _flush(pi - wd_param * pi - step_size * mi / (_sqrt(vi) * inv_sqrt_bc2 + eps))
    else:
        for i in range(n):
            pi = p[i]
            d = mask[i]
            gi = g[i] + (wd_grad * d) * pi
            mi = _flush(b1 * m[i] + c1 * gi)
            vi = _flush(b2 * v[i] + c2 * gi * gi)
            m[i] = mi
            v[i] = vi
            p[i] = _flush(pi - (wd_param * d) * pi - step_size * mi / (_sqrt(vi) * inv_sqrt_bc2 + eps))
    dml_ftz_leave(saved)


# ---- Python layer ------------------------------------------------------------------
def _state(name, a, n, dtype, allow_empty=False):
    """An IN/OUT vector: contiguous, writable, of the parameters' dtype and length."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D vector, got shape {a.shape}")
    if a.dtype != dtype:
        raise ValueError(f"{name}: dtype {a.dtype} does not match params' {np.dtype(dtype)}")
    if allow_empty and a.shape[0] == 0:
        return a
    if a.shape[0] != n:
        raise ValueError(f"{name}: expected length {n}, got {a.shape[0]}")
    if not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"{name}: must be a contiguous, writable array")
    return a


def _check_args(params, grad, decay_mask):
    if not isinstance(params, np.ndarray):
        raise TypeError(f"params: expected a numpy array, got {type(params).__name__}")
    if params.dtype not in (np.float32, np.float64):
        raise ValueError(f"params: dtype must be float32 or float64, got {params.dtype}")
    params = _state("params", params, params.shape[0] if params.ndim == 1 else -1,
                    params.dtype)
    n = params.shape[0]
    grad = np.asarray(grad)
    if grad.ndim != 1 or grad.shape[0] != n:
        raise ValueError(f"grad: expected shape ({n},), got {grad.shape}")
    if grad.dtype != params.dtype:
        raise ValueError(f"grad: dtype {grad.dtype} does not match params' {params.dtype}")
    grad = np.ascontiguousarray(grad)
    if decay_mask is not None:
        decay_mask = np.asarray(decay_mask)
        if decay_mask.shape != (n,):
            raise ValueError(f"decay_mask: expected shape ({n},), got {decay_mask.shape}")
        if decay_mask.dtype == np.bool_:
            decay_mask = decay_mask.view(np.uint8)
        elif decay_mask.dtype != np.uint8:
            raise ValueError(f"decay_mask: dtype must be bool or uint8, got {decay_mask.dtype}")
        decay_mask = np.ascontiguousarray(decay_mask)
        if (decay_mask > 1).any():
            raise ValueError("decay_mask: entries must be 0 or 1")
    return params, grad, decay_mask


def _finite_nonneg(**kw):
    for name, value in kw.items():
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: must be finite and >= 0, got {value!r}")


cdef _sgd_impl(floating[::1] p, const floating[::1] g, floating[::1] vel,
               double lr, double mu, bint nesterov, double wd,
               const unsigned char[::1] mask):
    cdef Py_ssize_t n = p.shape[0]
    cdef const unsigned char *mp = &mask[0] if mask is not None and n else NULL
    cdef floating *vp = &vel[0] if vel.shape[0] else NULL
    if n == 0:
        return
    with nogil:
        _sgd(n, &p[0], &g[0], vp, <floating> lr, <floating> mu, nesterov,
             <floating> wd, mp)


def sgd_update(params, grad, velocity, lr, momentum=0.0, nesterov=False,
               weight_decay=0.0, decay_mask=None):
    """SGD step in place, PyTorch semantics (dampening 0):

        g = grad + weight_decay * params       (where decay_mask is 1)
        v = momentum * v + g                   (velocity; skipped if momentum == 0)
        params -= lr * (g + momentum * v if nesterov else v)

    IN grad, decay_mask (bool/uint8 or None = decay all); IN/OUT params,
    velocity (may be empty when momentum == 0). Returns None.
    """
    params, grad, decay_mask = _check_args(params, grad, decay_mask)
    _finite_nonneg(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if nesterov and momentum == 0:
        raise ValueError("nesterov: needs momentum > 0")
    velocity = _state("velocity", velocity, params.shape[0], params.dtype,
                      allow_empty=(momentum == 0))
    if params.dtype == np.float32:
        _sgd_impl[float](params, grad, velocity, lr, momentum, nesterov,
                         weight_decay, decay_mask)
    else:
        _sgd_impl[double](params, grad, velocity, lr, momentum, nesterov,
                          weight_decay, decay_mask)


cdef _adam_impl(floating[::1] p, const floating[::1] g, floating[::1] m,
                floating[::1] v, double lr, double b1, double b2, double eps,
                double step_size, double inv_sqrt_bc2, double wd,
                bint decoupled, const unsigned char[::1] mask):
    cdef Py_ssize_t n = p.shape[0]
    cdef const unsigned char *mp = &mask[0] if mask is not None and n else NULL
    if n == 0:
        return
    with nogil:
        _adam(n, &p[0], &g[0], &m[0], &v[0], <floating> lr, <floating> b1,
              <floating> b2, <floating> eps, <floating> step_size,
              <floating> inv_sqrt_bc2, <floating> wd, decoupled, mp)


def adam_update(params, grad, m, v, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                step=1, weight_decay=0.0, decay_mask=None, decoupled=False):
    """Adam (AdamW when ``decoupled``) step in place, PyTorch semantics:

        g = grad + weight_decay * params       (Adam; where decay_mask is 1)
        params *= 1 - lr * weight_decay        (AdamW; where decay_mask is 1)
        m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
        params -= lr / (1 - beta1^step) * m / (sqrt(v / (1 - beta2^step)) + eps)

    ``step`` is the 1-based count of this update. IN grad, decay_mask;
    IN/OUT params, m, v. Returns None.
    """
    params, grad, decay_mask = _check_args(params, grad, decay_mask)
    _finite_nonneg(lr=lr, eps=eps, weight_decay=weight_decay)
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not (0.0 <= beta < 1.0):
            raise ValueError(f"{name}: must be in [0, 1), got {beta!r}")
    if int(step) != step or step < 1:
        raise ValueError(f"step: must be an integer >= 1, got {step!r}")
    n = params.shape[0]
    m = _state("m", m, n, params.dtype)
    v = _state("v", v, n, params.dtype)
    step = int(step)
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    if params.dtype == np.float32:
        _adam_impl[float](params, grad, m, v, lr, beta1, beta2, eps, lr / bc1,
                          1.0 / np.sqrt(bc2), weight_decay, bool(decoupled), decay_mask)
    else:
        _adam_impl[double](params, grad, m, v, lr, beta1, beta2, eps, lr / bc1,
                           1.0 / np.sqrt(bc2), weight_decay, bool(decoupled), decay_mask)
