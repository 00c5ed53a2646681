"""Tests of the compiled loss kernels (dmlcore._ext.loss) against independent
oracles: the NumPy reference (tests/reference.py), 4th-order finite
differences, and NumPy's exp/log/log1p for the vectorised math."""
import numpy as np
import pytest
from scipy.special import expit

from dmlcore._ext import loss as L
import reference as ref

DTYPES = [np.float64, np.float32]
RTOL = {np.float64: 1e-12, np.float32: 2e-5}


@pytest.fixture(params=["auto", "baseline"])
def simd(request):
    """Run a test on the dispatched (AVX2+FMA where available) and the portable path."""
    L._set_simd(request.param)
    yield request.param
    L._set_simd("auto")


def make(n, p, dtype, seed=0, k=None, scale=0.3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)).astype(dtype)
    if k is None:
        coef = (rng.standard_normal(p + 1) * scale).astype(dtype)
    else:
        coef = (rng.standard_normal(p * k + k) * scale).astype(dtype)
    return rng, X, coef


def call(kind, X, y, coef, grad, k=None, **kw):
    if kind == "squared":
        return L.loss_grad_squared(X, y, coef, grad, **kw)
    if kind == "logistic":
        return L.loss_grad_logistic(X, y, coef, grad, **kw)
    return L.loss_grad_softmax(X, y, coef, grad, k, **kw)


def problem(kind, n, p, dtype, seed=0, k=4):
    kk = k if kind == "softmax" else None
    rng, X, coef = make(n, p, dtype, seed, kk)
    if kind == "squared":
        y = rng.standard_normal(n).astype(dtype)
    elif kind == "logistic":
        y = (rng.random(n) < 0.5).astype(dtype)
    else:
        y = rng.integers(0, k, n)
    return X, y, coef, kk


def reference(kind, X, y, coef, k):
    c64 = coef.astype(np.float64)
    if kind == "squared":
        return ref.squared(X, y, c64)
    if kind == "logistic":
        return ref.logistic(X, y, c64)
    return ref.softmax(X, y, c64, k)


KINDS = ["squared", "logistic", "softmax"]
# shapes exercise every tail: rows not a multiple of 4 or of the block, features
# not a multiple of the vector length, tiny and empty-ish inputs
SHAPES = [(1, 1), (3, 2), (5, 7), (37, 13), (257, 33), (1000, 100), (64, 17)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_against_numpy_reference(simd, kind, dtype, shape):
    n, p = shape
    X, y, coef, k = problem(kind, n, p, dtype, seed=n * 7 + p)
    grad = np.full(coef.shape, np.nan, dtype)
    loss = call(kind, X, y, coef, grad, k)
    l_ref, g_ref = reference(kind, X, y, coef, k)
    rtol = RTOL[dtype]
    assert isinstance(loss, float)
    assert loss == pytest.approx(l_ref, rel=rtol, abs=rtol)
    np.testing.assert_allclose(grad, g_ref, rtol=rtol * 10,
                               atol=rtol * 10 * max(1.0, np.abs(g_ref).max()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 3, 9, 13])
def test_softmax_class_counts_and_finite_differences(simd, kind, k):
    """Gradient = 4th-order central differences of the kernel's own loss (float64)."""
    X, y, coef, kk = problem(kind, 23, 6, np.float64, seed=k, k=k)
    grad = np.empty_like(coef)
    call(kind, X, y, coef, grad, kk)

    def f(theta):
        return call(kind, X, y, theta, np.empty_like(theta), kk)

    fd = ref.fd_gradient(f, coef, h=1e-3)
    np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_matches_float64(kind):
    X, y, coef, k = problem(kind, 3001, 50, np.float64, seed=3)
    g64 = np.empty_like(coef)
    l64 = call(kind, X, y, coef, g64, k)
    X32, c32 = X.astype(np.float32), coef.astype(np.float32)
    y32 = y.astype(np.float32) if kind != "softmax" else y
    # the float64 answer on the float32-rounded inputs
    l64b = call(kind, X32.astype(np.float64), y32.astype(np.float64) if kind != "softmax"
                else y, c32.astype(np.float64), g64, k)
    g32 = np.empty_like(c32)
    l32 = call(kind, X32, y32, c32, g32, k)
    assert l32 == pytest.approx(l64b, rel=1e-5)
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-4 * np.abs(g64).max())
    assert l64 == pytest.approx(l64b, rel=1e-3)   # rounding X to float32 moves it little


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_inputs(kind, dtype):
    X, y, coef, k = problem(kind, 50, 9, dtype)
    expected = np.empty_like(coef)
    l_expected = call(kind, X, y, coef, expected, k)
    for a in (X, y, coef):
        a.setflags(write=False)
    grad = np.empty_like(coef)
    assert call(kind, X, y, coef, grad, k) == l_expected
    np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_out_buffer_overwritten_not_accumulated(kind):
    X, y, coef, k = problem(kind, 40, 5, np.float64)
    grad = np.empty_like(coef)
    call(kind, X, y, coef, grad, k)
    first = grad.copy()
    buf = np.full_like(coef, 1e6)
    view = buf[:]
    call(kind, X, y, coef, view, k)
    assert np.shares_memory(view, buf)
    np.testing.assert_array_equal(buf, first)        # written in place, not added to
    call(kind, X, y, coef, buf, k)
    np.testing.assert_array_equal(buf, first)


