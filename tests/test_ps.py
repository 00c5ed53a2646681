"""ParameterServer: BSP == SyncSGD, the SSP bound, async convergence, recovery, fp16, trainable."""
import os
import signal

import numpy as np
import pytest

import dmlcore as dml
from dmlcore.strategies.ps import ParameterServer


def logistic_problem(n=600, d=5, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(dtype)
    w = rng.normal(size=d)
    y = (rng.random(n) < 1 / (1 + np.exp(-(X @ w + 0.3)))).astype(dtype)
    return X, y


def _hosts_a_server():
    from dmlcore.strategies import ps

    return bool(ps._SERVERS)


def _server_worker(client):
    """The worker whose process holds the live parameter server (worker processes)."""
    holders = [w for w, here in client.run(_hosts_a_server).items() if here]
    assert len(holders) == 1, holders
    return holders[0]


def _events(history):
    """The history's events as dicts (variables ``event_<key>`` over ``event``)."""
    names = [v for v in history.data_vars if v.startswith("event_")]
    n = history.sizes.get("event", 0)
    return [{name[len("event_"):]: history[name].values[i].item() for name in names}
            for i in range(n)]


def fit_within(seconds, *args, **kwargs):
    """``dml.fit(*args, **kwargs)`` in a thread under a hard deadline: a fault
    handling that hangs fails the test after ``seconds`` instead of hanging it."""
    import threading

    out = {}

    def run():
        try:
            out["result"] = dml.fit(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="fit-under-deadline")
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the fit did not end within {seconds} s (a hang)"
    if "error" in out:
        raise out["error"]
    return out["result"]


def _kill(client, address):
    """SIGKILL the process of worker ``address``; returns ``address``."""
    os.kill(client.run(os.getpid, workers=[address])[address], signal.SIGKILL)
    return address


def full_loss(model, params, X, y):
    grad = np.empty_like(params)
    return model.loss_grad(params, X, y, grad) / len(y)


def test_bsp_equals_sync_sgd(client):
    """Same batches, same seed, plain SGD: BSP applies exactly SyncSGD's updates."""
    X, y = logistic_problem(n=301)
    data = dml.partition(X, y, n_partitions=3, seed=1, client=client)   # 2 + 1 per worker
    model = dml.models.Logistic(X.shape[1])
    kw = dict(steps=12, seed=7, init_params=np.zeros(model.n_params), client=client,
              progress=False)
    sync = dml.fit(model, data, dml.SyncSGD(batch_size=16), dml.optim.SGD(lr=0.3), **kw)
    ps = dml.fit(model, data, ParameterServer("bsp", batch_size=16), dml.optim.SGD(lr=0.3),
                 **kw)
    np.testing.assert_allclose(ps.params, sync.params, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ps.history.loss.values, sync.history.loss.values, rtol=1e-10)
    assert list(ps.history.step.values) == list(range(1, 13))
    assert np.all(ps.history.staleness.values == 0)
    assert ps.history.partition_updates.values.tolist() == [12, 12, 12]
    assert ps.history.worker_updates.sum() == 36
    assert ParameterServer("bsp", batch_size=16).steps_per_epoch(data) == 7   # ceil(101/16)


def _held_back_run(client, consistency, open_at, steps=40):
    """Partition 0's worker waits at its first mini-batch until the ``open_at``-th
    update has been recorded (a gate opened by a callback, no sleeps)."""
    from distributed import Event
    from gates import GatedLogistic

    X, y = logistic_problem(n=400)
    data = dml.partition(X, y, n_partitions=2, seed=0, client=client)    # one per worker
    held, other = data.workers()
    assert held != other
    gate = Event(f"ps-gate-{consistency}-{os.getpid()}", client=client)
    gate.clear()
    model = GatedLogistic(X.shape[1], worker=held, gate=gate.name)

    def open_gate(step, record, params):
        if step == open_at:
            gate.set()

    strategy = ParameterServer(consistency, staleness=2, batch_size=8)
    result = dml.fit(model, data, strategy, dml.optim.SGD(lr=0.1), steps=steps, client=client,
                     callbacks=[open_gate], progress=False)
    return result, result.history.partition.values.astype(int)


def _clock_gaps(order):
    """After each update: how far partition 1's clock is ahead of partition 0's."""
    counts = np.cumsum(np.stack([order == 0, order == 1]), axis=1)
    return counts[1] - counts[0]


def test_ssp_bounds_staleness_under_a_held_back_worker(client):
    # s = 2: partition 1 pushes clocks 0, 1, 2 and may not pull clock 3 (3 > C + s with
    # C = 0) until partition 0 pushes. The gate opens at the 3rd update, so the 4th must
    # come from partition 0.
    ssp, order = _held_back_run(client, "ssp", open_at=3)
    assert order.shape == (40,)
    assert order[:4].tolist() == [1, 1, 1, 0]
    assert np.abs(_clock_gaps(order)).max() <= 3         # at most s + 1 clocks apart, always
    stale = ssp.history.staleness.values
    assert stale.shape == (40,) and stale.max() <= 2
    counts = ssp.history.partition_updates.values
    assert np.bincount(order, minlength=2).tolist() == counts.tolist()


def test_async_lets_a_fast_worker_run_ahead_of_a_held_back_one(client):
    # Without the bound, partition 1 alone makes the first 20 updates while partition 0
    # waits at the gate: 20 clocks ahead, far beyond s + 1.
    asy, order = _held_back_run(client, "async", open_at=20)
    assert order.shape == (40,)
    assert (order[:20] == 1).all()
    assert _clock_gaps(order)[19] == 20
    counts = asy.history.partition_updates.values
    assert np.bincount(order, minlength=2).tolist() == counts.tolist()


def test_async_converges_to_the_optimum(client):
    from scipy.optimize import minimize

    X, y = logistic_problem(n=2000, d=5, seed=3)
    data = dml.partition(X, y, n_partitions=4, seed=0, client=client)
    model = dml.models.Logistic(X.shape[1])
    optimum = minimize(lambda p: (full_loss(model, p, X, y),
                                  model_grad(model, p, X, y)),
                       np.zeros(model.n_params), jac=True, method="L-BFGS-B").fun
    result = dml.fit(model, data, ParameterServer("async", batch_size=32),
                     dml.optim.SGD(lr=0.2, schedule="cosine"), epochs=4, client=client,
                     progress=False)
    assert result.steps == 4 * 64                       # 4 epochs of 4 x ceil(500 / 32)
    assert full_loss(model, result.params, X, y) < optimum + 0.01


def model_grad(model, params, X, y):
    grad = np.empty_like(params)
    model.loss_grad(params, X, y, grad)
    return grad / len(y)


def test_fp16_transfer_halves_bytes_and_still_trains(client):
    X, y = logistic_problem(n=400, d=20, dtype=np.float32)
    data = dml.partition(X, y, n_partitions=2, seed=0, client=client)
    model = dml.models.Logistic(X.shape[1])
    runs = [dml.fit(model, data, ParameterServer("bsp", batch_size=20, transfer_dtype=t),
                    dml.optim.SGD(lr=0.3), steps=20, client=client, progress=False)
            for t in (None, "float16")]
    full, half = (r.history.bytes_sent.values for r in runs)
    # One remote worker per clock: a pull and a push of 21 values.
    assert np.all(full == 2 * 21 * 4) and np.all(half == 2 * 21 * 2)
    np.testing.assert_allclose(runs[1].params, runs[0].params, rtol=0, atol=5e-3)
    assert runs[1].history.loss.values[-5:].mean() < runs[1].history.loss.values[:5].mean()


def test_trainable_layers_frozen_and_bytes_reduced(client):
    X, y = logistic_problem(n=300, d=6)
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0)
    data = dml.partition(X, y, n_partitions=2, seed=0, client=client)
    model = dml.models.MLP([6, 8, 3])
    init = model.init(0)
    kw = dict(steps=10, init_params=init, client=client, progress=False)
    part = dml.fit(model, data, ParameterServer("bsp", batch_size=16, trainable=["layer1"]),
                   dml.optim.SGD(lr=0.1), **kw)
    full = dml.fit(model, data, ParameterServer("bsp", batch_size=16),
                   dml.optim.SGD(lr=0.1), **kw)
    frozen, trained = model.layer_slices["layer0"], model.layer_slices["layer1"]
    assert np.array_equal(part.params[frozen], init[frozen])
    assert not np.array_equal(part.params[trained], init[trained])
    # Per clock, the worker without the server pulls and pushes once: 2 vectors.
    n_trained = trained.stop - trained.start
    assert np.all(part.history.bytes_sent.values == 2 * n_trained * 8)
    assert np.all(full.history.bytes_sent.values == 2 * model.n_params * 8)


