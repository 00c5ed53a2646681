"""SyncSGD's transports: the explicit actor-call path, the logged fallback, IPv6."""
import logging
import socket

import numpy as np
import pytest

import dmlcore as dml


def problem(n=400, d=4):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(n, d))
    y = (X @ rng.normal(size=d) > 0).astype(np.float64)
    return X, y


def fit(client, strategy, steps=12):
    X, y = problem()
    data = dml.partition(X, y, n_partitions=4, seed=0, client=client)
    model = dml.models.Logistic(X.shape[1])
    return dml.fit(model, data, strategy, dml.optim.Adam(lr=0.05), steps=steps, client=client,
                   progress=False, timeout=30).params


def test_actor_calls_transport_gives_the_same_bits(client, caplog):
    with caplog.at_level(logging.WARNING, logger="dmlcore"):
        via_dask = fit(client, dml.SyncSGD(batch_size=16, transport="actor-calls"))
    assert not [r for r in caplog.records if r.name == "dmlcore"]      # chosen, not a fallback
    direct = fit(client, dml.SyncSGD(batch_size=16))
    np.testing.assert_array_equal(via_dask, direct)


def test_the_fallback_is_logged_once_with_its_reason(caplog):
    from distributed import Client, LocalCluster

    from dmlcore import executors

    executors._logged_fallbacks.clear()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        with caplog.at_level(logging.WARNING, logger="dmlcore"):
            first = fit(c, dml.SyncSGD(batch_size=16))
            fit(c, dml.SyncSGD(batch_size=16))
    logged = [r.getMessage() for r in caplog.records if r.name == "dmlcore"]
    assert len(logged) == 1 and "inproc://" in logged[0], logged
    reference = fit(False, dml.SyncSGD(batch_size=16))
    np.testing.assert_allclose(first, reference, rtol=1e-10)   # other sum order


def _has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="the loopback has no ::1")
def test_ipv6_workers_take_the_direct_path(caplog):
    from distributed import Client, LocalCluster

    from dmlcore import executors

    executors._logged_fallbacks.clear()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="[::1]",
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        assert all(w.startswith("tcp://[::1]") for w in c.scheduler_info()["workers"])
        with caplog.at_level(logging.WARNING, logger="dmlcore"):
            replicated = fit(c, dml.SyncSGD(batch_size=16))
    assert not [r for r in caplog.records if r.name == "dmlcore"]
    np.testing.assert_allclose(replicated, fit(False, dml.SyncSGD(batch_size=16)), rtol=1e-10)
