"""The estimators inside the searches their users already run.

* Inside a Dask task (dask-ml's ``GridSearchCV`` on the dask scheduler,
  scikit-learn's ``GridSearchCV`` on joblib's dask backend) a fit runs in that
  task: each search runs in a subprocess under a hard timeout, so a deadlock
  fails the test instead of hanging the suite.
* ``sklearn.clone`` keeps an explicit client; ``GridSearchCV`` and
  ``cross_val_score`` with and without one, on numpy and dask input, give the
  scores of the same search over scikit-learn's ``LogisticRegression``.
* Dask arrays with unknown chunk sizes (``ddf.values``) are accepted.
"""
import os
import subprocess
import sys
import textwrap

import dask.array as da
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression as SkLogistic
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score

import dmlcore as dml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = {"C": [0.1, 1.0]}
CV = KFold(3)


def _data():
    return make_classification(300, n_features=6, n_informative=4, random_state=0)


def _run_script(body, timeout=150):
    """Run ``body`` in a fresh interpreter; fail on timeout or non-zero exit."""
    script = textwrap.dedent("""
        import numpy as np
        from distributed import Client, LocalCluster
        from sklearn.datasets import make_classification
        import dmlcore as dml

        if __name__ == "__main__":
            X, y = make_classification(300, n_features=6, n_informative=4, random_state=0)
            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                              dashboard_address=":0") as cluster, Client(cluster) as client:
        """) + textwrap.indent(textwrap.dedent(body), " " * 8)
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the search did not finish within {timeout} s (deadlock?):\n"
                    f"{(e.stderr or b'')[-3000:]!r}")
    assert out.returncode == 0, out.stderr[-5000:]
    return out.stdout


def _sk_best_score():
    X, y = _data()
    return GridSearchCV(SkLogistic(), GRID, cv=CV).fit(X, y).best_score_


@pytest.mark.slow
def test_dask_ml_grid_search_on_the_dask_scheduler_does_not_deadlock():
    pytest.importorskip("dask_ml")
    out = _run_script("""
        from dask_ml.model_selection import GridSearchCV
        from sklearn.model_selection import KFold
        search = GridSearchCV(dml.LogisticRegression(), {"C": [0.1, 1.0]}, cv=KFold(3),
                              scheduler=client).fit(X, y)
        print("SCORE", search.best_score_)
    """)
    score = float(out.split("SCORE")[1])
    assert score == pytest.approx(_sk_best_score(), abs=0.02)


@pytest.mark.slow
def test_sklearn_grid_search_on_joblib_dask_backend_does_not_deadlock():
    out = _run_script("""
        import joblib
        from sklearn.model_selection import GridSearchCV, KFold
        with joblib.parallel_backend("dask"):
            search = GridSearchCV(dml.LogisticRegression(), {"C": [0.1, 1.0]}, cv=KFold(3),
                                  n_jobs=-1).fit(X, y)
        print("SCORE", search.best_score_)
    """)
    score = float(out.split("SCORE")[1])
    assert score == pytest.approx(_sk_best_score(), abs=0.02)


def test_clone_keeps_the_client(client):
    est = dml.LogisticRegression(C=0.5, client=client)
    copy = clone(est)
    assert copy is not est
    assert copy.client is client
    assert copy.get_params()["C"] == 0.5


@pytest.mark.parametrize("explicit", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["default-client", "explicit-client"])
@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_grid_search_and_cross_val_score(client, explicit, kind):
    X, y = _data()
    expected = cross_val_score(SkLogistic(), X, y, cv=CV)
    if kind == "dask":
        X, y = da.from_array(X, chunks=100), da.from_array(y, chunks=100)
    est = dml.LogisticRegression(client=client if explicit else None)
    scores = cross_val_score(est, X, y, cv=CV)
    np.testing.assert_allclose(scores, expected, atol=0.02)
    search = GridSearchCV(est, GRID, cv=CV).fit(X, y)
    assert search.best_score_ == pytest.approx(_sk_best_score(), abs=0.02)
    if explicit:
        assert search.best_estimator_.client is client


def test_unknown_chunk_sizes(client):
    dd = pytest.importorskip("dask.dataframe")
    import pandas as pd

    X, y = _data()
    frame = dd.from_pandas(pd.DataFrame(X), npartitions=3)
    Xd = frame.values                      # unknown chunk sizes
    assert np.isnan(Xd.chunks[0][0])
    yd = dd.from_pandas(pd.Series(y), npartitions=3).values
    ours = dml.LogisticRegression(tol=1e-8, client=client).fit(Xd, yd)
    ref = SkLogistic(tol=1e-8).fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(ours.predict(Xd)), ref.predict(X))


@pytest.mark.slow
def test_dask_input_without_client_fits_in_process():
    """No client: the fit runs here (no cluster started), like dask-ml's."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import dask.array as da, numpy as np
        from sklearn.datasets import make_classification
        import dmlcore as dml
        import distributed
        started = []
        orig = distributed.LocalCluster.__init__
        def spy(self, *a, **k):
            started.append(1)
            orig(self, *a, **k)
        distributed.LocalCluster.__init__ = spy
        X, y = make_classification(300, n_features=6, random_state=0)
        clf = dml.LogisticRegression().fit(da.from_array(X, chunks=100), da.from_array(y, chunks=100))
        print("STARTED", len(started), "PARTS", clf.history_.attrs["n_partitions"],
              "SCORE", clf.score(X, y))
    """)], capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    words = out.stdout.split()
    assert words[words.index("STARTED") + 1] == "0"
    assert words[words.index("PARTS") + 1] == "1"
    assert float(words[words.index("SCORE") + 1]) > 0.8


@pytest.mark.parametrize("Est,Ref", [("LogisticRegression", "LogisticRegression"),
                                     ("LinearRegression", "Ridge")])
def test_persisted_chunks_are_used_where_they_lie(client, Est, Ref):
    """A full-batch fit on balanced persisted chunks partitions by chunk (no
    rows move) and reaches scikit-learn's optimum."""
    import sklearn.linear_model as sklm

    X, y = _data()
    if Est == "LinearRegression":
        y = X @ np.arange(1.0, 7.0) + np.random.default_rng(0).normal(size=len(y))
        ref = sklm.Ridge(alpha=1.0, tol=1e-10).fit(X, y)
        ours = dml.LinearRegression(alpha=1.0, tol=1e-10, client=client)
    else:
        ref = sklm.LogisticRegression(tol=1e-10).fit(X, y)
        ours = dml.LogisticRegression(tol=1e-10, client=client)
    Xp, yp = client.persist([da.from_array(X, chunks=(50, 6)), da.from_array(y, chunks=50)])
    ours.fit(Xp, yp)
    assert ours.history_.attrs["n_partitions"] == 6      # one per chunk (iid: 4)
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=1e-4, atol=1e-5)
