"""Fault injection for tests/test_faults.py: a model that fails on one worker,
and the script that runs one fit in a fresh process.

Run as ``python tests/faulty.py ACTION APPLY_ON OPTIMIZER`` (OPTIMIZER ``ps``: the
parameter server, SSP) with ``tests/`` on
``PYTHONPATH`` (the workers import this module to unpickle the model). It
prints one JSON line: the error's type and message, the seconds ``fit`` took
to raise, and the victim worker's address.
"""
import json
import os
import signal
import sys
import time

import numpy as np

import dmlcore as dml


class FaultyLogistic(dml.models.Logistic):
    """``Logistic`` whose ``loss_grad`` fails at its ``at_call``-th call in the
    process ``victim_pid``: ``action="raise"`` raises MemoryError,
    ``action="stop"`` SIGSTOPs the process."""

    victim_pid, at_call, action = -1, 20, "raise"

    def loss_grad(self, params, X, y, grad, trainable=None):
        if os.getpid() == self.victim_pid:
            self._calls = getattr(self, "_calls", 0) + 1
            if self._calls == self.at_call:
                if self.action == "raise":
                    raise MemoryError(f"injected at call {self._calls}")
                os.kill(os.getpid(), signal.SIGSTOP)
        return super().loss_grad(params, X, y, grad, trainable=trainable)


def main(action, apply_on, optimizer, timeout=5.0):
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 5))
    y = (X @ rng.normal(size=5) > 0).astype(np.float64)
    out = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        data = dml.partition(X, y, n_partitions=2, seed=0, client=c)
        pids = c.run(os.getpid)
        victim = sorted(pids)[1]
        model = FaultyLogistic(X.shape[1])
        model.victim_pid, model.action = pids[victim], action
        if optimizer == "ps":            # the parameter server's loops, SSP(2)
            from dmlcore.strategies.ps import ParameterServer
            strategy, opt = ParameterServer("ssp", batch_size=10), dml.optim.SGD(lr=0.1)
        elif optimizer == "lbfgs":
            model.at_call = 5
            strategy, opt = dml.SyncSGD(batch_size=None), dml.optim.LBFGS()
        else:
            strategy, opt = dml.SyncSGD(batch_size=10, apply_on=apply_on), dml.optim.SGD(lr=0.1)
        t0 = time.perf_counter()
        try:
            dml.fit(model, data, strategy, opt, steps=200, client=c, progress=False,
                    timeout=timeout)
            out = {"type": None, "message": "fit returned"}
        except BaseException as exc:  # noqa: BLE001 — reported to the test
            out = {"type": type(exc).__name__, "message": str(exc)}
        out["seconds"] = time.perf_counter() - t0
        out["victim"] = victim
        if action == "stop":
            os.kill(pids[victim], signal.SIGKILL)    # our own worker process
        print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main(*sys.argv[1:4])
