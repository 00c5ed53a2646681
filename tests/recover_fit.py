"""Recovery runs for tests/test_recovery.py: one fit undisturbed, then the same
fit with one of three `dask worker --no-nanny` processes SIGKILLed mid-fit
(case ``nanny``: a LocalCluster's worker, which its nanny restarts).

Run as ``python tests/recover_fit.py CASE LOGDIR`` with ``tests/`` on
``PYTHONPATH`` (the workers import this module to unpickle the model). CASE is
one of ``CASES``. It prints one JSON line: whether the final parameters are
bit-identical, their largest difference, both final losses, the events the
disturbed fit's history holds, when the worker was killed (``time.time()``),
and how long each fit took.
"""
import contextlib
import json
import os
import signal
import sys
import tempfile
import time

import numpy as np

import dmlcore as dml
from dask_processes import dask_processes

N_WORKERS, N_PARTITIONS, STEPS = 3, 6, 48

# case -> (model kind, strategy keywords, optimizer)
CASES = {
    "replicas": ("softmax", dict(batch_size=16), "adam"),
    "driver": ("softmax", dict(batch_size=16, apply_on="driver"), "adam"),
    "local_steps": ("softmax", dict(batch_size=16, local_steps=4), "sgd"),
    "lbfgs": ("logistic", dict(batch_size=None), "lbfgs"),
    # a LocalCluster's nanny restarts the killed worker (a new address joins)
    "nanny": ("softmax", dict(batch_size=16), "adam"),
    # a worker retired (client.retire_workers) mid-fit: Dask moves its data first
    "retire": ("softmax", dict(batch_size=16), "adam"),
    # a third worker joins mid-fit: used from the next epoch on
    "join": ("softmax", dict(batch_size=16), "adam"),
    # a third worker joins a FedAvg run: it gets clients from the next round on
    "fedavg_join": ("softmax", dict(clients_per_round=1.0, batch_size=16), "sgd"),
    # the victim dies while the pool starts (unpickling its executor's model)
    "at_start": ("softmax", dict(batch_size=16), "adam"),
    # FedAvg: the victim's clients are dropped for its round, then move
    "fedavg": ("softmax", dict(clients_per_round=1.0, batch_size=16), "sgd"),
}
ROUNDS, KILL_ROUND = 8, 3


class KilledSoftmax(dml.models.Softmax):
    """``Softmax`` that SIGKILLs its own process at its ``at_call``-th
    ``loss_grad`` in the process ``victim_pid`` (time written to ``stamp``)."""

    victim_pid, at_call, stamp = -1, 0, ""

    def loss_grad(self, params, X, y, grad, trainable=None, sample_weight=None):
        _maybe_die(self)
        return super().loss_grad(params, X, y, grad, trainable=trainable,
                                 sample_weight=sample_weight)

    def __setstate__(self, state):
        """``at_call = 0``: die as soon as the victim unpickles the model (the
        fit's pool is starting: its executors' actors are being made)."""
        self.__dict__.update(state)
        if self.at_call == 0 and os.getpid() == self.victim_pid:
            _die(self.stamp)


class KilledLogistic(dml.models.Logistic):
    """``Logistic`` with the same kill switch as ``KilledSoftmax``."""

    victim_pid, at_call, stamp = -1, 0, ""

    def loss_grad(self, params, X, y, grad, trainable=None, sample_weight=None):
        _maybe_die(self)
        return super().loss_grad(params, X, y, grad, trainable=trainable,
                                 sample_weight=sample_weight)


def _maybe_die(model):
    if os.getpid() == model.victim_pid:
        model._calls = getattr(model, "_calls", 0) + 1
        if model._calls == model.at_call:
            _die(model.stamp)


def _die(stamp):
    """Write ``time.time()`` to ``stamp``, then SIGKILL this process."""
    with open(stamp, "w") as f:
        f.write(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def _problem(kind):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1800, 12))
    if kind == "softmax":
        y = np.argmax(X @ rng.normal(size=(12, 4)) + rng.gumbel(size=(1800, 4)), axis=1)
        return X, y, KilledSoftmax(12, 4)
    y = (X @ rng.normal(size=12) + rng.logistic(size=1800) > 0).astype(np.float64)
    return X, y, KilledLogistic(12)


class _AtStep:
    """A callback that runs ``action()`` once, at step ``step`` (a sync point)."""

    sync_every = 4

    def __init__(self, step, action):
        self.step, self.action = step, action

    def __call__(self, step, record, params):
        if step == self.step:
            self.action()


