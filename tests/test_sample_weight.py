"""Row weights through partitioning, every strategy and the estimators, against
independent truths: scikit-learn's weighted solutions, a weight of k equal to
the row repeated k times, zero weights equal to removing the rows, and the
same weighted fit in this process and on the cluster."""
import numpy as np
import pytest
import sklearn.linear_model as sk
from sklearn.datasets import make_blobs, make_classification, make_regression

import dmlcore as dml
from dmlcore import estimators as est


def _counts(n, seed=1):
    return np.random.default_rng(seed).integers(0, 4, size=n)      # zeros included


# ---- partitioning ------------------------------------------------------------
def test_weights_travel_with_their_rows(client):
    X = np.arange(120, dtype=np.float64).reshape(60, 2)
    y = np.arange(60) % 3
    w = np.linspace(0.5, 2.0, 60)
    data = dml.partition(X, y, 4, seed=3, client=client, sample_weight=w)
    assert data.is_weighted and data.w.dtype == np.float64
    for p, (xf, yf, wf) in enumerate(data.partition_futures()):
        Xp, wp = xf.result(), wf.result()
        rows = (Xp[:, 0] / 2).astype(int)                   # the source row of each row
        np.testing.assert_array_equal(rows, data.source_rows[p])
        np.testing.assert_array_equal(wp, w[rows])
    report = data.skew_report()
    np.testing.assert_allclose(report["weight"].values,
                               [w[r].sum() for r in data.source_rows])
    moved = data.placed(False)                              # back into this process
    np.testing.assert_array_equal(np.concatenate([b.compute() for b in moved.w_blocks()]),
                                  np.concatenate([w[r] for r in data.source_rows]))


@pytest.mark.parametrize("bad, match", [
    (np.ones(59), "one weight per row"),
    (np.r_[np.ones(59), -1.0], ">= 0"),
    (np.r_[np.ones(59), np.nan], "NaN"),
    (np.zeros(60), "sum to 0"),
])
def test_bad_weights_are_refused_at_partitioning(bad, match):
    X, y = np.ones((60, 2)), np.arange(60) % 2
    with pytest.raises(ValueError, match=match):
        dml.partition(X, y, 2, client=False, sample_weight=bad)


# ---- estimators against scikit-learn ----------------------------------------------
def _logistic_problem(k=3, n=300):
    X, y = make_blobs(n, n_features=5, centers=k, cluster_std=3.0, random_state=4)
    return X, y


@pytest.mark.parametrize("k", [2, 3])
def test_logistic_weights_match_sklearn_and_repeated_rows(k):
    X, y = _logistic_problem(k)
    w = _counts(len(y)).astype(float)
    ours = est.LogisticRegression(C=0.5, tol=1e-10, max_iter=500, client=False)
    ours.fit(X, y, sample_weight=w)
    ref = sk.LogisticRegression(C=0.5, tol=1e-12, max_iter=5000).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=1e-4, atol=1e-5)
    rep = np.repeat(np.arange(len(y)), w.astype(int))
    repeated = est.LogisticRegression(C=0.5, tol=1e-10, max_iter=500, client=False)
    repeated.fit(X[rep], y[rep])
    np.testing.assert_allclose(ours.coef_, repeated.coef_, rtol=1e-5, atol=1e-6)


def test_zero_weights_remove_rows_even_when_their_labels_are_wrong():
    X, y = _logistic_problem(2)
    keep = np.arange(len(y)) % 4 != 0
    y_bad = y.copy()
    y_bad[~keep] = 1 - y_bad[~keep]                       # these rows would pull hard
    ours = est.LogisticRegression(tol=1e-10, max_iter=500, client=False)
    ours.fit(X, y_bad, sample_weight=keep.astype(float))
    kept = est.LogisticRegression(tol=1e-10, max_iter=500, client=False).fit(X[keep], y[keep])
    np.testing.assert_allclose(ours.coef_, kept.coef_, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("class_weight", ["balanced", {0: 1.0, 1: 5.0, 2: 0.5}])
def test_class_weight_matches_sklearn(class_weight):
    X, y = make_classification(400, 6, n_informative=4, n_classes=3,
                               weights=[0.7, 0.2, 0.1], random_state=2)
    w = np.random.default_rng(0).uniform(0.5, 2.0, len(y))
    ours = est.LogisticRegression(class_weight=class_weight, tol=1e-10, max_iter=500,
                                  client=False).fit(X, y, sample_weight=w)
    ref = sk.LogisticRegression(class_weight=class_weight, tol=1e-12, max_iter=5000)
    ref.fit(X, y, sample_weight=w)
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-4, atol=1e-5)