@pytest.fixture
def three_workers():
    """A fresh 3-worker cluster for each kill test (none inherits another's restarted worker)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=3, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    client = Client(cluster)
    client.wait_for_workers(3)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _paced_async_problem(client, seed):
    """(X, y, data on 2 of the workers, a logistic model, async PS paced at
    5 ms a mini-batch, so that a kill lands while the server still trains)."""
    X, y = logistic_problem(n=1200, d=5, seed=seed)
    data = dml.partition(X, y, n_partitions=2, seed=0, client=client)
    strategy = ParameterServer("async", batch_size=16, slow_partitions={0: 0.005, 1: 0.005})
    return X, y, data, dml.models.Logistic(X.shape[1]), strategy


@pytest.mark.slow                   # a fresh 3-process cluster each
def test_server_recreated_after_its_worker_is_killed(three_workers, tmp_path):
    client = three_workers
    X, y, data, model, strategy = _paced_async_problem(client, seed=2)
    killed = {}

    def kill_server(step, record, params):
        if step == 50:
            killed["address"] = _kill(client, _server_worker(client))

    result = fit_within(120, model, data, strategy, dml.optim.SGD(lr=0.2), steps=120,
                        client=client, callbacks=[kill_server], progress=False, timeout=20)
    assert result.steps == 120 and len(result.history.step) == 120
    (recovery,) = _events(result.history)
    assert recovery["worker"] == killed["address"]
    assert recovery["what"] == "parameter server restarted"
    assert recovery["server_worker"] != killed["address"]
    # the driver's last snapshot holds at least the updates the history showed
    # before the kill: the new server resumes from it (no rewind), none is lost
    assert 50 <= recovery["from_update"] < 120
    assert recovery["updates_lost"] == 0 and result.history.updates_lost.sum() == 0
    assert recovery["partitions_dropped"] == "[]"
    assert full_loss(model, result.params, X, y) < 0.9 * np.log(2)
    assert all(r["ended"] == "stopped" for r in result.info["loop_endings"])


@pytest.mark.slow                   # a fresh 3-process cluster each
@pytest.mark.parametrize("whose", ["server", "loop"])
def test_a_worker_lost_after_the_last_update_leaves_the_fit_whole(three_workers, whose):
    """Killed at the last step (the server's worker, or the other loop's): the
    driver holds every update already, so the fit returns them all, and the
    killed worker's loop ending says it was lost."""
    client = three_workers
    X, y, data, model, strategy = _paced_async_problem(client, seed=3)
    killed = {}

    def kill_at_the_end(step, record, params):
        if step == 60:
            server = _server_worker(client)
            address = server if whose == "server" else next(
                w for w in data.workers() if w != server)
            killed["address"] = _kill(client, address)

    result = fit_within(120, model, data, strategy, dml.optim.SGD(lr=0.2), steps=60,
                        client=client, callbacks=[kill_at_the_end], progress=False, timeout=20)
    assert killed and result.steps == 60 and len(result.history.step) == 60
    assert not _events(result.history)
    endings = result.info["loop_endings"]
    assert len(endings) == 2
    lost = [e for e in endings if e["ended"] == "worker lost after the last update"]
    if whose == "loop":
        assert len(lost) == 1 and lost[0]["pushes"] is None
        assert [e["ended"] for e in endings if e not in lost] == ["stopped"]
    else:                           # on the third worker, which holds no partition
        assert not lost and killed["address"] not in data.workers()
        assert all(e["ended"] == "stopped" or e["ended"].startswith("server unreachable")
                   for e in endings)
    assert full_loss(model, result.params, X, y) < full_loss(model, model.init(0), X, y)


