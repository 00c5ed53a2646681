"""Optimizer updates (dmlcore._ext.optim) against NumPy one-liners; each
optimizer drives a quadratic and the 2-D Rosenbrock function to its minimum."""
import numpy as np
import pytest

from dmlcore._ext import optim

DTYPES = [np.float32, np.float64]


def tol(dtype):
    return dict(rtol=2e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-14)


def vec(n, seed, dtype):
    return np.random.default_rng(seed).normal(size=n).astype(dtype)


def read_only(a):
    a = a.copy()
    a.setflags(write=False)
    return a


# ---- optim: one step against NumPy ------------------------------------------------------
def numpy_sgd(p, g, v, lr, mu, nesterov, wd, mask):
    d = wd * (np.ones_like(p) if mask is None else mask.astype(p.dtype))
    g = g + d * p
    if mu == 0:
        return p - lr * g, v
    v = mu * v + g
    return p - lr * (g + mu * v if nesterov else v), v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mu,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("wd,masked", [(0.0, False), (0.01, False), (0.01, True)])
def test_sgd_matches_numpy(dtype, mu, nesterov, wd, masked):
    n = 513
    p, v = vec(n, 0, dtype), vec(n, 1, dtype) if mu else np.empty(0, dtype)
    mask = (np.arange(n) % 3 != 0) if masked else None
    want_p, want_v = p.copy(), v.copy()
    for step in range(3):
        g = vec(n, 10 + step, dtype)
        want_p, want_v = numpy_sgd(want_p, g, want_v, 0.05, mu, nesterov, wd, mask)
        optim.sgd_update(p, read_only(g), v, 0.05, mu, nesterov, wd,
                         None if mask is None else read_only(mask))
    np.testing.assert_allclose(p, want_p, **tol(dtype))
    if mu:
        np.testing.assert_allclose(v, want_v, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_adam_matches_numpy(dtype, decoupled, masked):
    n, lr, b1, b2, eps, wd = 257, 0.01, 0.9, 0.999, 1e-8, 0.05
    p = vec(n, 0, dtype)
    m, v = np.zeros(n, dtype), np.zeros(n, dtype)
    mask = (np.arange(n) % 4 != 0) if masked else None
    d = wd * (np.ones(n) if mask is None else mask.astype(np.float64))
    wp, wm, wv = p.astype(np.float64), np.zeros(n), np.zeros(n)
    for t in range(1, 5):
        g = vec(n, 20 + t, dtype)
        gg = g.astype(np.float64)
        if decoupled:
            wp = wp * (1 - lr * d)
        else:
            gg = gg + d * wp
        wm = b1 * wm + (1 - b1) * gg
        wv = b2 * wv + (1 - b2) * gg ** 2
        wp = wp - lr / (1 - b1 ** t) * wm / (np.sqrt(wv / (1 - b2 ** t)) + eps)
        optim.adam_update(p, read_only(g), m, v, lr, b1, b2, eps, t, wd,
                          None if mask is None else mask.astype(np.uint8), decoupled)
    t32 = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(p, wp, **t32)
    np.testing.assert_allclose(m, wm, **t32)
    np.testing.assert_allclose(v, wv, **t32)


def test_optim_errors():
    p, g = np.zeros(4), np.zeros(4)
    with pytest.raises(ValueError, match="velocity: expected length 4"):
        optim.sgd_update(p, g, np.empty(0), 0.1, 0.9)
    optim.sgd_update(p, g, np.empty(0), 0.1, 0.0)         # empty velocity without momentum
    with pytest.raises(ValueError, match="grad: dtype"):
        optim.sgd_update(p, g.astype(np.float32), np.empty(0), 0.1)
    with pytest.raises(ValueError, match="nesterov"):
        optim.sgd_update(p, g, np.zeros(4), 0.1, 0.0, True)
    with pytest.raises(ValueError, match="decay_mask: expected shape"):
        optim.sgd_update(p, g, np.zeros(4), 0.1, 0.9, False, 0.1, np.ones(3, bool))
    with pytest.raises(ValueError, match="lr"):
        optim.sgd_update(p, g, np.zeros(4), -0.1, 0.9)
    with pytest.raises(ValueError, match="step"):
        optim.adam_update(p, g, np.zeros(4), np.zeros(4), 0.1, step=0)
    with pytest.raises(ValueError, match="beta1"):
        optim.adam_update(p, g, np.zeros(4), np.zeros(4), 0.1, beta1=1.0)
    ro = read_only(p)
    with pytest.raises(ValueError, match="writable"):
        optim.sgd_update(ro, g, np.zeros(4), 0.1, 0.9)


# ---- subnormals: flushed inside the kernel, caller's FP environment untouched ------------
@pytest.mark.parametrize("dtype,tiny", [(np.float32, 3e-39), (np.float64, 3e-309)])
def test_kernels_flush_subnormals_and_restore_fp_state(dtype, tiny):
    n = 64
    info = np.finfo(dtype)
    assert 0 < tiny < info.tiny                     # a subnormal of this dtype
    v = np.full(n, tiny, dtype)
    p, g = np.ones(n, dtype), np.zeros(n, dtype)
    optim.sgd_update(p, g, v, 0.1, 0.5)             # numpy would give v = tiny / 2
    assert (v == 0).all()
    m, s = np.full(n, tiny, dtype), np.full(n, tiny, dtype)
    optim.adam_update(p, g, m, s, 0.1, 0.9, 0.999, 1e-8, 10)
    assert (m == 0).all() and (s == 0).all()
    # the caller's environment is restored: NumPy still produces subnormals
    a = np.full(4, tiny * 4, dtype)
    assert (a / dtype(2) != 0).all()


# FLUSH_TO_ZERO names the mechanism the kernels use on this machine (src_ext/optim.pyx).
FTZ_KINDS = {"x86_64": "x86 MXCSR FTZ|DAZ", "amd64": "x86 MXCSR FTZ|DAZ",
             "aarch64": "aarch64 FPCR.FZ", "arm64": "aarch64 FPCR.FZ"}


def test_flush_to_zero_names_this_machines_mechanism():
    import platform

    expected = FTZ_KINDS.get(platform.machine().lower(), "software flush")
    assert optim.FLUSH_TO_ZERO == expected


@pytest.mark.parametrize("dtype,tiny", [(np.float32, 3e-39), (np.float64, 3e-309)])
def test_subnormal_inputs_follow_the_named_mechanism(dtype, tiny):
    """A subnormal gradient times a huge learning rate is a normal number: with
    denormals-are-zero (x86 DAZ; aarch64 FZ flushes inputs too) the kernel reads
    the gradient as 0 and leaves params alone; a software flush only flushes
    results, so the step is taken."""
    n = 64
    p, g = np.zeros(n, dtype), np.full(n, tiny, dtype)
    lr = 2.0 ** 60
    assert np.finfo(dtype).tiny < lr * tiny            # the exact step is a normal number
    optim.sgd_update(p, g, np.empty(0, dtype), lr)
    if optim.FLUSH_TO_ZERO == "software flush":
        np.testing.assert_allclose(p, -lr * dtype(tiny), rtol=1e-6)
    else:
        assert (p == 0).all(), p[:4]


# ---- convergence: quadratic and Rosenbrock, kernels driven by a Python loop -------------
def quadratic(x):
    a = np.array([1.0, 4.0, 10.0])
    return a * (x - 1.5), np.full(3, 1.5)


def rosenbrock(x):
    gx = -2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2)
    gy = 200 * (x[1] - x[0] ** 2)
    return np.array([gx, gy]), np.ones(2)


