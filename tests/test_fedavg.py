"""FedAvg: one client = local training, exact n_k weighting, reproducible sampling,
FedProx, server optimizers (FedAvgM), the failure policy, non-IID partitions.

Oracles are independent of the library: ``reference_mlp.local_sgd`` (a float64
NumPy MLP trained with plain SGD on each client's rows, in the documented batch
order) and ``reference_mlp.fedavg_round`` (their n_k-weighted average).
"""
import numpy as np
import pytest

import reference_mlp as ref

import dmlcore as dml
from dmlcore.strategies.fedavg import FedAvg, sample_clients


def _blobs(n=240, d=12, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=2.0, size=(k, d))
    y = rng.integers(k, size=n)
    X = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return X, y


def _parts(data, client=None):
    """The partitions' numpy arrays, in partition order."""
    if client is not None:
        xs = client.compute(data.x_blocks(), sync=True)
        ys = client.compute(data.y_blocks(), sync=True)
    else:
        xs = [b.compute(scheduler="sync") for b in data.x_blocks()]
        ys = [b.compute(scheduler="sync") for b in data.y_blocks()]
    return [(np.asarray(x), np.asarray(y)) for x, y in zip(xs, ys)]


SIZES = [12, 8, 3]
MODEL = dml.models.MLP(SIZES)
# float32 runs against the float64 reference: rounding over tens of SGD steps
TOL = dict(rtol=0, atol=2e-6)


def test_one_client_equals_local_training(client):
    X, y = _blobs()
    data = dml.partition(X, y, n_partitions=1, seed=0, client=client)
    opt = dml.optim.SGD(lr=0.1)
    res = dml.fit(MODEL, data, FedAvg(clients_per_round=1.0, local_epochs=2, batch_size=16),
                  opt, rounds=2, client=client, seed=3, progress=False)
    (Xp, yp), = _parts(data, client)
    p0 = MODEL.init(3, dtype=np.float32)
    # plain SGD has no state, so two rounds of E=2 are one run of 4 local epochs
    expected = ref.local_sgd(p0, SIZES, Xp, yp, lr=0.1, batch_size=16, epochs=4, seed=3,
                             partition=0)
    np.testing.assert_allclose(res.params, expected, **TOL)
    assert np.abs(expected - p0).max() > 100 * TOL["atol"]     # it trained
    assert list(res.history["participants"].values) == [1, 1]
    assert (res.history["bytes_sent"] > 0).all()


def test_weights_by_n_k_exact_with_failure_dropped(client):
    """Unequal (dirichlet) clients; client 1 fails in round 0 and is dropped."""
    X, y = _blobs(n=300)
    data = dml.partition(X, y, n_partitions=4, scheme="dirichlet", alpha=0.3, seed=1,
                         client=client)
    sizes = np.asarray(data.partition_sizes)
    assert sizes.max() > 1.5 * sizes.min()         # really unequal
    opt = dml.optim.SGD(lr=0.05)
    strategy = FedAvg(clients_per_round=4, local_epochs=1, batch_size=10,
                      fail_clients={0: [1]})
    res = dml.fit(MODEL, data, strategy, opt, rounds=1, client=client, seed=0,
                  progress=False)
    p0 = MODEL.init(0, dtype=np.float32)
    parts = _parts(data, client)
    kept = [0, 2, 3]
    kw = dict(lr=0.05, batch_size=10, epochs=1, seed=0)
    expected = ref.fedavg_round(p0, SIZES, parts, kept, **kw)
    np.testing.assert_allclose(res.params, expected, **TOL)
    unweighted = np.mean([ref.local_sgd(p0, SIZES, *parts[k], partition=k, **kw)
                          for k in kept], axis=0)
    assert np.abs(unweighted - expected).max() > 100 * TOL["atol"]   # the weights matter here
    assert int(res.history["participants"][0]) == 3
    assert int(res.history["failed"][0]) == 1
    np.testing.assert_array_equal(res.history.participation.sel(step=1).values, [1, -1, 1, 1])
    # what the transport counted: per worker with sampled clients the params
    # down (float32), per worker with a counted client its float64 partial sum
    # back, plus the calls' headers (under 4 KiB a call)
    workers = data.workers()
    down = len({workers[k] for k in range(4)})
    up = len({workers[k] for k in kept})
    payload = MODEL.n_params * (4 * down + 8 * up)
    assert payload <= int(res.history["bytes_sent"][0]) <= payload + 4096 * down


def test_failure_propagates_when_not_accepted(client):
    X, y = _blobs()
    data = dml.partition(X, y, n_partitions=4, seed=0, client=client)
    strategy = FedAvg(clients_per_round=1.0, local_epochs=1, batch_size=20,
                      accept_failures=False, fail_clients={1: [2]})
    with pytest.raises(RuntimeError, match="client 2"):
        dml.fit(MODEL, data, strategy, dml.optim.SGD(lr=0.05), rounds=3, client=client,
                progress=False)


