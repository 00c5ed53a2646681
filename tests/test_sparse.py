"""scipy.sparse CSR data: the CSR kernels against the dense kernels on the same
matrix (float32 and float64, row weights, int32 and int64 indices, empty rows
and columns), partitions that stay CSR on the workers, and the GLM estimators
against scikit-learn on sparse input."""
import numpy as np
import pytest
import scipy.sparse as sp

from dmlcore.models.glm import Linear, Logistic, Softmax

N, P, K = 53, 40, 4


def _csr(dtype, seed=0, density=0.1):
    rng = np.random.default_rng(seed)
    X = sp.random(N, P, density=density, format="csr", random_state=seed, dtype=np.float64)
    X.data = rng.normal(size=X.nnz)
    X = X.tolil()
    X[3, :] = 0                                  # an empty row
    X[:, 7] = 0                                  # a feature no row has
    return X.tocsr().astype(dtype)


def _labels(model, rng):
    if isinstance(model, Softmax):
        return rng.integers(0, K, N)
    if isinstance(model, Logistic):
        return rng.integers(0, 2, N).astype(np.float64)
    return rng.normal(size=N)


MODELS = [Linear(P), Logistic(P), Softmax(P, K)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("index", [np.int32, np.int64])
@pytest.mark.parametrize("model", MODELS, ids=repr)
def test_csr_kernel_equals_the_dense_kernel(model, dtype, weighted, index):
    rng = np.random.default_rng(1)
    X = _csr(dtype)
    X.indices, X.indptr = X.indices.astype(index), X.indptr.astype(index)
    y = _labels(model, rng)
    y = y.astype(dtype) if y.dtype.kind == "f" else y
    w = rng.uniform(0, 2, N).astype(dtype) if weighted else None
    params = (model.init(seed=2, dtype=dtype) + rng.normal(scale=0.5, size=model.n_params)
              ).astype(dtype)
    g_sparse, g_dense = np.empty_like(params), np.empty_like(params)
    l_sparse = model.loss_grad(params, X, y, g_sparse, sample_weight=w)
    l_dense = model.loss_grad(params, X.toarray(), y, g_dense, sample_weight=w)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    assert l_sparse == pytest.approx(l_dense, rel=tol)
    np.testing.assert_allclose(g_sparse, g_dense, rtol=tol * 10, atol=tol * 10)
    W = model.views(g_sparse)["linear"]["W"].reshape(P, -1)
    assert not W[7].any()                                      # the absent feature


@pytest.fixture
def csr_block_rows():
    """Set the CSR kernels' rows per block for one test, then restore automatic."""
    from dmlcore._ext import loss

    yield loss.csr_block_rows
    loss.csr_block_rows(0)


@pytest.mark.parametrize("rows", [1, 7, 64, 300, 0])
@pytest.mark.parametrize("model", MODELS, ids=repr)
def test_csr_kernel_is_the_same_for_every_block_size(model, rows, csr_block_rows):
    # 300 rows: several blocks and a partial one at the default 64; rows=1 and
    # 300 are the extremes of the large-block mode the kernel uses when coef
    # and gradient outgrow the cache.
    rng = np.random.default_rng(4)
    n = 300
    X = sp.random(n, P, density=0.2, format="csr", random_state=5)
    X.data = rng.normal(size=X.nnz)
    y = (rng.integers(0, K, n) if isinstance(model, Softmax)
         else rng.integers(0, 2, n).astype(np.float64))
    w = rng.uniform(0, 2, n)
    params = model.init(seed=2) + rng.normal(scale=0.5, size=model.n_params)
    g_dense = np.empty_like(params)
    l_dense = model.loss_grad(params, X.toarray(), y, g_dense, sample_weight=w)
    csr_block_rows(rows)
    g = np.empty_like(params)
    assert model.loss_grad(params, X, y, g, sample_weight=w) == pytest.approx(l_dense, rel=1e-12)
    np.testing.assert_allclose(g, g_dense, rtol=1e-10, atol=1e-12)


def test_csr_softmax_with_a_gradient_larger_than_the_cache():
    # 60,000 x 10 coefficients: coef and gradient are 9.6 MB, so the kernel
    # picks large blocks (loss_kernels.h); checked against scipy.sparse + NumPy.
    from scipy.special import logsumexp

    rng = np.random.default_rng(6)
    n, p, k = 2000, 60_000, 10
    X = sp.random(n, p, density=5e-4, format="csr", random_state=7)
    y = rng.integers(0, k, n)
    params = rng.normal(scale=0.3, size=p * k + k)
    Z = X @ params[:p * k].reshape(p, k) + params[p * k:]
    loss = np.sum(logsumexp(Z, axis=1) - Z[np.arange(n), y])
    R = np.exp(Z - logsumexp(Z, axis=1, keepdims=True))
    R[np.arange(n), y] -= 1
    grad = np.empty_like(params)
    assert Softmax(p, k).loss_grad(params, X, y, grad) == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(grad, np.concatenate([(X.T @ R).ravel(), R.sum(axis=0)]),
                               rtol=1e-10, atol=1e-12)


def test_csr_kernel_errors():
    X = _csr(np.float64)
    model = Logistic(P)
    params, grad = np.zeros(P + 1), np.empty(P + 1)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        model.loss_grad(params, X, np.full(N, 2.0), grad)
    bad = X.copy()
    bad.data[0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        model.loss_grad(params, bad, np.zeros(N), grad)
    with pytest.raises(ValueError, match="dtype mix"):
        model.loss_grad(params, X.astype(np.float32), np.zeros(N), grad)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        Softmax(P, K).loss_grad(np.zeros(P * K + K), X, np.full(N, 4), np.empty(P * K + K))


def test_other_sparse_formats_are_used_as_csr():
    X = _csr(np.float64)
    model = Linear(P)
    params = np.random.default_rng(0).normal(size=P + 1)
    y = np.random.default_rng(1).normal(size=N)
    g1, g2 = np.empty(P + 1), np.empty(P + 1)
    assert model.loss_grad(params, X.tocoo(), y, g1) == pytest.approx(
        model.loss_grad(params, X, y, g2), rel=1e-14)
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_allclose(model.predict(params, X), model.predict(params, X.toarray()))


# ---- partitions and estimators ---------------------------------------------------
def _text_like(n=600, p=300, seed=0):
    """Bag-of-words-like data: ~15 stored entries per row, labels from a sparse truth."""
    rng = np.random.default_rng(seed)
    X = sp.random(n, p, density=0.05, format="csr", random_state=seed)
    X.data = rng.poisson(2.0, X.nnz).astype(np.float64) + 1.0
    truth = rng.normal(size=p) * (rng.random(p) < 0.3)
    z = X @ truth
    return X, (z > np.median(z)).astype(np.int64), np.digitize(z, np.quantile(z, [0.33, 0.66]))


def test_csr_partitions_stay_csr_on_the_workers(client):
    import dmlcore as dml

    X, y, _ = _text_like()
    data = dml.partition(X, y, 4, seed=0, client=client)
    assert data.is_sparse
    kinds = client.gather([client.submit(lambda a: (type(a).__name__, a.format, a.nnz), xf,
                                         workers=[w], allow_other_workers=False)
                           for (xf, _, _), w in zip(data.partition_futures(), data.workers())])
    assert all(kind[1] == "csr" for kind in kinds)
    report = data.skew_report()
    assert report["nnz"].values.tolist() == [k[2] for k in kinds]
    assert int(report["nnz"].sum()) == X.nnz
    for p, rows in enumerate(data.source_rows):        # each partition holds its rows
        part = data.partition_futures()[p][0].result()
        assert abs(part - X[rows]).sum() == 0


@pytest.mark.parametrize("multiclass", [False, True])
def test_logistic_on_csr_matches_sklearn(multiclass):
    import sklearn.linear_model as sk

    from dmlcore import estimators as est

    X, y2, y3 = _text_like()
    y = y3 if multiclass else y2
    w = np.random.default_rng(3).uniform(0.5, 2.0, len(y))
    ours = est.LogisticRegression(C=0.5, tol=1e-10, max_iter=1000, client=False)
    ours.fit(X, y, sample_weight=w)
    ref = sk.LogisticRegression(C=0.5, tol=1e-12, max_iter=10000).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-5)


def test_linear_regression_on_csr_matches_sklearn_ridge():
    import sklearn.linear_model as sk

    from dmlcore import estimators as est

    X, _, _ = _text_like()
    y = X @ np.random.default_rng(1).normal(size=X.shape[1]) + 0.1
    ours = est.LinearRegression(alpha=1.0, tol=1e-12, max_iter=2000, client=False).fit(X, y)
    ref = sk.Ridge(alpha=1.0, solver="lsqr", tol=1e-12).fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-4, atol=1e-6)


