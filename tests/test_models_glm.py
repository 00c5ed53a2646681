"""Tests of the GLM models (dmlcore.models.glm) on the compiled kernels."""
import numpy as np
import pytest

from dmlcore.models.glm import Linear, Logistic, Softmax
import reference as ref


def models():
    return [Linear(5), Logistic(5), Softmax(5, 3)]


def data(model, n=60, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, model.n_features)).astype(dtype)
    if isinstance(model, Linear):
        y = rng.standard_normal(n).astype(dtype)
    elif isinstance(model, Logistic):
        y = rng.integers(0, 2, n)
    else:
        y = rng.integers(0, model.n_classes, n)
    params = (rng.standard_normal(model.n_params) * 0.5).astype(dtype)
    return X, y, params


def reference(model, X, y, params):
    p = params.astype(np.float64)
    if isinstance(model, Linear):
        return ref.squared(X, y, p)
    if isinstance(model, Logistic):
        return ref.logistic(X, y, p)
    return ref.softmax(X, y, p, model.n_classes)


IDS = ["linear", "logistic", "softmax"]


@pytest.mark.parametrize("model", models(), ids=IDS)
def test_layout(model):
    assert model.layer_names == ["linear"]
    k = model.n_outputs
    assert model.n_params == model.n_features * k + k
    views = model.views(np.arange(model.n_params, dtype=np.float64))["linear"]
    if isinstance(model, Softmax):
        assert views["W"].shape == (5, 3) and views["b"].shape == (3,)
        assert model.n_classes == 3 and model.n_outputs == 3 and model.is_classifier
    else:
        assert views["W"].shape == (5,) and views["b"].shape == (1,)
        assert model.n_outputs == 1
    assert model.is_classifier == (not isinstance(model, Linear))
    if isinstance(model, Logistic):
        assert model.n_classes == 2


@pytest.mark.parametrize("model", models(), ids=IDS)
def test_config_round_trip(model):
    from dmlcore.models.glm import Linear as Li, Logistic as Lo, Softmax as So
    cfg = model.to_config()
    kinds = {"linear": Li, "logistic": Lo, "softmax": So}
    assert cfg["kind"] == IDS[[Li, Lo, So].index(type(model))]
    cls = kinds[cfg.pop("kind")]
    assert cls(**cfg) == model
    assert repr(model).startswith(type(model).__name__ + "(n_features=5")