@pytest.mark.parametrize("kind", KINDS)
def test_compute_grad_false_gives_zero_gradient_same_loss(kind):
    X, y, coef, k = problem(kind, 40, 5, np.float64)
    grad = np.empty_like(coef)
    loss = call(kind, X, y, coef, grad, k)
    grad2 = np.full_like(coef, 7.0)
    assert call(kind, X, y, coef, grad2, k, compute_grad=False) == loss
    assert not grad2.any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_rows_sum_equals_whole(kind, dtype):
    """Kernels return sums: two halves add up to the whole (any reduction tree)."""
    X, y, coef, k = problem(kind, 2001, 21, dtype, seed=5)
    g = np.empty_like(coef)
    loss = call(kind, X, y, coef, g, k)
    cut = 917
    g1, g2 = np.empty_like(coef), np.empty_like(coef)
    l1 = call(kind, X[:cut], y[:cut], coef, g1, k)
    l2 = call(kind, X[cut:], y[cut:], coef, g2, k)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert l1 + l2 == pytest.approx(loss, rel=rtol)
    np.testing.assert_allclose(g1.astype(np.float64) + g2, g, rtol=rtol * 10,
                               atol=rtol * 10 * np.abs(g).max())


def test_many_rows_float32_accumulates_in_float64():
    """Over many rows the float32 kernel keeps a float64-quality total."""
    n, p = 200_000, 4
    rng = np.random.default_rng(0)
    X = rng.random((n, p)).astype(np.float32) + 1.0     # all-positive: errors do not cancel
    y = np.zeros(n, np.float32)
    coef = np.full(p + 1, 0.1, np.float32)
    g = np.empty_like(coef)
    loss = L.loss_grad_squared(X, y, coef, g)
    l_ref, g_ref = ref.squared(X, y, coef.astype(np.float64))
    assert loss == pytest.approx(l_ref, rel=1e-6)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6)


# ---- extreme linear predictors --------------------------------------------------
@pytest.mark.parametrize("dtype,zmax", [(np.float64, 700.0), (np.float32, 85.0)])
def test_logistic_extreme_z(simd, dtype, zmax):
    """|z| up to 700 (double) / 85 (float): stable loss and sigmoid, no overflow."""
    z = np.concatenate([np.linspace(-zmax, zmax, 401), [0.0, 1e-20, -1e-20, 36.0, -36.0,
                                                         zmax, -zmax]])
    n = z.size
    X = np.ones((n, 1), dtype)
    coef = np.array([1.0, 0.0], dtype)
    X[:, 0] = z
    for label in (0.0, 1.0):
        y = np.full(n, label, dtype)
        per_row = []
        for i in range(n):                       # per-row losses, via 1-row calls
            g = np.empty(2, dtype)
            per_row.append((L.loss_grad_logistic(X[i:i + 1], y[i:i + 1], coef, g), g[1]))
        loss = np.array([a for a, _ in per_row])
        r = np.array([b for _, b in per_row])
        z64 = z.astype(dtype).astype(np.float64)
        # cancellation-free forms: log(1 + e^z) - z = log(1 + e^-z), sigmoid(z) - 1 = -sigmoid(-z)
        exact_loss = np.logaddexp(0.0, z64) if label == 0 else np.logaddexp(0.0, -z64)
        exact_r = expit(z64) if label == 0 else -expit(-z64)
        eps = np.finfo(dtype).eps
        np.testing.assert_allclose(loss, exact_loss, rtol=8 * eps, atol=0)
        np.testing.assert_allclose(r, exact_r, rtol=8 * eps, atol=np.finfo(dtype).tiny)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_extreme_logits(simd, dtype):
    big = 700.0 if dtype == np.float64 else 80.0
    X = np.array([[big], [-big], [0.0], [1e-3]], dtype)
    coef = np.array([1.0, -1.0, 0.5, 0.0, 0.0, 0.0], dtype)      # W (1, 3), b (3)
    y = np.array([0, 1, 2, 1])
    g = np.empty_like(coef)
    loss = L.loss_grad_softmax(X, y, coef, g, 3)
    l_ref, g_ref = ref.softmax(X, y, coef.astype(np.float64), 3)
    assert np.isfinite(loss)
    assert loss == pytest.approx(l_ref, rel=20 * float(np.finfo(dtype).eps))
    np.testing.assert_allclose(g, g_ref, rtol=20 * np.finfo(dtype).eps,
                               atol=big * 20 * np.finfo(dtype).eps)