def test_logistic_on_csr_on_the_cluster_equals_in_process(client):
    from dmlcore import estimators as est

    X, _, y = _text_like()
    fits = [est.LogisticRegression(tol=1e-10, max_iter=500, client=where,
                                   n_partitions=4).fit(X, y) for where in (client, False)]
    # two executors add their partials in another order than one: the same
    # optimum to the solver's tolerance, not the same bits
    np.testing.assert_allclose(fits[0].coef_, fits[1].coef_, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("apply_on", ["driver", "workers"])
def test_minibatch_sync_sgd_on_csr_partitions(client, apply_on):
    import dmlcore as dml

    X, y, _ = _text_like()
    runs = []
    for where, Xs in ((client, X), (False, X.toarray())):
        data = dml.partition(Xs, y, 4, seed=0, client=where)
        res = dml.fit(dml.models.Logistic(X.shape[1]), data,
                      dml.SyncSGD(batch_size=32, apply_on=apply_on), dml.optim.SGD(lr=0.05),
                      steps=30, client=where, seed=1, progress=False)
        runs.append(np.asarray(res.params))
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-10, atol=1e-12)   # CSR == dense


def test_mlp_says_it_needs_dense_input():
    from dmlcore import estimators as est

    X, y, _ = _text_like(n=100)
    with pytest.raises(TypeError, match="dense data is required"):
        est.MLPClassifier(client=False).fit(X, y)