def _fit(model, data, case, client, callbacks=()):
    kind, keywords, opt = CASES[case]
    optimizer = {"adam": dml.optim.Adam(lr=0.02), "sgd": dml.optim.SGD(lr=0.1),
                 "lbfgs": dml.optim.LBFGS()}[opt]
    if case.startswith("fedavg"):
        strategy, steps = dml.FedAvg(**keywords), ROUNDS
    else:
        strategy, steps = dml.SyncSGD(**keywords), 30 if opt == "lbfgs" else STEPS
    t0 = time.perf_counter()
    result = dml.fit(model, data, strategy, optimizer, steps=steps, callbacks=callbacks,
                     client=client, progress=False, timeout=20.0, seed=3)
    return result, time.perf_counter() - t0


@contextlib.contextmanager
def _cluster(case, logdir):
    """``(scheduler address, DaskProcesses or None)`` of three single-threaded worker
    processes (two for the ``join`` cases: the third joins mid-fit)."""
    if case != "nanny":
        n = N_WORKERS - 1 if case.endswith("join") else N_WORKERS
        with dask_processes(logdir, [([], None)] * n, worker_args=["--no-nanny"]) as procs:
            yield procs.address, procs
        return
    from distributed import LocalCluster

    with LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address, None


def main(case, logdir):
    from distributed import Client

    from dmlcore.recovery import RecoveringPool

    RecoveringPool.check_interval = 0.0     # every boundary asks: these fits last a second

    kind = CASES[case][0]
    X, y, model = _problem(kind)
    stamp = os.path.join(logdir, "killed_at")
    with _cluster(case, logdir) as (address, procs), Client(address, timeout=30) as client:
        data = dml.partition(X, y, n_partitions=N_PARTITIONS, seed=0, client=client)
        calm, calm_s = _fit(model, data, case, client)
        pids = client.run(os.getpid)
        victim = sorted(pids)[1]
        callbacks, joined = [], []
        if case == "retire":
            def retire():
                with open(stamp, "w") as f:
                    f.write(repr(time.time()))
                client.retire_workers([victim], close_workers=True)
            callbacks = [_AtStep(STEPS // 2, retire)]
        elif case.endswith("join"):
            def join():
                with open(stamp, "w") as f:
                    f.write(repr(time.time()))
                procs.start_worker()                # ended with the others
                client.wait_for_workers(N_WORKERS, timeout=60)
                joined.append(sorted(set(client.nthreads()) - set(pids))[0])
            callbacks = [_AtStep(2 if case == "fedavg_join" else 8, join)]
        else:
            model.victim_pid, model.stamp = pids[victim], stamp
        # two partitions per executor: two loss_grad calls a step (L-BFGS: an evaluation);
        # FedAvg: each of its two clients takes one call per local batch
        if case == "fedavg":
            per_round = 2 * -(-(len(X) // N_PARTITIONS) // CASES[case][1]["batch_size"])
            model.at_call = per_round * KILL_ROUND + 5
        elif case == "at_start":
            model.at_call = 0
        else:
            model.at_call = 2 * (7 if case == "lbfgs" else STEPS // 2) + 1
        hit, hit_s = _fit(model, data, case, client, callbacks)
        if case.endswith("join"):
            victim = joined[0] if joined else None
        history = hit.history
        events = {name[len("event_"):]: [v.item() for v in history[name].values]
                  for name in history.data_vars if name.startswith("event_")}
        out = {
            "case": case, "victim": victim,
            "identical": bool(np.array_equal(calm.params, hit.params)),
            "max_abs_diff": float(np.max(np.abs(calm.params - hit.params))),
            "loss_calm": float(calm.history["loss"].values[-1]),
            "loss_hit": float(hit.history["loss"].values[-1]),
            "steps": [int(calm.history["step"].values[-1]), int(hit.history["step"].values[-1])],
            "events": events,
            "killed_at": float(open(stamp).read()) if os.path.exists(stamp) else None,
            "seconds": [calm_s, hit_s],
            "workers_left": sorted(client.nthreads()),
            "losses": [calm.history["loss"].values.tolist(), hit.history["loss"].values.tolist()],
        }
        for name in ("participants", "failed", "sampled"):
            if name in history:
                out[name] = history[name].values.astype(int).tolist()
        with tempfile.TemporaryDirectory() as tmp:     # the events survive the netCDF file
            path = os.path.join(tmp, "history.nc")
            history.to_netcdf(path)
            import xarray as xr
            with xr.open_dataset(path) as back:
                out["events_in_file"] = [str(v) for v in back["event_worker"].values] \
                    if "event_worker" in back else []
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
