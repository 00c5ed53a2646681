"""L1 and elastic-net GLMs (OWL-QN over the tree-reduced gradient) against
scikit-learn's solvers run to tight tolerances: the same objective to 1e-6
relative and the same set of exact zeros in ``coef_``."""
import json
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import logsumexp
from sklearn.linear_model import ElasticNet, Lasso
from sklearn.linear_model import LogisticRegression as SkLogistic

import dmlcore as dml
from dmlcore import cli


def classification(n=400, d=30, k=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    W = np.zeros((d, k))
    W[:5] = 2 * rng.normal(size=(5, k))
    y = np.argmax(X @ W + rng.gumbel(size=(n, k)), axis=1) if k > 2 else \
        (rng.random(n) < 1 / (1 + np.exp(-(X @ W[:, 0] + 0.5)))).astype(np.int64)
    return X, y


def logistic_objective(coef, intercept, X, y, C, ratio, w=None):
    """scikit-learn's: C sum_i w_i loss_i + r ||W||_1 + (1 - r)/2 ||W||^2."""
    w = np.ones(len(y)) if w is None else w
    Z = X @ coef.T + intercept
    if Z.shape[1] == 1:
        z = Z[:, 0]
        loss = np.logaddexp(0, z) - y * z
    else:
        loss = logsumexp(Z, axis=1) - Z[np.arange(len(y)), y]
    return C * (w @ loss) + ratio * np.abs(coef).sum() + (1 - ratio) / 2 * (coef * coef).sum()


def saga(X, y, C, ratio, w=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # penalty is deprecated there; ConvergenceWarning
        return SkLogistic(C=C, l1_ratio=ratio, solver="saga", tol=1e-12,
                          max_iter=200_000).fit(X, y, sample_weight=w)


def ours(penalty, ratio=None, C=0.05, **kw):
    return dml.LogisticRegression(C=C, penalty=penalty, l1_ratio=ratio, tol=1e-10,
                                  max_iter=1000, client=kw.pop("client", False), **kw)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("penalty,ratio", [("l1", None), ("elasticnet", 0.5)])
def test_logistic_reaches_sagas_objective_and_zeros(k, penalty, ratio):
    X, y = classification(k=k)
    C, r = 0.05, 1.0 if penalty == "l1" else ratio
    sk = saga(X, y, C, r)
    est = ours(penalty, ratio, C).fit(X, y)
    f_sk = logistic_objective(sk.coef_, sk.intercept_, X, y, C, r)
    f_us = logistic_objective(est.coef_, est.intercept_, X, y, C, r)
    assert f_us <= f_sk * (1 + 1e-6), (f_us, f_sk)
    assert f_us >= f_sk * (1 - 1e-6), (f_us, f_sk)
    assert 0 < (est.coef_ == 0).sum() < est.coef_.size
    np.testing.assert_array_equal(est.coef_ == 0, sk.coef_ == 0)


def test_l1_ratio_alone_selects_the_mix_as_scikit_learn_does():
    X, y = classification()
    a = ours("l2", 1.0).fit(X, y)
    b = ours("l1").fit(X, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(a.coef_ == 0, b.coef_ == 0)
    assert (ours("l2").fit(X, y).coef_ != 0).all()             # plain L2: no zeros


def test_csr_input_and_sample_weights():
    X, y = classification(n=300, d=40, seed=1)
    X[np.abs(X) < 1.0] = 0.0                                    # ~68% zeros
    dense = ours("l1").fit(X, y)
    sparse = ours("l1").fit(sp.csr_matrix(X), y)
    np.testing.assert_allclose(sparse.coef_, dense.coef_, rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(sparse.coef_ == 0, dense.coef_ == 0)
    # a weight of 2 is the row twice; weight 0 removes it
    w = np.ones(len(y))
    w[:50], w[50:80] = 2.0, 0.0
    weighted = ours("l1").fit(X, y, sample_weight=w)
    rows = np.concatenate([np.arange(50), np.arange(50), np.arange(80, len(y))])
    repeated = ours("l1").fit(X[rows], y[rows])
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(weighted.coef_ == 0, repeated.coef_ == 0)
    f_sk = logistic_objective(*(lambda m: (m.coef_, m.intercept_))(saga(X, y, 0.05, 1.0, w)),
                              X, y, 0.05, 1.0, w)
    f_us = logistic_objective(weighted.coef_, weighted.intercept_, X, y, 0.05, 1.0, w)
    assert abs(f_us - f_sk) <= 1e-6 * f_sk


def test_cluster_fit_equals_in_process(client):
    X, y = classification(n=600)
    here = ours("elasticnet", 0.7).fit(X, y)
    there = ours("elasticnet", 0.7, client=client, n_partitions=4).fit(X, y)
    np.testing.assert_allclose(there.coef_, here.coef_, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(there.coef_ == 0, here.coef_ == 0)


@pytest.mark.parametrize("penalty,ratio,alpha", [("l1", None, 0.05), ("elasticnet", 0.3, 0.1)])
def test_linear_regression_matches_lasso_and_elastic_net(penalty, ratio, alpha):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 20))
    y = X[:, :4] @ np.array([3.0, -2.0, 1.5, 0.5]) + 0.3 * rng.normal(size=300) + 1.0
    r = 1.0 if penalty == "l1" else ratio
    peer = (Lasso(alpha=alpha, tol=1e-14, max_iter=100_000) if penalty == "l1" else
            ElasticNet(alpha=alpha, l1_ratio=r, tol=1e-14, max_iter=100_000)).fit(X, y)
    est = dml.LinearRegression(alpha=alpha, penalty=penalty, l1_ratio=ratio, tol=1e-10,
                               max_iter=1000, client=False).fit(X, y)

    def objective(coef, b):
        res = y - X @ coef - b
        return res @ res / (2 * len(y)) + alpha * r * np.abs(coef).sum() + \
            alpha * (1 - r) / 2 * coef @ coef

    f_peer, f_us = objective(peer.coef_, peer.intercept_), objective(est.coef_, est.intercept_)
    assert abs(f_us - f_peer) <= 1e-6 * f_peer, (f_us, f_peer)
    np.testing.assert_array_equal(est.coef_ == 0, peer.coef_ == 0)
    assert (est.coef_ == 0).sum() > 0


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(penalty="l3"), "penalty must be one of"),
    (dict(penalty="elasticnet"), "needs l1_ratio"),
    (dict(penalty="elasticnet", l1_ratio=1.5), "l1_ratio must be a number in [0, 1]"),
    (dict(penalty=None, l1_ratio=0.5), "takes no l1_ratio"),
    (dict(penalty="l1", strategy="fedavg"), "needs the full-batch solver"),
])
def test_bad_penalties_get_one_clear_error(kwargs, fragment):
    X, y = classification(n=100, d=5)
    with pytest.raises(ValueError, match=None) as info:
        dml.LogisticRegression(client=False, **kwargs).fit(X, y)
    assert fragment in str(info.value)


