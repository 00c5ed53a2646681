"""Synchronous data-parallel SGD (DDP semantics), local SGD, and full-batch L-BFGS.

One step: broadcast the trainable parameters once per worker, compute on every
partition where it lives the SUM of (loss, gradient) over ``batch_size`` rows
(all rows when ``batch_size=None``), sum the partials — first on each worker,
then across workers with fan-in ``fan_in`` — divide once by the row count and
apply the optimizer on the driver. The effective batch is ``batch_size`` times
the number of partitions.

``local_steps=k`` (local SGD): every partition runs k optimizer steps on its
own mini-batches from the broadcast parameters, and the driver replaces the
parameters by the row-weighted average of the partitions' results: one round
trip per k steps.

With ``optimizer=dml.optim.LBFGS(...)`` (full batch only) every function
evaluation, line-search trials included, is ONE tree-reduced (loss, gradient)
round trip; each L-BFGS iteration is one step of the history.

``transport``: ``"actors"`` (default) runs the per-worker sums in executors
pinned to the workers that hold the partitions and calls them over direct
sockets (``channel``; Dask actor calls where workers are not on TCP);
``"actor-calls"``: the same executors, called through Dask only (for
firewalls that allow only Dask's ports; the optimizer then runs on the
driver); ``"tasks"`` submits one Dask task per partition and reduces them with
``aggregate.tree_reduce`` (a scheduler round per step, much slower, but the
partials survive worker loss through the scheduler).

``apply_on``: where the optimizer runs for mini-batch SGD/Adam with the
actors transport. ``"driver"``: each step is a round trip, driver -> workers
(parameters) -> driver (partials), the driver adds and updates. ``"workers"``
(default; DDP): every executor holds a replica of the trainable parameters
and the optimizer state and exchanges its partial sums directly with the
other executors (``channel.PeerMesh``); the sums are added in executor order
and the same update applied, so all replicas stay bit-identical to each other
and to the ``"driver"`` path. With more than two executors and a large
enough vector the exchange is a reduce-scatter + all-gather in which each
executor updates its own slice (2(n-1) vectors moved per step instead of
n(n-1); see ``executors.sharded_exchange``). The driver is off the step's
critical path: it starts a run of steps and fetches the parameters and state
back only at the steps where it needs them (``RunContext.sync_every``:
evaluations, checkpoints, callbacks, epoch ends); when that is every step,
the ``"driver"`` path runs instead (same bits, a driver round trip per step).
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from .. import local
from ..aggregate import add_partials, tree_reduce
from ..executors import ExecutorPool, merge_states, sharded_exchange
from ..optim import LBFGS
from .base import Strategy


def _partition_loss_grad(model, values, frozen, X, y, w, step, batch_size, seed, pid, trainable):
    """Task body of the "tasks" transport: one partition's (loss, grad, rows) sums."""
    if trainable is None:
        params = values
    else:
        params = frozen.copy()
        params[local.trainable_index(model, trainable)] = values
    rows = local.batch_slice(X.shape[0], batch_size, step, seed, pid)
    return local.loss_grad_sum(model, params, X, y, rows, trainable, w=w)