@pytest.mark.slow                   # a fresh 3-process cluster each
@pytest.mark.parametrize("source", ["kept", "none"])
def test_partitions_of_a_dead_data_worker_are_rebuilt_or_dropped_and_bsp_goes_on(
        three_workers, source):
    """Scattered partitions die with their worker: they are made again from the
    driver's source on a live worker, or, with no source kept, BSP carries on
    with the others."""
    client = three_workers
    X, y = logistic_problem(n=900, d=5, seed=4)
    data = dml.partition(X, y, n_partitions=3, seed=0, client=client)   # one per worker
    if source == "none":
        data._source = None         # as data that keep no way to rebuild them
    model = dml.models.Logistic(X.shape[1])
    # paced (5 ms a mini-batch), so the kill lands while the server still trains
    strategy = ParameterServer("bsp", batch_size=16, slow_partitions={p: 0.005 for p in range(3)})
    killed = {}

    def kill_data_worker(step, record, params):
        if step == 15:
            placement = data.workers()
            address = next(w for w in placement if w != _server_worker(client))
            killed["partitions"] = [p for p, w in enumerate(placement) if w == address]
            killed["address"] = _kill(client, address)

    result = fit_within(120, model, data, strategy, dml.optim.SGD(lr=0.2), steps=40,
                        client=client, callbacks=[kill_data_worker], progress=False,
                        timeout=20)
    assert len(result.history.step) == 40
    (recovery,) = _events(result.history)
    assert recovery["worker"] == killed["address"]
    assert recovery["updates_lost"] == 0                 # the live server was halted first
    dropped = killed["partitions"] if source == "none" else []
    assert recovery["partitions_dropped"] == str(dropped)
    assert np.all(result.history.staleness.values == 0)
    counts = result.history.partition_updates.values
    for p in range(3):
        assert (counts[p] < 40) == (p in dropped)


