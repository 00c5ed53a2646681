"""The MLP estimators' output kinds and activations against scikit-learn:
multilabel classification (sigmoid outputs), multi-output regression, and the
``identity`` / ``logistic`` activations, in this process and on the cluster."""
import warnings

import dask.array as da
import numpy as np
import pytest
from sklearn.datasets import make_classification, make_multilabel_classification, make_regression
from sklearn.exceptions import DataConversionWarning
from sklearn.linear_model import LinearRegression as SkLinear
from sklearn.metrics import accuracy_score, hamming_loss, r2_score
from sklearn.neural_network import MLPClassifier as SkMLPClassifier
from sklearn.neural_network import MLPRegressor as SkMLPRegressor

from dmlcore import estimators as est


@pytest.fixture(scope="module")
def multilabel():
    X, Y = make_multilabel_classification(n_samples=1500, n_features=20, n_classes=5,
                                          random_state=0)
    return X[:1000], X[1000:], Y[:1000], Y[1000:]


@pytest.fixture(scope="module")
def multioutput():
    X, Y = make_regression(n_samples=1500, n_features=10, n_targets=3, noise=1.0,
                           random_state=0)
    Y = Y / Y.std(axis=0)
    return X[:1000], X[1000:], Y[:1000], Y[1000:]


def _sklearn_multilabel(multilabel):
    Xtr, Xte, Ytr, Yte = multilabel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkMLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=0).fit(Xtr, Ytr)
    return sk.predict(Xte)


def test_multilabel_classifier_like_sklearn(multilabel):
    Xtr, Xte, Ytr, Yte = multilabel
    clf = est.MLPClassifier(hidden_layer_sizes=(32,), max_iter=30, random_state=0,
                            client=False).fit(Xtr, Ytr)
    np.testing.assert_array_equal(clf.classes_, np.arange(5))
    assert clf.n_outputs_ == 5 and clf.model_.output == "sigmoid"
    pred = clf.predict(Xte)
    assert pred.shape == Yte.shape and pred.dtype == np.int64
    assert set(np.unique(pred)) <= {0, 1}
    proba = clf.predict_proba(Xte)
    assert proba.shape == Yte.shape and ((proba >= 0) & (proba <= 1)).all()
    np.testing.assert_array_equal(pred, (proba > 0.5).astype(int))
    assert not np.allclose(proba.sum(axis=1), 1)             # independent labels
    sk = _sklearn_multilabel(multilabel)
    assert hamming_loss(Yte, pred) <= hamming_loss(Yte, sk) + 0.03
    assert accuracy_score(Yte, pred) >= accuracy_score(Yte, sk) - 0.08
    assert clf.score(Xte, Yte) == accuracy_score(Yte, pred)    # subset accuracy, as sklearn


def test_multilabel_on_the_cluster_with_dask_input(client, multilabel):
    Xtr, Xte, Ytr, Yte = multilabel
    clf = est.MLPClassifier(hidden_layer_sizes=(32,), max_iter=30, random_state=0,
                            client=client).fit(da.from_array(Xtr, chunks=250), Ytr)
    assert clf.history_.attrs["n_partitions"] > 1
    pred = clf.predict(da.from_array(Xte, chunks=200))
    assert isinstance(pred, da.Array)
    pred = pred.compute()
    assert pred.shape == Yte.shape
    assert hamming_loss(Yte, pred) <= hamming_loss(Yte, _sklearn_multilabel(multilabel)) + 0.03


def test_multilabel_errors(multilabel):
    Xtr, _, Ytr, _ = multilabel
    with pytest.raises(ValueError, match="multilabel indicator"):
        est.MLPClassifier(client=False, max_iter=1).fit(Xtr, Ytr + Ytr[:, :1])   # 0/1/2
    clf = est.MLPClassifier(client=False, max_iter=1).fit(Xtr, Ytr)
    with pytest.raises(ValueError, match="multilabel indicator matrix, got 1-D"):
        clf.partial_fit(Xtr, Ytr[:, 0])
    with pytest.raises(ValueError, match="y has 4 output"):
        clf.partial_fit(Xtr, Ytr[:, :4])
    clf.partial_fit(Xtr, Ytr)                                # same labels: continues


