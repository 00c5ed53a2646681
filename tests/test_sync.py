"""SyncSGD and dml.fit: against NumPy references, on a real cluster and in-process."""
import numpy as np
import pytest

import dmlcore as dml
from dmlcore import local
from bytes_check import assert_payload


def logistic_problem(n=600, d=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    y = (rng.random(n) < 1 / (1 + np.exp(-(X @ w + 0.3)))).astype(np.float64)
    return X, y


def numpy_mean_grad(params, X, y):
    """Mean log-loss gradient of a Logistic model (params = w..., b)."""
    z = X @ params[:-1] + params[-1]
    r = 1 / (1 + np.exp(-z)) - y
    return np.concatenate([X.T @ r, [r.sum()]]) / len(y)


def numpy_gd(X, y, lr, steps):
    params = np.zeros(X.shape[1] + 1)
    for _ in range(steps):
        params -= lr * numpy_mean_grad(params, X, y)
    return params


@pytest.mark.parametrize("where", ["in-process", "cluster"])
def test_full_batch_gd_matches_numpy(where, request):
    X, y = logistic_problem()
    client = request.getfixturevalue("client") if where == "cluster" else False
    data = dml.partition(X, y, n_partitions=4, seed=0, client=client or None)
    model = dml.models.Logistic(X.shape[1])
    result = dml.fit(model, data, dml.SyncSGD(batch_size=None), dml.optim.SGD(lr=0.5),
                     steps=25, init_params=np.zeros(model.n_params), client=client,
                     progress=False)
    # The partitions hold a permutation of the rows; a full batch is order-free.
    np.testing.assert_allclose(result.params, numpy_gd(X, y, 0.5, 25), rtol=1e-10, atol=1e-12)
    assert list(result.history.step.values) == list(range(1, 26))
    assert np.all(np.diff(result.history.loss.values) < 0)


def test_minibatches_are_ddp_batches(client):
    """Each step sums batch_size rows of every partition; the driver divides once."""
    X, y = logistic_problem(n=203)
    data = dml.partition(X, y, n_partitions=3, seed=1, client=client)
    model = dml.models.Logistic(X.shape[1])
    steps, lr, b = 7, 0.3, 16
    result = dml.fit(model, data, dml.SyncSGD(batch_size=b), dml.optim.SGD(lr=lr),
                     steps=steps, init_params=np.zeros(model.n_params), seed=5, progress=False)
    blocks = [(xb.compute(), yb.compute()) for xb, yb in zip(data.x_blocks(), data.y_blocks())]
    params = np.zeros(model.n_params)
    for step in range(steps):
        rows = [local.batch_slice(len(xb), b, step, 5, pid) for pid, (xb, _) in enumerate(blocks)]
        Xs = np.concatenate([xb[r] for (xb, _), r in zip(blocks, rows)])
        ys = np.concatenate([yb[r] for (_, yb), r in zip(blocks, rows)])
        params -= lr * numpy_mean_grad(params, Xs, ys)
    np.testing.assert_allclose(result.params, params, rtol=1e-10, atol=1e-12)


def test_tasks_transport_equals_actors(client):
    X, y = logistic_problem(n=300)
    data = dml.partition(X, y, n_partitions=5, seed=0, client=client)
    model = dml.models.Logistic(X.shape[1])
    runs = [dml.fit(model, data, dml.SyncSGD(batch_size=20, fan_in=2, transport=t),
                    dml.optim.SGD(lr=0.2, momentum=0.9), steps=6, progress=False)
            for t in ("actors", "tasks")]
    np.testing.assert_allclose(runs[0].params, runs[1].params, rtol=1e-12, atol=1e-14)


def test_lbfgs_is_partition_invariant(client):
    X, y = logistic_problem(n=900, d=8)
    model = dml.models.Logistic(X.shape[1])
    solutions = []
    for k in (1, 3, 16):
        data = dml.partition(X, y, n_partitions=k, seed=0, client=client)
        result = dml.fit(model, data, dml.SyncSGD(), dml.optim.LBFGS(max_iter=200, tol=1e-10),
                         steps=200, progress=False)
        solutions.append(result.params)
    for other in solutions[1:]:
        np.testing.assert_allclose(other, solutions[0], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(numpy_mean_grad(solutions[0], X, y), 0, atol=1e-8)


@pytest.mark.parametrize("apply_on", ["driver", "workers"])
def test_bytes_per_step_scale_with_parameters_not_rows(client, apply_on):
    model = dml.models.Logistic(10)
    sent = []
    for n in (400, 4000):
        X, y = logistic_problem(n=n, d=10)
        data = dml.partition(X, y, n_partitions=4, seed=0, client=client)
        result = dml.fit(model, data, dml.SyncSGD(batch_size=10, apply_on=apply_on),
                         dml.optim.SGD(lr=0.1), steps=3, progress=False)
        sent.append(result.history.bytes_sent.values)
    n_workers = len(set(data.workers()))
    np.testing.assert_allclose(sent[0], sent[1], atol=64)     # headers: digits of losses
    vector = model.n_params * 8
    if apply_on == "driver":        # parameters out, partial sums back, per worker
        assert_payload(sent[0], 2 * vector * n_workers, 2 * n_workers)
    else:                           # each replica's partial to every other replica
        assert n_workers == 2
        assert_payload(sent[0][1], n_workers * (n_workers - 1) * vector, 2)


def test_local_steps_average_local_models(client):
    X, y = logistic_problem(n=400)
    data = dml.partition(X, y, n_partitions=4, seed=0, client=client)
    model = dml.models.Logistic(X.shape[1])
    strategy = dml.SyncSGD(batch_size=25, local_steps=4)
    assert strategy.steps_per_epoch(data) == 1
    result = dml.fit(model, data, strategy, dml.optim.SGD(lr=0.2), epochs=8, progress=False,
                     init_params=np.zeros(model.n_params))
    # Reference: every partition runs 4 local SGD steps; the driver averages by rows.
    blocks = [(xb.compute(), yb.compute()) for xb, yb in zip(data.x_blocks(), data.y_blocks())]
    params = np.zeros(model.n_params)
    for rnd in range(8):
        new = np.zeros_like(params)
        for pid, (xb, yb) in enumerate(blocks):
            p = params.copy()
            for k in range(4):
                r = local.batch_slice(len(xb), 25, rnd * 4 + k, 0, pid)
                p -= 0.2 * numpy_mean_grad(p, xb[r], yb[r])
            new += len(xb) * p
        params = new / len(X)
    np.testing.assert_allclose(result.params, params, rtol=1e-10, atol=1e-12)


class StopAt:
    """A callback that stops at ``step``; ``sync_every`` None = needs every step."""

    def __init__(self, step, sync_every=None):
        self.step = step
        if sync_every:
            self.sync_every = sync_every

    def __call__(self, step, record, params):
        return step == self.step


@pytest.mark.parametrize("apply_on, stop", [("driver", StopAt(6)), ("workers", StopAt(6)),
                                            ("workers", StopAt(8, sync_every=4))])
def test_resume_continues_exactly(tmp_path, client, apply_on, stop):
    X, y = logistic_problem(n=300)
    data = dml.partition(X, y, n_partitions=3, seed=0, client=client)
    model = dml.models.Logistic(X.shape[1])

    def run(**kw):
        return dml.fit(model, data, dml.SyncSGD(batch_size=10, apply_on=apply_on),
                       dml.optim.Adam(lr=0.05), steps=12, checkpoint_every=4, progress=False,
                       **kw)

    straight = run()
    run(checkpoint_dir=tmp_path, callbacks=[stop])
    resumed = run(checkpoint_dir=tmp_path, resume=True)
    np.testing.assert_array_equal(resumed.params, straight.params)
    assert list(resumed.history.step.values) == list(range(1, 13))
    np.testing.assert_allclose(resumed.history.loss.values, straight.history.loss.values,
                               rtol=1e-12)


def test_a_callback_that_syncs_every_step_is_warned_about(client, caplog):
    # without sync_every the replicas cannot run between steps: said once, with the fix
    X, y = logistic_problem(n=300)
    data = dml.partition(X, y, n_partitions=2, seed=0, client=client)
    model = dml.models.Logistic(X.shape[1])

    def warnings(callback):
        caplog.clear()
        with caplog.at_level("WARNING", logger="dmlcore.sync"):
            dml.fit(model, data, dml.SyncSGD(batch_size=10), dml.optim.SGD(lr=0.1), steps=12,
                    progress=False, client=client, callbacks=[callback])
        return [r.getMessage() for r in caplog.records if r.name == "dmlcore.sync"]

    said = warnings(StopAt(100))
    assert len(said) == 1 and "sync_every" in said[0] and "every step" in said[0]
    assert warnings(StopAt(100, sync_every=4)) == []


def test_replicas_equal_the_driver_path_bit_for_bit(client, tmp_path):
    """apply_on="workers" (replicated optimizer, peer exchange, syncs at
    eval/checkpoint points) gives the same bits as the driver-applied path."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(900, 12)).astype(np.float32)
    y = (X[:, :3].sum(1) > 0).astype(np.int64) + (X[:, 3] > 1)
    data = dml.partition(X, y, n_partitions=4, seed=0, client=client)
    model = dml.models.MLP([12, 16, 8, 3])
    runs = {}
    for apply_on in ("driver", "workers"):
        opt = dml.optim.Adam(lr=0.01, weight_decay=1e-3, schedule=dml.optim.Cosine())
        runs[apply_on] = dml.fit(
            model, data, dml.SyncSGD(batch_size=16, apply_on=apply_on,
                                     trainable=["layer1", "layer2"]),
            opt, epochs=3, eval_data=(X, y), eval_every=5, checkpoint_every=10,
            checkpoint_dir=tmp_path / apply_on, progress=False)
    a, b = runs["driver"], runs["workers"]
    # the replicated path ran: 2 gradient vectors per step, not 2 per worker
    trained = int(model.trainable_mask(["layer1", "layer2"]).sum()) * 4
    assert_payload(b.history.bytes_sent.values[1], 2 * trained, 2)
    assert_payload(a.history.bytes_sent.values[1], 4 * trained, 4)
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.opt_state.m, b.opt_state.m)
    np.testing.assert_array_equal(a.history.loss.values, b.history.loss.values)
    np.testing.assert_array_equal(a.history.eval_loss.values, b.history.eval_loss.values)
    assert a.history.sizes["step"] == 3 * 15        # 225 rows per partition, 15 batches
    from dmlcore import checkpoint
    saved = checkpoint.latest(tmp_path / "workers")
    assert saved["step"] == 45
    np.testing.assert_array_equal(saved["params"], b.params)


def test_eval_and_history_variables(client):
    X, y = logistic_problem(n=300)
    data = dml.partition(X, y, n_partitions=2, seed=0, client=client)
    model = dml.models.Logistic(X.shape[1])
    result = dml.fit(model, data, dml.SyncSGD(batch_size=50), dml.optim.SGD(lr=0.5),
                     epochs=3, eval_data=(X, y), progress=False)
    h = result.history
    assert {"loss", "wall_time", "bytes_sent", "eval_loss", "eval_accuracy"} <= set(h.data_vars)
    assert h.sizes["step"] == 9                     # 3 batches of 50 per 150-row partition
    evaluated = h.eval_accuracy.dropna("step")
    assert list(evaluated.step.values) == [3, 6, 9]
    assert float(evaluated[-1]) > 0.7
    assert np.all(np.diff(h.wall_time.values) > 0)


def test_bad_arguments():
    X, y = logistic_problem(n=50)
    model = dml.models.Logistic(X.shape[1])
    with pytest.raises(ValueError, match="exactly one of epochs, steps, rounds"):
        dml.fit(model, (X, y), dml.SyncSGD(), client=False, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        dml.SyncSGD(batch_size=0)
    with pytest.raises(ValueError, match="features"):
        dml.fit(dml.models.Logistic(3), (X, y), dml.SyncSGD(), steps=1, client=False)


@pytest.mark.parametrize("optimizer", [
    lambda: dml.optim.Adam(lr=0.01, weight_decay=1e-3, schedule=dml.optim.Cosine()),
    lambda: dml.optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda: dml.optim.SGD(lr=0.05)])
def test_updating_slices_gives_the_bits_of_the_whole_update(optimizer):
    """What the sharded replicas rely on: the update is elementwise."""
    from dmlcore.messages import ReplicaState
    from dmlcore.strategies.sync import _update_slice, merge_states, shard_bounds

    rng = np.random.default_rng(0)
    model = dml.models.MLP([13, 7, 3])
    mask = model.weight_mask()
    for dtype in (np.float32, np.float64):
        opt = optimizer()
        opt.set_horizon(10) if hasattr(opt, "set_horizon") else None
        whole = model.init(0, dtype)
        parts = [whole.copy() for _ in range(3)]
        state_whole = opt.init(whole, mask)
        states = [opt.init(p, mask) for p in parts]
        bounds = shard_bounds(whole.shape[0], 3)
        for _ in range(5):
            grad = rng.normal(size=whole.shape).astype(dtype)
            state_whole = opt.update(grad, state_whole, whole)
            for j in range(3):
                lo, hi = bounds[j], bounds[j + 1]
                states[j] = _update_slice(opt, grad[lo:hi], states[j], parts[j], lo, hi)
        for j in range(3):
            np.testing.assert_array_equal(parts[j][bounds[j]:bounds[j + 1]],
                                          whole[bounds[j]:bounds[j + 1]])
        stitched = np.concatenate([parts[j][bounds[j]:bounds[j + 1]] for j in range(3)])
        _, merged = merge_states([ReplicaState(stitched, states[j], bounds[j], bounds[j + 1])
                                  for j in range(3)])
        for name, value in state_whole._asdict().items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(getattr(merged, name), value)
            else:
                assert getattr(merged, name) == value


def test_when_the_replicas_shard_their_exchange():
    from dmlcore.strategies.sync import sharded_exchange

    big, tiny = 328_012, 11 * 4
    assert sharded_exchange(4, big) and sharded_exchange(4, big, one_host=True)
    assert not sharded_exchange(4, tiny)
    assert not sharded_exchange(2, big)                 # across hosts: one round trip
    assert sharded_exchange(2, big, one_host=True)      # one host: half the adding
    assert not sharded_exchange(2, tiny, one_host=True)
    assert not sharded_exchange(2, big, "float16", one_host=True)
    assert not sharded_exchange(1, big, one_host=True)


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_replicas_equal_the_driver_path(n):
    """n workers of one host (reduce-scatter + all-gather): same bits as the
    driver, and 2(n-1) vectors per step; a tiny model uses the full exchange
    (n(n-1) vectors), same bits."""
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(4)
    X = rng.normal(size=(1000, 64)).astype(np.float32)
    y = (X[:, 0] - X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 0.5)
    model = dml.models.MLP([64, 1200, 3])               # 328 kB: sharded on 2 workers too
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        data = dml.partition(X, y, n_partitions=4, seed=0, client=c)
        assert len(set(data.workers())) == n
        runs = {}
        for apply_on in ("driver", "workers"):
            runs[apply_on] = dml.fit(
                model, data, dml.SyncSGD(batch_size=25, apply_on=apply_on),
                dml.optim.Adam(lr=0.02, schedule=dml.optim.Cosine()), epochs=2,
                checkpoint_every=3, checkpoint_dir=None, eval_data=(X, y), eval_every=4,
                client=c, progress=False)
        tiny = dml.models.Logistic(64)
        small = {apply_on: dml.fit(tiny, dml.partition(X, (y > 0).astype(float), 4, seed=0,
                                                       client=c),
                                   dml.SyncSGD(batch_size=25, apply_on=apply_on),
                                   dml.optim.SGD(lr=0.1, momentum=0.9), steps=7, client=c,
                                   progress=False)
                 for apply_on in ("driver", "workers")}
    np.testing.assert_array_equal(small["driver"].params, small["workers"].params)
    assert small["workers"].info["replica_exchange"] == "full"
    assert_payload(small["workers"].history.bytes_sent.values[1],
                   n * (n - 1) * tiny.n_params * 4, n * (n - 1))
    a, b = runs["driver"], runs["workers"]
    assert b.info["replica_exchange"] == "reduce-scatter + all-gather"
    assert "replica_exchange" not in a.info
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.opt_state.m, b.opt_state.m)
    np.testing.assert_array_equal(a.opt_state.v, b.opt_state.v)
    np.testing.assert_array_equal(a.history.loss.values, b.history.loss.values)
    vector = model.n_params * 4
    # steps 2, 3: no sync point; reduce-scatter + all-gather: 2 n(n-1) messages
    assert_payload(b.history.bytes_sent.values[1], 2 * (n - 1) * vector, 2 * n * (n - 1))
    assert_payload(a.history.bytes_sent.values[1], 2 * n * vector, 2 * n)


def test_the_driver_runs_one_blas_thread_during_a_cluster_fit(client):
    # An idle OpenBLAS pool in the driver busy-waits after each call and took
    # a core from a worker on a shared host; the caller's setting comes back.
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})

    import scipy.linalg  # noqa: F401 - every BLAS the fit uses is loaded before `before`

    X, y = logistic_problem()
    for where, during in ((client, [1]), (False, [2])):         # in-process: untouched
        seen = []
        with threadpool_limits(limits=2, user_api="blas"):
            before = blas_threads()
            dml.fit(dml.models.Logistic(X.shape[1]), dml.partition(X, y, client=where),
                    dml.SyncSGD(batch_size=None), dml.optim.LBFGS(max_iter=5), steps=5,
                    client=where, progress=False,
                    callbacks=[lambda step, rec, params: seen.append(blas_threads())])
            assert blas_threads() == before
        assert before == [2] and seen and all(s == during for s in seen)