@pytest.mark.slow                   # a fresh cluster, grown mid-fit
def test_a_worker_that_joins_mid_fit_starts_pushing():
    """Two workers hold two partitions each; a third joins mid-fit: the server
    halts (exact state), a partition moves to it and its loop pushes."""
    from distributed import Client, LocalCluster

    X, y = logistic_problem(n=1200, d=5, seed=5)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        data = dml.partition(X, y, n_partitions=4, seed=0, client=client)
        before = set(client.nthreads())
        joined = {}

        def grow(step, record, params):
            if step == 40:
                cluster.scale(3)
                client.wait_for_workers(3, timeout=60)
                joined["address"] = (set(client.nthreads()) - before).pop()

        result = fit_within(120, dml.models.Logistic(X.shape[1]), data,
                            ParameterServer("async", batch_size=16,
                                            # 20 ms a push: the loops, not the driver, pace it
                                            slow_partitions={p: 0.02 for p in range(4)}),
                            dml.optim.SGD(lr=0.2), steps=1000, client=client,
                            callbacks=[grow], progress=False, timeout=20)
    assert len(result.history.step) == 1000
    moved = [e for e in _events(result.history) if e["what"] == "loops moved to a joined worker"]
    wall = result.history.wall_time.values
    assert len(moved) == 1, (_events(result.history), wall[40] - wall[0], wall[-1] - wall[0])
    (event,) = moved
    assert event["worker"] == joined["address"] and event["updates_lost"] == 0
    assert event["partitions_moved"] != ""
    updates = result.history.worker_updates
    assert int(updates.sel(worker_address=joined["address"])) > 0
    assert result.history.updates_lost.sum() == 0