def run(kind, grad_fn, x0, lr, steps):
    x = np.array(x0, dtype=np.float64)
    n = x.shape[0]
    v, m, s = np.zeros(n), np.zeros(n), np.zeros(n)
    for t in range(1, steps + 1):
        g, _ = grad_fn(x)
        if kind == "sgd":
            optim.sgd_update(x, g, np.empty(0), lr)
        elif kind == "momentum":
            optim.sgd_update(x, g, v, lr, 0.9)
        elif kind == "nesterov":
            optim.sgd_update(x, g, v, lr, 0.9, True)
        else:
            optim.adam_update(x, g, m, s, lr, 0.9, 0.999, 1e-8, t)
    return x


@pytest.mark.parametrize("kind,lr,steps", [("sgd", 0.15, 300), ("momentum", 0.02, 400),
                                           ("nesterov", 0.02, 400), ("adam", 0.05, 2000)])
def test_optimizers_minimise_a_quadratic(kind, lr, steps):
    x = run(kind, quadratic, [-2.0, 4.0, 0.3], lr, steps)
    np.testing.assert_allclose(x, 1.5, atol=1e-4)


@pytest.mark.parametrize("kind,lr,steps", [("sgd", 1.9e-3, 12000), ("momentum", 1e-3, 3000),
                                           ("nesterov", 1e-3, 3000), ("adam", 2e-2, 4000)])
def test_optimizers_minimise_rosenbrock(kind, lr, steps):
    x = run(kind, rosenbrock, [-1.2, 1.0], lr, steps)
    np.testing.assert_allclose(x, 1.0, atol=1e-3)
