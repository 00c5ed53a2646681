"""scikit-learn compatibility of the estimators, and their behaviour as estimators.

``parametrize_with_checks`` runs every check of ``check_estimator`` on the
four estimators; one is marked as an expected failure, for the MLPs only:
the sample-weight equivalence check, which holds for full-batch training only
and runs in that configuration (``solver="lbfgs"``), as scikit-learn runs it
for its own MLPs. The instances use
``client=False`` (fit in this process): that is exactly the path a default
instance takes on this small data when no Dask client exists, and it keeps the
checks independent of the session's cluster fixture, which other test files
may have made the default client. (scikit-learn itself skips its array-API
checks unless SCIPY_ARRAY_API=1 is set; those show up as skipped.)
"""
import pickle
import warnings

import dask.array as da
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs, make_classification
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

import dmlcore as dml
from dmlcore import estimators as est

ESTIMATORS = [
    est.LinearRegression(client=False),
    est.LogisticRegression(client=False),
    est.MLPClassifier(client=False),
    est.MLPRegressor(client=False),
]


# Mini-batch training puts a repeated row in other batches than its weighted
# original, so weights equal repetitions only for full-batch solvers (as for
# scikit-learn's own MLPs, whose check runs with solver="lbfgs"): the MLPs run
# that check in the lbfgs configuration below.
_MINI_BATCH = {"check_sample_weight_equivalence_on_dense_data":
               "mini-batches: weights equal repeated rows only with solver='lbfgs' (run below)"}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=lambda e: (
    _MINI_BATCH if isinstance(e, (est.MLPClassifier, est.MLPRegressor)) else {}))
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.parametrize("Est", [est.MLPClassifier, est.MLPRegressor])
def test_mlp_lbfgs_weights_equal_repeated_rows_sklearn_check(Est):
    from sklearn.utils.estimator_checks import check_sample_weight_equivalence_on_dense_data

    check_sample_weight_equivalence_on_dense_data(
        Est.__name__, Est(solver="lbfgs", max_iter=100, client=False))


def test_public_names():
    for name in ("LinearRegression", "LogisticRegression", "MLPClassifier", "MLPRegressor"):
        assert getattr(dml, name) is getattr(est, name)


def test_default_instance_runs_in_process_without_client():
    from distributed import default_client

    try:
        default_client()
        pytest.skip("a default Dask client exists in this session")
    except ValueError:
        pass
    X, y = make_blobs(200, n_features=4, centers=3, random_state=0)
    clf = est.LogisticRegression().fit(X, y)
    assert clf.score(X, y) > 0.9
    assert clf.history_.attrs["n_partitions"] == 1


def test_multiclass_labels_are_mapped():
    X, y = make_blobs(300, n_features=5, centers=4, random_state=1)
    labels = np.array(["d", "b", "a", "c"])[y]
    clf = est.LogisticRegression(client=False).fit(X, labels)
    assert list(clf.classes_) == ["a", "b", "c", "d"]
    assert clf.coef_.shape == (4, 5) and clf.intercept_.shape == (4,)
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert (clf.predict(X) == labels).mean() > 0.95


def test_no_intercept_stays_zero():
    X, y = make_classification(200, 6, random_state=0)
    clf = est.LogisticRegression(fit_intercept=False, client=False).fit(X, y)
    assert np.all(clf.intercept_ == 0)
    reg = est.LinearRegression(fit_intercept=False, client=False).fit(X, 3 + X @ np.arange(6))
    assert reg.intercept_ == 0.0
    # without an intercept the constant offset cannot be fitted exactly
    assert reg.score(X, 3 + X @ np.arange(6)) < 0.999


def test_dask_input_matches_numpy(client):
    X, y = make_classification(400, 8, random_state=2)
    Xd, yd = da.from_array(X, chunks=100), da.from_array(y, chunks=100)
    a = est.LogisticRegression(tol=1e-10, client=client).fit(Xd, yd)
    b = est.LogisticRegression(tol=1e-10, client=False).fit(X, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-6, atol=1e-8)
    # full-batch L-BFGS uses the balanced chunks where they lie: one partition each
    assert a.history_.attrs["n_partitions"] == Xd.numblocks[0]
    np.testing.assert_array_equal(a.predict(Xd), b.predict(X))