def test_the_server_moves_off_a_slow_worker_and_nothing_is_lost(client):
    # The server starts on the first worker (both hold one partition); that worker's
    # partition sleeps 20 ms per mini-batch, so its loop computes far more slowly than
    # the other's and the server moves, once, from the exact halted state.
    X, y = logistic_problem(n=800, d=5, seed=4)
    data = dml.partition(X, y, n_partitions=2, seed=0, client=client)
    first = sorted(client.nthreads())[0]
    slow = [p for p, w in enumerate(data.workers()) if w == first]
    model = dml.models.Logistic(X.shape[1])
    steps = 1500
    result = fit_within(120, model, data,
                        ParameterServer("async", batch_size=8,
                                        slow_partitions={p: 0.02 for p in slow}),
                        dml.optim.SGD(lr=0.05), steps=steps, client=client, progress=False)
    moves = [e for e in _events(result.history) if e["what"] == "server moved off a slow worker"]
    assert len(moves) == 1
    assert moves[0]["worker"] == first and moves[0]["server_worker"] != first
    assert result.steps == steps and result.history.sizes["step"] == steps
    assert (result.history.updates_lost.values == 0).all()
    assert full_loss(model, result.params, X, y) < full_loss(model, model.init(0), X, y)
    # without a slow worker the server stays where it started
    still = dml.fit(model, data, ParameterServer("async", batch_size=8), dml.optim.SGD(lr=0.05),
                    steps=steps, client=client, progress=False)
    assert not [e for e in _events(still.history) if e["what"].startswith("server moved")]


def _bsp_server(P=2, n=4):
    from dmlcore.strategies.ps import _Server

    optimizer, values = dml.optim.SGD(lr=1.0), np.zeros(n)
    return _Server(token=f"test-{os.getpid()}-{P}", consistency="bsp", staleness=0,
                   optimizer=optimizer, values=values, opt_state=optimizer.init(values),
                   clocks=np.zeros(P), active=np.ones(P, dtype=bool), count=0, stop_at=100,
                   transfer=None, remote_slots=[1])


def _push(pid, clock, grad):
    from dmlcore.messages import Push

    return Push(pid, clock, 0.0, 1.0, "sum", np.asarray(grad, dtype=np.float64), 0.0)


def test_server_thread_and_coroutine_callers_wake_each_other():
    """The loop thread on the server's worker (``exchange_here``) and the actor's
    coroutines (``exchange``, on the event loop) share one state: a pull held
    back by BSP in one wakes when the other pushes the clock it waits for."""
    import asyncio
    import threading

    from dmlcore.messages import Pull
    from dmlcore.strategies.ps import _SERVERS

    server = _bsp_server()
    try:
        async def main():
            # a coroutine waits (partition 1 at clock 1 after its push) until the thread pushes
            waiter = asyncio.ensure_future(server.exchange(1, _push(1, 0, [1, 0, 0, 0]), 1, -1))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            answers = {}
            thread = threading.Thread(target=lambda: answers.setdefault(
                "thread", server.exchange_here(0, _push(0, 0, [0, 1, 0, 0]), 0, -1)))
            thread.start()
            reply = await asyncio.wait_for(waiter, 0.9)
            thread.join(1)
            assert isinstance(reply, Pull) and isinstance(answers["thread"], Pull)
            np.testing.assert_allclose(reply.values, [-.5, -.5, 0, 0])   # the mean of 2 rows, lr 1
            assert server.count == 1 and reply.version == 1
            # now the thread waits (clock 1 -> 2) and the coroutine's push releases it
            thread = threading.Thread(target=lambda: answers.update(
                second=server.exchange_here(0, _push(0, 1, [0, 0, 2, 0]), 0, 1)))
            thread.start()
            await asyncio.sleep(0.05)
            assert thread.is_alive()
            await server.exchange(1, _push(1, 1, [0, 0, 0, 2]), 1, 1)
            thread.join(1)
            assert not thread.is_alive()
            np.testing.assert_allclose(answers["second"].values, [-.5, -.5, -1, -1])
            snap = await server.halt()
            assert snap.count == 2 and len(snap.updates) == 2

        asyncio.run(main())
    finally:
        _SERVERS.pop(server.token, None)


def test_server_pull_waits_at_most_the_wait_bound_in_both_callers(monkeypatch):
    """A held-back pull answers "wait" after ``_MAX_WAIT`` from either caller."""
    import asyncio
    import time

    from dmlcore.strategies import ps

    monkeypatch.setattr(ps, "_MAX_WAIT", 0.1)
    server = _bsp_server()
    try:
        t0 = time.monotonic()
        assert server.exchange_here(0, _push(0, 0, [1, 0, 0, 0]), 0, -1) == ps._WAIT
        assert asyncio.run(server.exchange(0, None, 0, -1)) == ps._WAIT
        assert time.monotonic() - t0 < 1.0
    finally:
        ps._SERVERS.pop(server.token, None)