# ---- vectorised math against NumPy ----------------------------------------------
def ulp_error(got, dtype, exact):
    """Error in units of the last place of the correctly rounded result."""
    expected = exact.astype(dtype)
    ok = np.isfinite(expected) & (expected != 0)
    diff = np.abs(got[ok].astype(np.float64) - exact[ok])
    return (diff / np.spacing(np.abs(expected[ok])).astype(np.float64)).max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_vexp_accuracy_and_specials(simd, dtype):
    rng = np.random.default_rng(1)
    lo, hi = (-745.0, 709.0) if dtype == np.float64 else (-103.0, 88.0)
    x = np.concatenate([rng.uniform(lo, hi, 20000), rng.uniform(-2, 2, 5000),
                        np.linspace(-1e-10, 1e-10, 11), [lo, hi]]).astype(dtype)
    got = L.vexp(x)
    with np.errstate(over="ignore"):
        exact = np.exp(x.astype(np.float64))
    assert ulp_error(got, dtype, exact) <= 1.5
    under = (exact < np.finfo(dtype).tiny) & (exact > 0)        # subnormal results
    np.testing.assert_allclose(got[under], exact[under].astype(dtype),
                               rtol=0, atol=float(np.finfo(dtype).smallest_subnormal))
    sp = np.array([np.nan, np.inf, -np.inf, 0.0, 1000.0, -1000.0], dtype)
    out = L.vexp(sp)
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == 0 and out[3] == 1
    assert out[4] == np.inf and out[5] == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_vlog_vlog1p_accuracy_and_specials(simd, dtype):
    rng = np.random.default_rng(2)
    tiny_exp = -300 if dtype == np.float64 else -37
    x = np.concatenate([10.0 ** rng.uniform(tiny_exp, 30, 20000), rng.uniform(0.5, 2, 5000),
                        [1.0, 2.0, np.finfo(dtype).max]]).astype(dtype)
    assert ulp_error(L.vlog(x), dtype, np.log(x.astype(np.float64))) <= 1.5
    x1 = np.concatenate([x, rng.uniform(-0.999, 0, 5000)]).astype(dtype)
    assert ulp_error(L.vlog1p(x1), dtype, np.log1p(x1.astype(np.float64))) <= 1.5
    unit = np.concatenate([rng.uniform(0, 1, 20000), 10.0 ** rng.uniform(tiny_exp, 0, 5000),
                           [0.0, 1.0, 0.41421356, 0.41421357]]).astype(dtype)
    assert ulp_error(L._vlog1p_unit(unit), dtype, np.log1p(unit.astype(np.float64))) <= 1.5
    sub = np.array([np.finfo(dtype).smallest_subnormal * 3], dtype)
    assert L.vlog(sub)[0] == pytest.approx(np.log(sub.astype(np.float64))[0], rel=1e-6)
    sp = np.array([np.nan, np.inf, 0.0, -1.0], dtype)
    lg = L.vlog(sp)
    assert np.isnan(lg[0]) and lg[1] == np.inf and lg[2] == -np.inf and np.isnan(lg[3])
    sp1 = np.array([np.nan, np.inf, -1.0, -2.0, 0.0], dtype)
    l1 = L.vlog1p(sp1)
    assert np.isnan(l1[0]) and l1[1] == np.inf and l1[2] == -np.inf and np.isnan(l1[3])
    assert l1[4] == 0


def test_vmath_out_buffer():
    x = np.linspace(-3, 0, 17)
    out = np.empty_like(x)
    res = L.vexp(x, out)
    assert np.shares_memory(res, out)
    np.testing.assert_allclose(out, np.exp(x), rtol=1e-15)
    with pytest.raises(ValueError, match="out"):
        L.vexp(x, np.empty(3))