class SyncSGD(Strategy):
    """Synchronous data-parallel training; see the module docstring."""

    name = "sync"
    # what the workflow runner needs of a registered kind (``dmlcore.workflow.build``)
    unit = "steps"                    # what train.steps counts
    optimizer_keys = ()               # keywords that hold a {kind: ...} optimizer

    @classmethod
    def full_batch(cls, config):
        """Whether ``config`` computes every step on all rows (what a batch solver needs)."""
        return config.get("batch_size") is None and config.get("local_steps", 1) == 1

    def __init__(self, batch_size=None, fan_in=4, local_steps=1, transport="actors",
                 trainable=None, apply_on="workers"):
        super().__init__(trainable)
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
        if int(fan_in) < 2:
            raise ValueError(f"fan_in must be >= 2, got {fan_in}")
        if int(local_steps) < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        if transport not in ("actors", "actor-calls", "tasks"):
            raise ValueError(f"transport {transport!r} is not one of actors, actor-calls, tasks")
        if transport == "tasks" and local_steps > 1:
            raise ValueError("local_steps > 1 needs transport='actors' or 'actor-calls'")
        if apply_on not in ("workers", "driver"):
            raise ValueError(f"apply_on {apply_on!r} is not one of workers, driver")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.fan_in = int(fan_in)
        self.local_steps = int(local_steps)
        self.transport = transport
        self.apply_on = apply_on

    def default_optimizer(self):
        """Full batch: L-BFGS; mini-batches: Adam."""
        return LBFGS() if self.batch_size is None else super().default_optimizer()

    def steps_per_epoch(self, data):
        batches = max(local.n_batches(int(n), self.batch_size) for n in data.partition_sizes)
        return -(-batches // self.local_steps)

    # ---- the loop ----------------------------------------------------------
    def run(self, ctx):
        if isinstance(ctx.optimizer, LBFGS):
            if self.batch_size is not None or self.local_steps != 1:
                raise ValueError("LBFGS needs SyncSGD(batch_size=None, local_steps=1)")
            yield from self._run_lbfgs(ctx)
            return
        evaluate, pool, close = self._evaluator(ctx)
        try:
            # replicas pay off between sync points; syncing every step (a callback
            # without ``sync_every``, one step per epoch) is the driver path's job
            if (self.apply_on == "workers" and pool is not None and pool.channels
                    and self.local_steps == 1 and ctx.sync_every > 1):
                yield from self._run_replicated(ctx, pool)
                return
            for step in range(ctx.start_step, ctx.total_steps):
                values = ctx.trainable_values()
                if self.local_steps == 1:
                    loss, grad, rows, nbytes = evaluate(values, step)
                    grad /= local.mean_divisor(rows)
                    ctx.opt_state = ctx.optimizer.update(grad, ctx.opt_state, values)
                else:
                    values, loss, rows, nbytes = self._local_round(ctx, pool, values, step)
                ctx.set_trainable_values(values)
                yield {"loss": loss / local.mean_divisor(rows), "bytes_sent": nbytes}
        finally:
            close()

    def _evaluator(self, ctx):
        """``(evaluate, pool, close)``; ``evaluate(values, step) -> (loss sum, grad sum, rows, bytes)``."""
        model, data, client = ctx.model, ctx.data, ctx.client
        vbytes = ctx.trainable_values().nbytes
        if self.transport != "tasks" or client is None:
            pool = ExecutorPool(model, data, client, direct=self.transport == "actors",
                                timeout=ctx.timeout)
            if ctx.trainable is not None:
                pool.call("configure", ctx.params, ctx.trainable)
            crossing = 0 if client is None else 2 * vbytes * len(pool)

            def evaluate(values, step):
                loss, grad, rows = add_partials(
                    *pool.call("loss_grad", values, step, self.batch_size, ctx.seed))
                return loss, grad, rows, crossing

            return evaluate, pool, pool.close

        parts = data.partition_futures()
        workers = data.workers()
        frozen = client.scatter(ctx.params, broadcast=True) if ctx.trainable else None
        n_workers = len(set(workers))

        def evaluate(values, step):
            futures = [client.submit(_partition_loss_grad, model, values, frozen, X, y, w, step,
                                     self.batch_size, ctx.seed, pid, ctx.trainable,
                                     workers=[workers[pid]], pure=False)
                       for pid, (X, y, w) in enumerate(parts)]
            loss, grad, rows = tree_reduce(client, futures, self.fan_in,
                                           workers=workers).result()
            return loss, grad, rows, vbytes * (len(parts) + n_workers)

        return evaluate, None, lambda: None

    def _run_replicated(self, ctx, pool):
        """The ``apply_on="workers"`` loop: runs of steps between sync points."""
        pool.connect_mesh()
        values = ctx.trainable_values()
        n = len(pool)
        sharded = sharded_exchange(n, values.nbytes)
        # bytes per step: see PartitionExecutor.replica_steps
        per_step = (2 * (n - 1) if sharded else n * (n - 1)) * values.nbytes
        state_bytes = values.nbytes + sum(
            v.nbytes for v in ctx.opt_state if isinstance(v, np.ndarray))
        pool.call("start_replica", values, ctx.optimizer, ctx.opt_state)
        handoff = n * state_bytes                   # the driver's state to every replica
        step, every = ctx.start_step, max(int(ctx.sync_every), 1)
        while step < ctx.total_steps:
            end = min((step // every + 1) * every, ctx.total_steps)
            t0 = time.perf_counter()
            # each of the executors' exchanges has the deadline; the run of steps
            # as a whole gets it once per step
            results = pool.call("replica_steps", step, end - step, self.batch_size, ctx.seed,
                                wait=ctx.timeout * (end - step))
            losses, ends = results[0]
            if sharded:                             # each replica owns a slice of the state
                pieces = pool.call("replica_state")
            else:
                pieces = pool.results([pool.submit_one(0, "replica_state")])
            new_values, ctx.opt_state = merge_states(pieces)
            handoff += state_bytes * len(pieces)
            for i, (loss, t) in enumerate(zip(losses, ends)):
                record = {"loss": loss, "bytes_sent": per_step, "_time": t0 + t}
                if i == 0:
                    record["bytes_sent"] += handoff
                    handoff = 0
                if i == len(losses) - 1:
                    ctx.set_trainable_values(new_values)
                yield record
            step = end

    def _local_round(self, ctx, pool, values, step):
        results = pool.call("local_train", values, ctx.optimizer, round_=step,
                            local_steps=self.local_steps, batch_size=self.batch_size,
                            seed=ctx.seed)
        failed = [f for r in results for f in r[5]]
        if failed:
            raise RuntimeError(f"local training failed on partition {failed[0][0]}: "
                               f"{failed[0][1]}")
        weighted, weight, loss, rows = add_partials(*[r[:4] for r in results])
        new = (weighted / local.mean_divisor(weight)).astype(values.dtype)
        nbytes = 0 if ctx.client is None else 2 * values.nbytes * len(pool)
        return new, loss, rows, nbytes

    def _run_lbfgs(self, ctx):
        """Drive scipy's L-BFGS-B in a thread; yield one record per iteration."""
        evaluate, _, close = self._evaluator(ctx)
        records: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        spent = {"bytes": 0}
        idx = ctx.trainable_idx
        mask = ctx.model.weight_mask()
        mask = mask if idx is None else mask[idx]
        max_iter = ctx.total_steps - ctx.start_step
        solver = LBFGS(max_iter=max_iter, tol=ctx.optimizer.tol, history=ctx.optimizer.history,
                       weight_decay=ctx.optimizer.weight_decay, ftol=ctx.optimizer.ftol)

        def loss_grad(values):
            loss, grad, rows, nbytes = evaluate(values, 0)
            spent["bytes"] += nbytes
            rows = local.mean_divisor(rows)
            return loss / rows, grad / rows

        def callback(x, loss):
            if stop.is_set():
                raise StopIteration
            records.put(("step", x, loss))

        def solve():
            try:
                result = solver.minimize(loss_grad, ctx.trainable_values().copy(),
                                         decay_mask=mask, callback=callback)
                records.put(("done", result, None))
            except BaseException as exc:  # handed to the consumer
                records.put(("error", exc, None))

        thread = threading.Thread(target=solve, name="dmlcore-lbfgs", daemon=True)
        thread.start()
        try:
            while True:
                kind, payload, loss = records.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    self.lbfgs_result_ = payload
                    break
                ctx.set_trainable_values(payload)
                nbytes, spent["bytes"] = spent["bytes"], 0
                yield {"loss": float(loss), "bytes_sent": nbytes}
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    records.get(timeout=0.05)
                except queue.Empty:
                    pass
            close()
