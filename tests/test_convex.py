"""Convex estimators reach the optimum of scikit-learn / NumPy, whatever the partitioning.

Objectives are computed by the same formulas here for both sides:
  logistic: C * sum_i loss_i + 1/2 ||W||^2   (loss: log-loss or multinomial cross-entropy)
  least squares / ridge: ||y - X w - b||^2 + alpha ||w||^2
and the relative gap (ours - reference) / reference must be <= 1e-6 (ours may be lower).
"""
import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.linear_model import LogisticRegression as SkLogistic
from sklearn.linear_model import Ridge

from dmlcore import estimators as est

GAP = 1e-6


def _classification(n, p, k, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * rng.uniform(0.5, 2.0, p) + rng.normal(0, 0.5, p)
    W = rng.standard_normal((p, k))
    logits = X @ W + rng.normal(0, 1, k)
    y = np.array([rng.choice(k, p=np.exp(r - logsumexp(r))) for r in logits])
    return X, y


def _logistic_objective(X, y, coef, intercept, C, classes):
    scores = X @ coef.T + intercept
    codes = np.searchsorted(classes, y)
    if scores.shape[1] == 1:                      # binary: one coefficient vector
        z = scores[:, 0]
        loss = np.logaddexp(0, z) - (codes == 1) * z
    else:
        loss = logsumexp(scores, axis=1) - scores[np.arange(len(y)), codes]
    return C * loss.sum() + 0.5 * float(np.sum(coef * coef))


def _gap(ours, ref):
    return (ours - ref) / abs(ref)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("C", [0.01, 1.0, 100.0])
def test_logistic_reaches_sklearn_optimum(k, C):
    X, y = _classification(600, 8, k, seed=k)
    y = np.array([-3, 7, 11, 20])[y]                # arbitrary label values
    ref = SkLogistic(C=C, tol=1e-12, max_iter=10000).fit(X, y)
    ours = est.LogisticRegression(C=C, tol=1e-10, max_iter=1000, client=False).fit(X, y)
    np.testing.assert_array_equal(ours.classes_, ref.classes_)
    assert ours.coef_.shape == ref.coef_.shape
    f_ref = _logistic_objective(X, y, ref.coef_, ref.intercept_, C, ref.classes_)
    f_ours = _logistic_objective(X, y, ours.coef_, ours.intercept_, C, ours.classes_)
    assert _gap(f_ours, f_ref) <= GAP, (f_ours, f_ref)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-4)


def test_logistic_without_intercept():
    X, y = _classification(500, 5, 3, seed=7)
    C = 0.5
    ref = SkLogistic(C=C, fit_intercept=False, tol=1e-12, max_iter=10000).fit(X, y)
    ours = est.LogisticRegression(C=C, fit_intercept=False, tol=1e-10, max_iter=1000,
                                  client=False).fit(X, y)
    assert np.all(ours.intercept_ == 0)
    zero = np.zeros(3)
    f_ref = _logistic_objective(X, y, ref.coef_, zero, C, ref.classes_)
    f_ours = _logistic_objective(X, y, ours.coef_, zero, C, ours.classes_)
    assert _gap(f_ours, f_ref) <= GAP


def _regression(n, p, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * rng.uniform(0.5, 3.0, p) + rng.normal(0, 1, p)
    y = X @ rng.standard_normal(p) + 4.0 + rng.normal(0, 0.5, n)
    return X, y


def _ls_objective(X, y, coef, intercept, alpha):
    r = y - X @ coef - intercept
    return float(r @ r) + alpha * float(coef @ coef)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_least_squares_reaches_lstsq(fit_intercept):
    X, y = _regression(800, 10, seed=1)
    A = np.column_stack([X, np.ones(len(X))]) if fit_intercept else X
    sol = np.linalg.lstsq(A, y, rcond=None)[0]
    coef, intercept = (sol[:-1], sol[-1]) if fit_intercept else (sol, 0.0)
    ours = est.LinearRegression(fit_intercept=fit_intercept, tol=1e-10, max_iter=1000,
                                client=False).fit(X, y)
    f_ref = _ls_objective(X, y, coef, intercept, 0.0)
    f_ours = _ls_objective(X, y, ours.coef_, ours.intercept_, 0.0)
    assert _gap(f_ours, f_ref) <= GAP, (f_ours, f_ref)


@pytest.mark.parametrize("alpha", [0.1, 10.0, 1000.0])
def test_ridge_reaches_sklearn_ridge(alpha):
    X, y = _regression(500, 6, seed=2)
    ref = Ridge(alpha=alpha, solver="cholesky").fit(X, y)
    ours = est.LinearRegression(alpha=alpha, tol=1e-10, max_iter=1000, client=False).fit(X, y)
    f_ref = _ls_objective(X, y, ref.coef_, ref.intercept_, alpha)
    f_ours = _ls_objective(X, y, ours.coef_, ours.intercept_, alpha)
    assert _gap(f_ours, f_ref) <= GAP, (f_ours, f_ref)


def _params(e):
    return np.concatenate([np.ravel(e.coef_), np.ravel(e.intercept_)])


@pytest.mark.parametrize("make", ["binary", "multinomial", "ridge"])
def test_chunk_invariance(make):
    """1, 3 and 16 partitions give the same L-BFGS solution (relative 1e-9)."""
    if make == "ridge":
        X, y = _regression(1000, 7, seed=3)
        build = lambda n: est.LinearRegression(alpha=1.0, tol=1e-12, max_iter=2000,  # noqa: E731
                                               n_partitions=n, client=False)
    else:
        X, y = _classification(1000, 7, 2 if make == "binary" else 5, seed=4)
        build = lambda n: est.LogisticRegression(C=1.0, tol=1e-12, max_iter=2000,  # noqa: E731
                                                 n_partitions=n, client=False)
    fits = {n: build(n).fit(X, y) for n in (1, 3, 16)}
    for n in (3, 16):
        assert fits[n].history_.attrs["n_partitions"] == n
    base = _params(fits[1])
    for n in (3, 16):
        rel = np.linalg.norm(_params(fits[n]) - base) / np.linalg.norm(base)
        assert rel <= 1e-9, (n, rel)


def test_cluster_path_matches_in_process(client):
    X, y = _classification(1200, 6, 3, seed=5)
    remote = est.LogisticRegression(C=2.0, tol=1e-12, max_iter=2000, n_partitions=16,
                                    client=client).fit(X, y)
    local = est.LogisticRegression(C=2.0, tol=1e-12, max_iter=2000, n_partitions=1,
                                   client=False).fit(X, y)
    assert remote.history_.attrs["n_partitions"] == 16
    rel = np.linalg.norm(_params(remote) - _params(local)) / np.linalg.norm(_params(local))
    assert rel <= 1e-9, rel
    ref = SkLogistic(C=2.0, tol=1e-12, max_iter=10000).fit(X, y)
    f_ref = _logistic_objective(X, y, ref.coef_, ref.intercept_, 2.0, ref.classes_)
    f_remote = _logistic_objective(X, y, remote.coef_, remote.intercept_, 2.0, remote.classes_)
    assert _gap(f_remote, f_ref) <= GAP