def test_mlp_partial_fit_continues():
    X, y = make_blobs(300, n_features=6, centers=3, random_state=0)
    clf = est.MLPClassifier(hidden_layer_sizes=(16,), random_state=0, client=False)
    with pytest.raises(ValueError, match="classes"):
        clf.partial_fit(X, y)
    clf.partial_fit(X[:150], y[:150], classes=[0, 1, 2])
    first = clf.loss_curve_[-1]
    for _ in range(5):
        clf.partial_fit(X, y)
    assert clf.n_iter_ == 6 and len(clf.loss_curve_) == 6
    assert clf.loss_curve_[-1] < first
    with pytest.raises(ValueError, match="not in classes_"):
        clf.partial_fit(X, y + 5)


def test_mlp_fit_is_reproducible_and_picklable():
    X, y = make_blobs(200, n_features=3, centers=2, random_state=3)
    a = est.MLPClassifier(hidden_layer_sizes=(8,), random_state=4, client=False).fit(X, y)
    b = clone(a).fit(X, y)
    np.testing.assert_array_equal(a.params_, b.params_)
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(c.predict_proba(X), a.predict_proba(X))
    with pytest.raises(NotFittedError):
        est.MLPClassifier().predict(X)


def test_mlp_early_stopping_on_no_improvement():
    X, y = make_blobs(100, n_features=2, centers=2, random_state=0, cluster_std=0.1)
    clf = est.MLPClassifier(hidden_layer_sizes=(4,), learning_rate="constant", max_iter=500,
                            tol=10.0, n_iter_no_change=2, client=False).fit(X, y)
    # tol=10: every epoch after the first is "no improvement"; as in scikit-learn the
    # run stops when the count exceeds n_iter_no_change: 1 + (2 + 1) epochs
    assert clf.n_iter_ == 4


def test_strategy_instance_and_errors():
    X, y = make_blobs(120, n_features=3, centers=2, random_state=0)
    strategy = dml.SyncSGD(batch_size=None)
    before = dict(vars(strategy))
    clf = est.LogisticRegression(strategy=strategy, client=False).fit(X, y)
    assert clf.score(X, y) > 0.9
    assert vars(strategy) == before                     # the parameter is not mutated
    with pytest.raises(ValueError, match="strategy"):
        est.LogisticRegression(strategy="nope", client=False).fit(X, y)
    with pytest.raises(ValueError, match="penalty"):
        est.LogisticRegression(penalty="l3", client=False).fit(X, y)
    # a mini-batch strategy: the GLM falls back to Adam over max_iter epochs
    mb = est.LogisticRegression(strategy=dml.SyncSGD(batch_size=16), max_iter=30,
                                client=False).fit(X, y)
    assert mb.score(X, y) > 0.9


def test_mlp_with_fedavg_strategy():
    X, y = make_blobs(400, n_features=4, centers=3, random_state=5)
    clf = est.MLPClassifier(hidden_layer_sizes=(16,), strategy="fedavg", max_iter=20,
                            learning_rate_init=0.01, n_partitions=4, random_state=0,
                            client=False).fit(X, y)
    assert type(clf.history_.attrs["strategy"]) is str and "FedAvg" in clf.history_.attrs["strategy"]
    assert clf.score(X, y) > 0.9


def test_mlp_with_parameter_server_strategy(client):
    X, y = make_blobs(400, n_features=4, centers=3, random_state=6)
    clf = est.MLPClassifier(hidden_layer_sizes=(16,), strategy="ps", max_iter=5,
                            learning_rate_init=0.01, random_state=0, client=client).fit(X, y)
    assert "ParameterServer" in clf.history_.attrs["strategy"]
    assert clf.score(X, y) > 0.9