@pytest.mark.parametrize("model", models(), ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_init(model, dtype):
    a, b, c = model.init(0, dtype=dtype), model.init(0, dtype=dtype), model.init(1, dtype=dtype)
    assert a.dtype == dtype and a.shape == (model.n_params,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)                     # seed-dependent
    v = model.views(a)["linear"]
    assert not v["b"].any()                             # biases start at zero
    assert 0 < np.abs(v["W"]).max() < 0.1               # small weights
    with pytest.raises(ValueError, match="dtype"):
        model.init(0, dtype=np.int32)


@pytest.mark.parametrize("model", models(), ids=IDS)
def test_loss_grad_matches_reference_and_finite_differences(model):
    X, y, params = data(model)
    grad = np.empty_like(params)
    loss = model.loss_grad(params, X, y, grad)
    l_ref, g_ref = reference(model, X, y, params)
    assert loss == pytest.approx(l_ref, rel=1e-12)
    np.testing.assert_allclose(grad, g_ref, rtol=1e-10, atol=1e-10)

    def f(theta):
        return model.loss_grad(theta, X, y, np.empty_like(theta))

    np.testing.assert_allclose(grad, ref.fd_gradient(f, params, h=1e-3), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("model", models(), ids=IDS)
def test_float32(model):
    X, y, params = data(model, n=500)
    g64 = np.empty_like(params)
    l64 = model.loss_grad(params, X, y, g64)
    X32, p32 = X.astype(np.float32), params.astype(np.float32)
    g32 = np.empty_like(p32)
    l32 = model.loss_grad(p32, X32, y, g32)
    assert g32.dtype == np.float32
    assert l32 == pytest.approx(l64, rel=1e-5)
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-4 * np.abs(g64).max())


@pytest.mark.parametrize("model", models(), ids=IDS)
def test_read_only_and_non_contiguous_inputs(model):
    X, y, params = data(model)
    expected = np.empty_like(params)
    l_expected = model.loss_grad(params, X, y, expected)
    # read-only: used in place, no copy needed
    Xr, yr, pr = X.copy(), y.copy(), params.copy()
    for a in (Xr, yr, pr):
        a.setflags(write=False)
    g = np.empty_like(params)
    assert model.loss_grad(pr, Xr, yr, g) == pytest.approx(l_expected, rel=1e-14)
    np.testing.assert_allclose(g, expected, rtol=1e-13)
    # non-contiguous: Fortran order and strided views
    Xf = np.asfortranarray(X)
    wide = np.zeros((X.shape[0] * 2, X.shape[1] + 3))
    wide[::2, 1:-2] = X
    ystrided = np.repeat(y, 2)[::2]
    for Xn in (Xf, wide[::2, 1:-2]):
        g = np.empty_like(params)
        assert model.loss_grad(params, Xn, ystrided, g) == pytest.approx(l_expected, rel=1e-14)
        np.testing.assert_allclose(g, expected, rtol=1e-13)


@pytest.mark.parametrize("model", models(), ids=IDS)
def test_out_contract_and_split(model):
    X, y, params = data(model, n=101)
    grad = np.full_like(params, 3.0)
    loss = model.loss_grad(params, X, y, grad)
    again = grad.copy()
    model.loss_grad(params, X, y, grad)                    # overwritten, not accumulated
    np.testing.assert_array_equal(grad, again)
    view = model.views(grad)["linear"]["W"]
    assert np.shares_memory(view, grad)
    g1, g2 = np.empty_like(params), np.empty_like(params)
    l1 = model.loss_grad(params, X[:40], y[:40], g1)
    l2 = model.loss_grad(params, X[40:], y[40:], g2)
    assert l1 + l2 == pytest.approx(loss, rel=1e-13)
    np.testing.assert_allclose(g1 + g2, grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model", models(), ids=IDS)
def test_trainable(model):
    X, y, params = data(model)
    full = np.empty_like(params)
    loss = model.loss_grad(params, X, y, full)
    g = np.full_like(params, 9.0)
    assert model.loss_grad(params, X, y, g, trainable=[]) == loss
    assert not g.any()
    g = np.empty_like(params)
    model.loss_grad(params, X, y, g, trainable=["linear"])
    np.testing.assert_array_equal(g, full)
    with pytest.raises(ValueError, match="unknown layer"):
        model.loss_grad(params, X, y, g, trainable=["hidden"])


def test_label_conversions():
    m = Logistic(5)
    X, y, params = data(m)
    g_ref = np.empty_like(params)
    loss = m.loss_grad(params, X, y.astype(np.float64), g_ref)
    for yy in (y.astype(bool), y.astype(np.int8), y.astype(np.uint32), y.astype(np.float32)):
        g = np.empty_like(params)
        assert m.loss_grad(params, X, yy, g) == loss
        np.testing.assert_array_equal(g, g_ref)
    s = Softmax(5, 3)
    X, y, params = data(s)
    g_ref = np.empty_like(params)
    loss = s.loss_grad(params, X, y, g_ref)
    for yy in (y.astype(np.int32), y.astype(np.uint8), y.astype(np.float64)):
        g = np.empty_like(params)
        assert s.loss_grad(params, X, yy, g) == loss
        np.testing.assert_array_equal(g, g_ref)
    with pytest.raises(ValueError, match="integers"):
        s.loss_grad(params, X, y + 0.5, g)
    with pytest.raises(ValueError, match="integers"):
        s.loss_grad(params, X, y.astype(str), g)


@pytest.mark.parametrize("model", models(), ids=IDS)
def test_errors(model):
    X, y, params = data(model)
    g = np.empty_like(params)
    with pytest.raises(ValueError, match="dtype mix"):
        model.loss_grad(params, X.astype(np.float32), y, g)
    with pytest.raises(ValueError, match="dtype mix"):
        model.loss_grad(params, X, y, g.astype(np.float32))
    with pytest.raises(ValueError, match="X: expected shape"):
        model.loss_grad(params, X[:, :4], y, g)
    with pytest.raises(ValueError, match="y: expected shape"):
        model.loss_grad(params, X, y[:-1], g)
    with pytest.raises(ValueError, match="params: expected shape"):
        model.loss_grad(params[:-1], X, y, g)
    with pytest.raises(ValueError, match="grad: expected shape"):
        model.loss_grad(params, X, y, g[:-1])
    Xn = X.copy()
    Xn[7, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf in the inputs"):
        model.loss_grad(params, Xn, y, g)
    Xn[7, 2] = -np.inf
    with pytest.raises(ValueError, match="NaN or inf in the inputs"):
        model.loss_grad(params, Xn, y, g)
    if model.is_classifier:
        yb = y.copy()
        yb[3] = model.n_outputs if isinstance(model, Softmax) else 2
        with pytest.raises(ValueError, match="labels must be"):
            model.loss_grad(params, X, yb, g)
        if isinstance(model, Softmax):
            yb[3] = -1
            with pytest.raises(ValueError, match="labels must be"):
                model.loss_grad(params, X, yb, g)


def test_constructor_errors():
    for bad in (0, -1, 2.5, "3", True):
        with pytest.raises(ValueError, match="n_features"):
            Linear(bad)
    with pytest.raises(ValueError, match="n_classes"):
        Softmax(3, 1)
    with pytest.raises(ValueError, match="n_classes"):
        Softmax(3, 2.0)


def test_predict():
    X = np.array([[1.0, 2.0], [-3.0, 0.5], [800.0, -800.0]])
    lin = Linear(2)
    p = np.array([0.5, -1.0, 0.25])
    np.testing.assert_allclose(lin.predict(p, X), X @ p[:2] + p[2])
    assert lin.predict(p, X).shape == (3,)

    log = Logistic(2)
    prob = log.predict(p, X)
    z = X @ p[:2] + p[2]
    assert prob.shape == (3,)
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-np.clip(z, -700, 700))), rtol=1e-14)
    assert np.all((prob >= 0) & (prob <= 1))
    np.testing.assert_allclose(log.decision_function(p, X), z)

    sm = Softmax(2, 3)
    ps = np.arange(sm.n_params, dtype=np.float64) / 10
    P = sm.predict(ps, X)
    assert P.shape == (3, 3)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-14)
    Z = X @ ps[:6].reshape(2, 3) + ps[6:]
    from scipy.special import softmax
    np.testing.assert_allclose(P, softmax(Z, axis=1), rtol=1e-12, atol=1e-300)
    with pytest.raises(ValueError, match="X: expected shape"):
        sm.predict(ps, X[:, :1])