def test_owlqn_optimizer_in_a_workflow(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 12)).astype(np.float64)
    y = (X[:, 0] - X[:, 1] > 0).astype(np.int64)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    text = f"""\
name: l1
cluster: {{local: {{n_workers: 1, threads_per_worker: 1}}}}
data:
  source: {{path: {tmp_path}/X.npy, labels: {tmp_path}/y.npy}}
  partitions: 2
  test: {{split: 100}}
model: {{kind: logistic}}
strategy: {{kind: sync, batch_size: null}}
optimizer: {{kind: owlqn, l1: 0.02, max_iter: 200, tol: 1.0e-8}}
train: {{steps: 200}}
output: {{dir: {tmp_path}/out}}
"""
    (tmp_path / "wf.yaml").write_text(text)
    assert cli.main(["run", str(tmp_path / "wf.yaml"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_accuracy"] > 0.9, metrics
    weights = np.load(tmp_path / "out" / "model.npz")["params"][:-1]   # the bias is last
    assert weights[0] > 0 > weights[1] and (weights[2:] == 0).sum() >= 8  # 10 noise features
    bad = text.replace("l1: 0.02", "l1: -1")
    (tmp_path / "bad.yaml").write_text(bad)
    assert cli.main(["run", str(tmp_path / "bad.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "l1" in err[0], err


WORKFLOW = """\
name: l1-model
cluster: {{local: {{n_workers: 1, threads_per_worker: 1}}}}
data:
  source: {{path: {d}/X.npy, labels: {d}/y.npy}}
  partitions: 2
model: {model}
strategy: {strategy}
{optimizer}
train: {{steps: 300}}
output: {{dir: {d}/out}}
"""


def test_model_penalty_in_a_workflow_is_the_estimators_objective(tmp_path):
    """``model: {kind: logistic, penalty: l1, C: ...}``: the run's weights are the
    estimator's (same C, same n), with the same exact zeros."""
    X, y = classification(n=300, d=12, seed=3)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    text = WORKFLOW.format(d=tmp_path, model="{kind: logistic, penalty: l1, C: 0.05}",
                           strategy="{kind: sync, batch_size: null}",
                           optimizer="optimizer: {kind: owlqn, tol: 1.0e-10, max_iter: 300}")
    (tmp_path / "wf.yaml").write_text(text)
    assert cli.main(["run", str(tmp_path / "wf.yaml"), "--no-progress"]) == 0
    params = np.load(tmp_path / "out" / "model.npz")["params"]
    est = ours("l1", C=0.05).fit(X, y)
    np.testing.assert_allclose(params[:-1], est.coef_[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(params[:-1] == 0, est.coef_[0] == 0)
    assert 0 < (params[:-1] == 0).sum() < X.shape[1]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["optimizer"].startswith("OWLQN(l1=0.0666"), metrics  # 1 / (C n)


@pytest.mark.parametrize("model,strategy,optimizer,key,fragment", [
    ("{kind: logistic, penalty: l3}", None, "", "model.penalty", "penalty must be one of"),
    ("{kind: logistic, penalty: elasticnet, l1_ratio: 2}", None, "", "model.l1_ratio",
     "l1_ratio must be a number in [0, 1]"),
    ("{kind: logistic, penalty: elasticnet}", None, "", "model.penalty", "needs l1_ratio"),
    ("{kind: softmax, penalty: l1, C: 0}", None, "", "model.C", "C must be a number > 0"),
    ("{kind: linear, penalty: l1, alpha: -1}", None, "", "model.alpha", "alpha must be"),
    ("{kind: logistic, penalty: l1}", "{kind: sync, batch_size: 32}", "", "model.penalty",
     "full-batch solver"),
    ("{kind: logistic, penalty: l1}", None, "optimizer: {kind: lbfgs}", "optimizer.kind",
     "use kind owlqn"),
    ("{kind: logistic, l1_ratio: 0.5}", None, "optimizer: {kind: owlqn, l1: 0.1}",
     "optimizer.l1", "in one place"),
    ("{kind: mlp, hidden: [4], penalty: l1}", None, "", "model.penalty", "unknown key"),
])
def test_bad_model_penalty_in_a_workflow_names_the_key(tmp_path, capsys, model, strategy,
                                                       optimizer, key, fragment):
    X, y = classification(n=60, d=6)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    text = WORKFLOW.format(d=tmp_path, model=model, optimizer=optimizer,
                           strategy=strategy or "{kind: sync, batch_size: null}")
    (tmp_path / "wf.yaml").write_text(text)
    assert cli.main(["validate", str(tmp_path / "wf.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{key}:" in err[0] and fragment in err[0], err