def test_mlp_standardize_trains_on_scaled_inputs_and_folds_back():
    """standardize=True equals training on (X - mean) / std by hand; the fitted
    coefs_/intercepts_ apply to raw inputs (a NumPy forward pass agrees)."""
    X, y = make_classification(600, 10, n_informative=6, n_classes=3, random_state=5)
    X = X * np.linspace(0.01, 100, 10) + np.linspace(-50, 50, 10)      # badly scaled
    X[:, 4] = 7.0                                                       # a constant feature
    kw = dict(hidden_layer_sizes=(12,), max_iter=5, random_state=1, client=False)
    auto = est.MLPClassifier(**kw).fit(X, y)
    mean, std = X.mean(0), X.std(0)
    std[4] = 1.0
    by_hand = est.MLPClassifier(standardize=False, **kw).fit((X - mean) / std, y)
    np.testing.assert_allclose(auto._trained_, by_hand.params_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(auto.predict_proba(X), by_hand.predict_proba((X - mean) / std),
                               rtol=1e-9, atol=1e-12)
    hidden = np.maximum(X @ auto.coefs_[0] + auto.intercepts_[0], 0)
    scores = hidden @ auto.coefs_[1] + auto.intercepts_[1]
    proba = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(auto.predict_proba(X), proba / proba.sum(1, keepdims=True),
                               rtol=1e-9, atol=1e-12)
    # partial_fit keeps the first call's statistics
    more = clone(auto).partial_fit(X[:300], y[:300], classes=[0, 1, 2])
    centre = more._center_.copy()
    more.partial_fit(X[300:] + 1000, y[300:])
    np.testing.assert_array_equal(more._center_, centre)
    with pytest.raises(ValueError, match="standardize"):
        est.MLPClassifier(standardize="yes", client=False).fit(X, y)


# ---------------------------------------------------------------------------
# behaviours users of scikit-learn's estimators expect (issue 10)
# ---------------------------------------------------------------------------
def test_standardization_overflow_has_its_own_error():
    X = np.zeros((40, 3))
    X[:, 1] = np.where(np.arange(40) % 2, 1.5e308, -1.5e308)     # finite, std overflows
    X[:, 2] = np.linspace(0, 1, 40)
    assert np.isfinite(X).all()
    y = np.arange(40) % 2
    with pytest.raises(ValueError, match=r"feature\(s\) \[1\] are finite but too large"):
        est.MLPClassifier(max_iter=1, client=False).fit(X, y)
    with pytest.raises(ValueError, match="too large to standardize"):
        est.MLPRegressor(max_iter=1, client=False).fit(X.astype(np.float64), y * 1.0)


def test_mlp_regressor_predict_keeps_float32():
    from sklearn.neural_network import MLPRegressor as SkMLPRegressor

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4)).astype(np.float32)
    y = (X @ np.arange(1, 5)).astype(np.float32)
    ours = est.MLPRegressor(hidden_layer_sizes=(8,), max_iter=2, client=False).fit(X, y)
    ref = SkMLPRegressor(hidden_layer_sizes=(8,), max_iter=2).fit(X, y)
    assert ours.predict(X).dtype == ref.predict(X).dtype == np.float32
    assert ours.predict(X.astype(np.float64)).dtype == np.float64
    assert ours.predict(da.from_array(X, chunks=50)).compute().dtype == np.float32


@pytest.mark.parametrize("centers", [2, 3])
def test_logistic_n_iter_shaped_like_sklearn(centers):
    from sklearn.linear_model import LogisticRegression as SkLogistic

    X, y = make_blobs(200, n_features=3, centers=centers, random_state=0)
    ours = est.LogisticRegression(client=False).fit(X, y)
    ref = SkLogistic().fit(X, y)
    assert ours.n_iter_.shape == ref.n_iter_.shape == (1,)
    assert ours.n_iter_.dtype == ref.n_iter_.dtype
    assert 1 <= ours.n_iter_[0] <= 100