def test_sampling_reproducible_and_resumable(tmp_path):
    assert FedAvg(clients_per_round=0.1).clients_sampled(5) == 1      # max(round(0.5), 1)
    assert FedAvg(clients_per_round=0.1).clients_sampled(100) == 10
    a = sample_clients(7, 3, 100, 10)
    np.testing.assert_array_equal(a, sample_clients(7, 3, 100, 10))
    assert len(set(a)) == 10
    assert not np.array_equal(a, sample_clients(7, 4, 100, 10))

    X, y = _blobs(n=200)
    data = dml.partition(X, y, n_partitions=10, seed=0, client=False)
    opt = dml.optim.SGD(lr=0.1)

    def run(**kw):
        strategy = FedAvg(clients_per_round=0.3, local_epochs=1, batch_size=5)
        return strategy, dml.fit(MODEL, data, strategy, opt, client=False, seed=5,
                                 progress=False, **kw)

    _, r1 = run(rounds=4)
    _, r2 = run(rounds=4)
    np.testing.assert_array_equal(r1.params, r2.params)
    for rnd in range(4):
        np.testing.assert_array_equal(
            np.flatnonzero(r1.history.participation.sel(step=rnd + 1).values == 1),
            sample_clients(5, rnd, 10, 3))
    assert (r1.history["participants"] == 3).all()
    assert (r1.history["bytes_sent"] == 0).all()          # in-process: nothing crosses
    # resume from a checkpoint at round 2 gives the same model as the straight run
    run(rounds=2, checkpoint_dir=tmp_path)
    _, r3 = run(rounds=4, checkpoint_dir=tmp_path, resume=True)
    np.testing.assert_array_equal(r3.params, r1.params)


def test_fedprox_keeps_clients_near_global():
    X, y = _blobs(n=200)
    data = dml.partition(X, y, n_partitions=4, scheme="shards", seed=0, client=False)
    opt = dml.optim.SGD(lr=0.05)
    p0 = MODEL.init(0, dtype=np.float32)

    fitted = {}

    def drift(mu):
        res = dml.fit(MODEL, data, FedAvg(1.0, local_epochs=5, batch_size=5, proximal_mu=mu),
                      opt, rounds=1, client=False, progress=False)
        fitted[mu] = res.params
        return float(np.linalg.norm(res.params - p0))

    free, prox = drift(0.0), drift(10.0)
    assert prox < 0.3 * free
    # the oracle: FedProx's local steps in the NumPy reference
    parts = _parts(data)
    expected = ref.fedavg_round(p0, SIZES, parts, range(4), lr=0.05, batch_size=5, epochs=5,
                                seed=0, mu=10.0)
    np.testing.assert_allclose(fitted[10.0], expected, **TOL)
    assert abs(float(np.linalg.norm(expected - p0)) - prox) < 1e-5


def test_server_momentum_composes():
    """FedAvgM after 2 rounds = FedAvg(2 rounds) - beta * (w0 - FedAvg(1 round))."""
    X, y = _blobs(n=200)
    data = dml.partition(X, y, n_partitions=4, seed=0, client=False)
    opt = dml.optim.SGD(lr=0.1)

    def run(rounds, server=None):
        return dml.fit(MODEL, data, FedAvg(1.0, local_epochs=1, batch_size=10,
                                           server_optimizer=server),
                       opt, rounds=rounds, client=False, progress=False).params

    w0 = MODEL.init(0, dtype=np.float32)
    w1, w2 = run(1), run(2)
    np.testing.assert_allclose(run(2, dml.optim.SGD(lr=1.0)), w2, atol=1e-6)
    momentum = run(2, dml.optim.SGD(lr=1.0, momentum=0.9))
    np.testing.assert_allclose(momentum, w2 - 0.9 * (w0 - w1), atol=1e-5)
    assert np.abs(momentum - w2).max() > 1e-3


def test_validation_and_steps_per_epoch():
    X, y = _blobs(n=200)
    data = dml.partition(X, y, n_partitions=10, seed=0, client=False)
    assert FedAvg(clients_per_round=0.1).steps_per_epoch(data) == 10
    assert FedAvg(clients_per_round=3).steps_per_epoch(data) == 4
    assert FedAvg(clients_per_round=1.0).steps_per_epoch(data) == 1
    for bad in (0, 0.0, 1.5, -2, True, "all"):
        with pytest.raises(ValueError):
            FedAvg(clients_per_round=bad)
    with pytest.raises(ValueError):
        FedAvg(local_epochs=0)
    with pytest.raises(ValueError):
        FedAvg(server_optimizer=dml.optim.LBFGS())
    with pytest.raises(ValueError, match="exceeds"):
        dml.fit(MODEL, data, FedAvg(clients_per_round=11), dml.optim.SGD(lr=0.1), rounds=1,
                client=False, progress=False)


def test_shards_run_learns(client):
    """Pathological non-IID clients (2 label shards each) on the cluster: the model learns."""
    X, y = _blobs(n=400, k=4)
    data = dml.partition(X, y, n_partitions=8, scheme="shards", seed=0, client=client)
    report = data.skew_report()
    assert report is not None
    res = dml.fit(dml.models.MLP([12, 8, 4]), data,
                  FedAvg(0.5, local_epochs=2, batch_size=10), dml.optim.SGD(lr=0.1),
                  rounds=8, client=client, eval_data=(X, y), eval_every=8, progress=False)
    assert (res.history["participants"] == 4).all()
    assert float(res.history["eval_accuracy"][-1]) > 0.8
