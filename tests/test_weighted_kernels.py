"""Row weights in every loss+gradient kernel (GLMs and MLPs, float32 and
float64), against independent truths: a row of integer weight k equals that
row repeated k times, a zero weight equals removing the row, real weights
match the NumPy reference of the weighted sums, and unit weights give the
unweighted kernel's bits."""
import numpy as np
import pytest

from dmlcore._ext import loss as kernels
from dmlcore.models.glm import Linear, Logistic, Softmax
from dmlcore.models.mlp import MLP

import reference
import reference_mlp

N, P, K = 37, 6, 4


def _models():
    return [Linear(P), Logistic(P), Softmax(P, K),
            MLP([P, 5, K], activation="tanh", output="softmax"),
            MLP([P, 5, 3], activation="relu", output="linear"),
            MLP([P, 5, 3], activation="logistic", output="sigmoid")]


def _labels(model, rng, n):
    if isinstance(model, MLP):
        k = model.sizes[-1]
        if model.output == "softmax":
            return rng.integers(0, k, size=n)
        if model.output == "sigmoid":
            return rng.integers(0, 2, size=(n, k)).astype(np.float64)
        return rng.normal(size=(n, k))
    if isinstance(model, Softmax):
        return rng.integers(0, K, size=n)
    if isinstance(model, Logistic):
        return rng.integers(0, 2, size=n).astype(np.float64)
    return rng.normal(size=n)


def _problem(model, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, P)).astype(dtype)
    y = _labels(model, rng, N)
    if y.dtype.kind == "f":
        y = y.astype(dtype)
    params = model.init(seed=seed, dtype=dtype)
    params += rng.normal(scale=0.3, size=params.shape).astype(dtype)
    return X, y, params


def _loss_grad(model, params, X, y, w=None):
    grad = np.empty_like(params)
    loss = model.loss_grad(params, X, y, grad, sample_weight=w)
    return loss, grad


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("model", _models(), ids=repr)
def test_integer_weights_equal_repeated_rows(model, dtype):
    X, y, params = _problem(model, dtype)
    counts = np.random.default_rng(1).integers(0, 4, size=N)     # zeros included
    loss_w, grad_w = _loss_grad(model, params, X, y, counts.astype(dtype))
    rep = np.repeat(np.arange(N), counts)
    loss_r, grad_r = _loss_grad(model, params, X[rep], y[rep])
    tol = 1e-12 if dtype == np.float64 else 2e-5
    assert loss_w == pytest.approx(loss_r, rel=tol)
    np.testing.assert_allclose(grad_w, grad_r, rtol=tol * 10, atol=tol * 10 * np.abs(grad_r).max())


@pytest.mark.parametrize("model", _models(), ids=repr)
def test_zero_weight_rows_are_removed_even_when_their_loss_is_huge(model):
    X, y, params = _problem(model, np.float64)
    keep = np.arange(N) % 3 != 0
    X = X.copy()
    X[~keep] *= 50.0                         # these rows would dominate the sums
    w = keep.astype(np.float64)
    loss_w, grad_w = _loss_grad(model, params, X, y, w)
    loss_k, grad_k = _loss_grad(model, params, X[keep], y[keep])
    assert loss_w == pytest.approx(loss_k, rel=1e-12)
    np.testing.assert_allclose(grad_w, grad_k, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("model", _models(), ids=repr)
def test_unit_weights_give_the_unweighted_bits(model, dtype):
    X, y, params = _problem(model, dtype, seed=3)
    loss_1, grad_1 = _loss_grad(model, params, X, y, np.ones(N, dtype))
    loss_0, grad_0 = _loss_grad(model, params, X, y)
    assert loss_1 == loss_0
    assert np.array_equal(grad_1, grad_0)


def _reference_weighted(model, params, X, y, w):
    """sum_i w_i loss_i and sum_i w_i grad_i from the NumPy references, row by row."""
    loss, grad = 0.0, np.zeros_like(params)
    for i in range(X.shape[0]):
        xi, yi = X[i:i + 1], y[i:i + 1]
        if isinstance(model, MLP):
            li, gi = reference_mlp.loss_grad(params, model.sizes, xi, yi,
                                             activation=model.activation, output=model.output)
        elif isinstance(model, Softmax):
            li, gi = reference.softmax(xi, yi, params, K)
        elif isinstance(model, Logistic):
            li, gi = reference.logistic(xi, yi, params)
        else:
            li, gi = reference.squared(xi, yi, params)
        loss += w[i] * li
        grad += w[i] * gi
    return loss, grad


@pytest.mark.parametrize("model", _models(), ids=repr)
def test_real_weights_match_the_numpy_reference(model):
    X, y, params = _problem(model, np.float64, seed=5)
    w = np.random.default_rng(2).uniform(0.0, 3.0, size=N)
    loss, grad = _loss_grad(model, params, X, y, w)
    loss_ref, grad_ref = _reference_weighted(model, params, X, y, w)
    assert loss == pytest.approx(loss_ref, rel=1e-11)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("model", _models(), ids=repr)
def test_bad_weights_get_one_clear_error(model):
    X, y, params = _problem(model, np.float64)
    grad = np.empty_like(params)
    with pytest.raises(ValueError, match="sample_weight"):
        model.loss_grad(params, X, y, grad, sample_weight=np.ones(N - 1))
    w = np.ones(N)
    w[4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.loss_grad(params, X, y, grad, sample_weight=w)


def test_kernel_rejects_a_weight_of_another_dtype():
    X = np.ones((3, 2))
    coef, grad = np.zeros(3), np.zeros(3)
    with pytest.raises(ValueError, match="sample_weight"):
        kernels.loss_grad_squared(X, np.zeros(3), coef, grad,
                                  sample_weight=np.ones(3, np.float32))