def test_multioutput_regressor_like_sklearn(multioutput):
    Xtr, Xte, Ytr, Yte = multioutput
    reg = est.MLPRegressor(hidden_layer_sizes=(32,), max_iter=50, learning_rate_init=0.01,
                           random_state=0, client=False).fit(Xtr, Ytr)
    assert reg.n_outputs_ == 3
    pred = reg.predict(Xte)
    assert pred.shape == (500, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkMLPRegressor(hidden_layer_sizes=(32,), max_iter=500, random_state=0).fit(Xtr, Ytr)
    assert r2_score(Yte, pred) >= min(0.95, r2_score(Yte, sk.predict(Xte)) - 0.02)
    # each column is fitted, not only their average
    assert min(r2_score(Yte[:, j], pred[:, j]) for j in range(3)) > 0.9


def test_multioutput_regressor_on_the_cluster(client, multioutput):
    Xtr, Xte, Ytr, Yte = multioutput
    reg = est.MLPRegressor(hidden_layer_sizes=(32,), max_iter=50, learning_rate_init=0.01,
                           random_state=0, client=client).fit(da.from_array(Xtr, chunks=250),
                                                              da.from_array(Ytr, chunks=250))
    assert reg.history_.attrs["n_partitions"] > 1
    pred = reg.predict(da.from_array(Xte, chunks=250)).compute()
    assert pred.shape == (500, 3) and r2_score(Yte, pred) > 0.95


def test_column_target_is_raveled_like_sklearn(multioutput):
    Xtr, Xte, Ytr, _ = multioutput
    with pytest.warns(DataConversionWarning):
        reg = est.MLPRegressor(max_iter=2, random_state=0, client=False).fit(Xtr, Ytr[:, :1])
    assert reg.predict(Xte).shape == (500,) and reg.n_outputs_ == 1


def test_identity_activation_is_a_linear_model():
    # a network with identity hidden units is linear in X: full-batch L-BFGS
    # must reach ordinary least squares' training fit
    X, y = make_regression(n_samples=400, n_features=6, noise=5.0, random_state=3)
    y = y / y.std()
    reg = est.MLPRegressor(hidden_layer_sizes=(8,), activation="identity", solver="lbfgs",
                           alpha=0.0, max_iter=500, tol=1e-12, random_state=0,
                           client=False).fit(X, y)
    ols = SkLinear().fit(X, y)
    mse = np.mean((reg.predict(X) - y) ** 2)
    mse_ols = np.mean((ols.predict(X) - y) ** 2)
    assert mse == pytest.approx(mse_ols, rel=1e-4)
    np.testing.assert_allclose(reg.predict(X), ols.predict(X), atol=1e-3)


def test_logistic_activation_like_sklearn():
    X, y = make_classification(n_samples=1200, n_features=12, n_informative=6, n_classes=3,
                               random_state=1)
    Xtr, Xte, ytr, yte = X[:900], X[900:], y[:900], y[900:]
    clf = est.MLPClassifier(hidden_layer_sizes=(32,), activation="logistic", max_iter=60,
                            learning_rate_init=0.01, random_state=0, client=False).fit(Xtr, ytr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkMLPClassifier(hidden_layer_sizes=(32,), activation="logistic", max_iter=500,
                             random_state=0).fit(Xtr, ytr)
    assert clf.model_.activation == "logistic"
    assert clf.score(Xte, yte) >= sk.score(Xte, yte) - 0.05
    with pytest.raises(ValueError, match="activation must be"):
        est.MLPClassifier(activation="softplus", client=False).fit(Xtr, ytr)