def test_linear_regression_weights_match_sklearn_ridge():
    X, y = make_regression(300, 6, noise=5.0, random_state=3)
    w = np.random.default_rng(1).uniform(0.0, 3.0, len(y))
    ours = est.LinearRegression(alpha=2.0, tol=1e-12, max_iter=500, client=False)
    ours.fit(X, y, sample_weight=w)
    ref = sk.Ridge(alpha=2.0).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-6)
    assert ours.intercept_ == pytest.approx(ref.intercept_, rel=1e-6, abs=1e-6)


def test_mlp_lbfgs_weight_two_equals_the_row_twice():
    X, y = make_blobs(200, n_features=4, centers=3, random_state=7)
    w = _counts(len(y), seed=3)
    kw = dict(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=15, random_state=0,
              client=False, standardize=False)
    weighted = est.MLPClassifier(**kw).fit(X, y, sample_weight=w.astype(float))
    rep = np.repeat(np.arange(len(y)), w)
    repeated = est.MLPClassifier(**kw).fit(X[rep], y[rep])
    for a, b in zip(weighted.coefs_, repeated.coefs_):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_mlp_zero_weights_ignore_rows_in_minibatch_training():
    """Mini-batch Adam: the rows of weight 0 carry wrong labels; the weighted
    fit scores like one that never saw them."""
    X, y = make_blobs(600, n_features=4, centers=2, cluster_std=1.0, random_state=8)
    bad = np.arange(len(y)) % 2 == 0
    y_bad = np.where(bad, 1 - y, y)
    kw = dict(hidden_layer_sizes=(8,), max_iter=30, learning_rate_init=0.01,
              random_state=0, client=False)
    weighted = est.MLPClassifier(**kw).fit(X, y_bad, sample_weight=(~bad).astype(float))
    unweighted = est.MLPClassifier(**kw).fit(X, y_bad)
    assert weighted.score(X, y) > 0.97
    assert unweighted.score(X, y) < 0.8                    # the wrong labels do matter


def test_mlp_regressor_partial_fit_takes_weights():
    X, y = make_regression(200, 4, noise=1.0, random_state=0)
    reg = est.MLPRegressor(hidden_layer_sizes=(8,), client=False, random_state=0)
    reg.partial_fit(X, y, sample_weight=np.full(len(y), 2.0))
    assert np.isfinite(reg.loss_)


def test_estimator_weight_errors_are_clear():
    X, y = _logistic_problem(2, n=40)
    with pytest.raises(ValueError, match="sample_weight"):
        est.LogisticRegression(client=False).fit(X, y, sample_weight=np.ones(39))
    with pytest.raises(ValueError, match=">= 0"):
        est.LogisticRegression(client=False).fit(X, y, sample_weight=-np.ones(40))


# ---- the cluster paths: the same weighted fit everywhere --------------------------
def _weighted_data(n=400):
    X, y = make_blobs(n, n_features=6, centers=3, random_state=9)
    return X, y, np.random.default_rng(5).uniform(0.0, 2.0, n)


@pytest.mark.parametrize("apply_on", ["driver", "workers"])
def test_weighted_sync_fit_on_the_cluster_equals_in_process(client, apply_on):
    X, y, w = _weighted_data()
    model = dml.models.Softmax(6, 3)
    results = []
    for where in (client, False):
        data = dml.partition(X, y, 4, seed=0, client=where, sample_weight=w)
        res = dml.fit(model, data, dml.SyncSGD(batch_size=32, apply_on=apply_on),
                      dml.optim.SGD(lr=0.05), steps=40, client=where, seed=1,
                      progress=False)
        results.append(np.asarray(res.params))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12, atol=1e-12)
    plain = dml.fit(model, dml.partition(X, y, 4, seed=0, client=client),
                    dml.SyncSGD(batch_size=32, apply_on=apply_on), dml.optim.SGD(lr=0.05),
                    steps=40, client=client, seed=1, progress=False)
    assert np.abs(np.asarray(plain.params) - results[0]).max() > 1e-3   # the weights count


def test_weighted_lbfgs_on_the_cluster_matches_sklearn(client):
    X, y, w = _weighted_data()
    ours = est.LogisticRegression(tol=1e-10, max_iter=500, client=client)
    ours.fit(X, y, sample_weight=w)
    ref = sk.LogisticRegression(tol=1e-12, max_iter=5000).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-4, atol=1e-5)


def test_weighted_fedavg_and_parameter_server_ignore_zero_weight_rows(client):
    X, y = make_blobs(800, n_features=4, centers=2, random_state=11)
    bad = np.arange(len(y)) % 2 == 0
    y_bad = np.where(bad, 1 - y, y)
    for strategy in ("fedavg", "ps"):
        clf = est.MLPClassifier(hidden_layer_sizes=(8,), strategy=strategy, max_iter=10,
                                learning_rate_init=0.01, random_state=0, client=client,
                                n_partitions=4)
        clf.fit(X, y_bad, sample_weight=(~bad).astype(float))
        assert clf.score(X, y) > 0.95, strategy