# ---- errors -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_shape_errors(kind):
    X, y, coef, k = problem(kind, 10, 3, np.float64)
    g = np.empty_like(coef)
    with pytest.raises(ValueError, match="X must be 2-D"):
        call(kind, X[:, 0], y, coef, g, k)
    with pytest.raises(ValueError, match="y must have shape"):
        call(kind, X, y[:-1], coef, g, k)
    with pytest.raises(ValueError, match="coef must have shape"):
        call(kind, X, y, coef[:-1], g, k)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        call(kind, X, y, coef, g[:-1], k)
    with pytest.raises(ValueError, match="C-contiguous"):
        call(kind, np.asfortranarray(X), y, coef, g, k)
    ro = g.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        call(kind, X, y, coef, ro, k)


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_mix_errors(kind):
    X, y, coef, k = problem(kind, 10, 3, np.float64)
    g = np.empty_like(coef)
    with pytest.raises(ValueError, match="dtype mix"):
        call(kind, X.astype(np.float32), y if kind == "softmax" else y.astype(np.float32),
             coef, g, k)
    with pytest.raises(ValueError, match="dtype mix"):
        call(kind, X, y, coef, g.astype(np.float32), k)
    with pytest.raises(ValueError, match="dtype mix"):
        call(kind, X, y, coef.astype(np.float32), g, k)
    if kind != "softmax":
        with pytest.raises(ValueError, match="dtype mix"):
            call(kind, X, y.astype(np.float32), coef, g, k)
    with pytest.raises(ValueError, match="float32 or float64"):
        call(kind, X.astype(np.int64), y, coef.astype(np.int64), g.astype(np.int64), k)


def test_label_errors():
    X, y, coef, _ = problem("logistic", 50, 3, np.float64)
    g = np.empty_like(coef)
    for bad in (2.0, -1.0, 0.5, np.nan):
        yb = y.copy()
        yb[37] = bad
        with pytest.raises(ValueError, match="labels must be 0 or 1"):
            L.loss_grad_logistic(X, yb, coef, g)
    X, y, coef, k = problem("softmax", 50, 3, np.float64, k=4)
    g = np.empty_like(coef)
    for bad in (-1, 4, 1 << 40):
        yb = y.copy()
        yb[49] = bad
        with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
            L.loss_grad_softmax(X, yb, coef, g, k)
    with pytest.raises(ValueError, match="int64"):
        L.loss_grad_softmax(X, y.astype(np.int32), coef, g, k)


NON_FINITE = [(kind, where) for kind in KINDS
              for where in ["X_nan", "X_inf", "X_neg_inf", "coef_nan", "y_nan"]
              if not (kind == "softmax" and where == "y_nan")]   # int labels hold no NaN


@pytest.mark.parametrize("kind,where", NON_FINITE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_inputs_raise(kind, dtype, where):
    X, y, coef, k = problem(kind, 300, 7, dtype)
    g = np.empty_like(coef)
    if where == "X_nan":
        X[123, 4] = np.nan
    elif where == "X_inf":
        X[299, 0] = np.inf
    elif where == "X_neg_inf":
        X[0, 6] = -np.inf
    elif where == "coef_nan":
        coef[-1] = np.nan
    else:
        y[5] = np.nan
    # a NaN label of the logistic loss is reported as a bad label
    message = "labels must be 0 or 1" if where == "y_nan" and kind == "logistic" else \
        "NaN or inf in the inputs"
    with pytest.raises(ValueError, match=message):
        call(kind, X, y, coef, g, k)


def test_zero_rows():
    for kind in KINDS:
        X, y, coef, k = problem(kind, 0, 3, np.float64)
        g = np.full_like(coef, 5.0)
        assert call(kind, X, y, coef, g, k) == 0.0
        assert not g.any()


def test_simd_info_and_tuning():
    info = L.simd_info()
    assert info["active"] in ("avx2+fma", "baseline")
    old = L._tuning()
    try:
        L._tuning(block_bytes=512, prefetch_blocks=0)     # tiny blocks: many flushes
        X, y, coef, k = problem("softmax", 999, 11, np.float64, k=5)
        g = np.empty_like(coef)
        loss = L.loss_grad_softmax(X, y, coef, g, k)
        l_ref, g_ref = ref.softmax(X, y, coef, k)
        assert loss == pytest.approx(l_ref, rel=1e-12)
        np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-10)
    finally:
        L._tuning(**old)
    with pytest.raises(ValueError):
        L._tuning(block_bytes=1)