@pytest.mark.parametrize("Est", ["MLPClassifier", "MLPRegressor"])
def test_warm_start_continues_like_sklearn(Est):
    import sklearn.neural_network as sknn

    X, y = make_classification(300, n_features=6, random_state=0)
    if Est == "MLPRegressor":
        y = X @ np.arange(6.0)
    kw = dict(hidden_layer_sizes=(10,), max_iter=3, warm_start=True, random_state=0)
    ours = getattr(est, Est)(client=False, learning_rate="constant", **kw)
    ref = getattr(sknn, Est)(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (ours, ref):
            model.fit(X, y)
        first = [w.copy() for w in ours.coefs_]
        loss_after_first = ours.loss_curve_[-1]
        for model in (ours, ref):
            model.fit(X, y)
    # scikit-learn's semantics: the second fit continues; loss_curve_ and t_
    # accumulate, n_iter_ counts the epochs of the latest fit
    assert ours.n_iter_ == ref.n_iter_ == 3
    assert len(ours.loss_curve_) == len(ref.loss_curve_) == 6
    assert ours.t_ == ref.t_ == 1800                  # samples seen, 300 x 6
    assert ours.loss_curve_[3] < ours.loss_curve_[0]
    assert ours.loss_curve_[3] <= loss_after_first * 1.05        # no restart from scratch
    assert any(not np.allclose(a, b) for a, b in zip(first, ours.coefs_))
    ours.set_params(warm_start=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.fit(X, y)
    assert ours.n_iter_ == 3 and len(ours.loss_curve_) == 3
    if Est == "MLPClassifier":
        warm = est.MLPClassifier(client=False, **kw).fit(X, y)
        with pytest.raises(ValueError, match="warm_start"):
            warm.fit(X, np.where(y == 1, 2, y))


@pytest.mark.parametrize("solver", ["sgd", "adam"])
def test_partial_fit_continues_the_optimizer_state(solver):
    """One full-batch step per epoch (batch = all rows, one partition): ``fit``
    over 4 epochs and 4 ``partial_fit`` calls take the same steps iff the
    optimizer state (momentum / Adam's moments and step count) carries over."""
    X, y = make_classification(200, n_features=5, random_state=0)
    kw = dict(hidden_layer_sizes=(6,), solver=solver, momentum=0.9, batch_size=200,
              learning_rate="constant", learning_rate_init=0.05, tol=0.0,
              n_iter_no_change=100, random_state=0, client=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = est.MLPClassifier(max_iter=4, **kw).fit(X, y)
    part = est.MLPClassifier(max_iter=4, **kw)
    for _ in range(4):
        part.partial_fit(X, y, classes=[0, 1])
    np.testing.assert_allclose(part.params_, full.params_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(part.loss_curve_, full.loss_curve_, rtol=1e-10)
    assert part._opt_state_.step == 4
    # a fresh optimizer on every call (the old behaviour) takes different steps
    fresh = est.MLPClassifier(max_iter=4, **kw)
    for _ in range(4):
        fresh.__dict__.pop("_opt_state_", None)
        fresh.partial_fit(X, y, classes=[0, 1])
    assert not np.allclose(fresh.params_, full.params_, atol=1e-6)


@pytest.mark.parametrize("Est", ["MLPClassifier", "MLPRegressor"])
def test_early_stopping_like_sklearn(Est):
    import sklearn.neural_network as sknn

    X, y = make_classification(400, n_features=6, flip_y=0.2, random_state=0)
    if Est == "MLPRegressor":
        y = X @ np.arange(6.0)
    kw = dict(hidden_layer_sizes=(10,), max_iter=60, early_stopping=True,
              validation_fraction=0.25, n_iter_no_change=3, tol=1e-3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = getattr(est, Est)(client=False, learning_rate="constant",
                                 learning_rate_init=0.01, **kw).fit(X, y)
        ref = getattr(sknn, Est)(learning_rate_init=0.01, **kw).fit(X, y)
    for model in (ours, ref):
        assert model.best_loss_ is None
        assert len(model.validation_scores_) == model.n_iter_ == len(model.loss_curve_)
        assert model.best_validation_score_ == max(model.validation_scores_)
        # scikit-learn's rule, replayed on the scores: an epoch without a gain of
        # tol over the running best counts; the fit stops once the count
        # exceeds n_iter_no_change
        best, bad, stop = -np.inf, 0, None
        for epoch, score in enumerate(model.validation_scores_, 1):
            bad = bad + 1 if score < best + kw["tol"] else 0
            best = max(best, score)
            if bad > kw["n_iter_no_change"]:
                stop = epoch
                break
        assert stop == (model.n_iter_ if model.n_iter_ < 60 else None)
    assert ours.n_iter_ < 60
    # the kept weights are the best epoch's: its validation score is the best score,
    # close to what scikit-learn reaches on the same problem
    assert ours.best_validation_score_ == pytest.approx(ref.best_validation_score_, abs=0.1)
    assert ours.score(X, y) > 0.6
    plain = getattr(est, Est)(client=False, max_iter=3, hidden_layer_sizes=(4,)).fit(X, y)
    assert plain.validation_scores_ is None
    assert plain.best_loss_ == min(plain.loss_curve_)
    with pytest.raises(ValueError, match="validation_fraction"):
        getattr(est, Est)(client=False, early_stopping=True, validation_fraction=1.5).fit(X, y)
