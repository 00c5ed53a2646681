"""Synchronous data-parallel SGD (DDP semantics), local SGD, and full-batch L-BFGS.

One step: every partition computes, where it lives, the SUM of (loss,
gradient) over ``batch_size`` rows (all rows for ``batch_size=None``); the
partials are summed on each worker, then across workers (fan-in ``fan_in``),
divided once by the row count (total weight), and one optimizer update is
applied. The effective batch is ``batch_size`` x partitions.

* ``local_steps=k``: k steps per partition, then the row-weighted average.
* A batch solver (``optim.LBFGS``, full batch only): every function
  evaluation is ONE tree-reduced round trip; one iteration = one step.
* ``transport``: ``"actors"`` (executors called over ``channel`` sockets),
  ``"actor-calls"`` (through Dask only; driver-side updates), ``"tasks"`` (a
  Dask task per partition, ``aggregate.tree_reduce``).
* ``apply_on="workers"`` (default, DDP): each executor keeps a replica of the
  trainable values and optimizer state and exchanges partial sums with the
  others over a ``PeerMesh`` (``sharded_exchange``), adding them in executor
  order: every replica stays bit-identical to the ``"driver"`` path. Replica
  runs end where the driver needs the state (``RunContext.next_sync``).
* ``compression``: each executor encodes its own partial (top-k's residual
  kept on it); receivers decode and add in executor order (no sharding).
  Top-k with SGD momentum moves the momentum into the senders (momentum
  correction, ``compression.momentum_correction``).
* A lost worker: its executors are re-made and the run since the last sync
  point redone, with the same bits (``dmlcore.recovery``).
* ``bytes_sent``: the frames the transport counted (channels and mesh).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from .. import compression as codecs
from .. import local
from ..aggregate import add_partials, tree_reduce
from ..executors import ExecutorPool, hosted
from ..messages import Partial, ReplicaRun, ReplicaState
from ..optim import LBFGS
from ..recovery import RecoveringPool
from .base import Strategy
from .fedavg import client_sums, client_train  # noqa: F401 - local SGD is FedAvg's client step

logger = logging.getLogger("dmlcore.sync")


# ----------------------------------------------------------------------------
# The replicated step (apply_on="workers"), hosted by every executor
# ----------------------------------------------------------------------------
def sharded_exchange(n, nbytes, compression=None, one_host=False):
    """Whether ``n`` replicas of an ``nbytes`` vector use reduce-scatter +
    all-gather (two rounds, 2(n-1) vectors) rather than a full exchange of
    gradients (one round, n(n-1) vectors). Above two replicas, sharding wins
    once the extra vectors cost more than a round, taken here as 64 KiB per
    executor. Two replicas move the same bytes either way; sharding halves
    what each adds and updates (about 0.2 ms a step for a 0.8 MB vector on
    one host) at the price of a second round trip, which is cheap between
    processes of one host (``one_host``) and not across a network: there it
    shards from 256 KiB. Compressed gradients travel whole (each sender
    encodes its own vector): never sharded."""
    if compression is not None or n < 2:
        return False
    if n == 2:
        return bool(one_host) and nbytes >= 1 << 18
    return (n - 2) * nbytes > 1 << 16


def shard_bounds(size, n):
    """Boundaries of n near-equal contiguous slices of range(size): n + 1 ints."""
    return [size * j // n for j in range(n + 1)]


def _per_parameter(state, size):
    """Names of the fields of an optimizer state that hold one entry per parameter."""
    return [name for name, value in state._asdict().items()
            if isinstance(value, np.ndarray) and value.shape == (size,)]


def _update_slice(optimizer, grad, state, values, lo, hi):
    """``optimizer.update`` on values[lo:hi] (in place) with the matching slices
    of the state; returns the whole state with its step advanced. The update is
    elementwise, so slices give the same bits as the whole vector."""
    size = values.shape[0]
    if (lo, hi) == (0, size):
        return optimizer.update(grad, state, values)
    names = _per_parameter(state, size)
    sliced = state._replace(**{name: getattr(state, name)[lo:hi] for name in names})
    new = optimizer.update(grad, sliced, values[lo:hi])
    return new._replace(**{name: getattr(state, name) for name in names})


def merge_states(pieces):
    """``(values, optimizer state)`` from each replica's ``ReplicaState``:
    per-parameter fields taken slice by slice from their owners."""
    values, state = pieces[0].values, pieces[0].opt_state
    names = _per_parameter(state, values.shape[0])
    merged = {name: np.empty_like(getattr(state, name)) for name in names}
    for piece in pieces:
        for name in names:
            merged[name][piece.lo:piece.hi] = getattr(piece.opt_state, name)[piece.lo:piece.hi]
    return values, state._replace(**merged)


def _sender(executor):
    """An executor's id among its peers' (its first partition): int8's random stream."""
    return min(pid for pid, *_ in executor.parts)


def _add_in_order(grads, out):
    """``out`` = grads[0] + grads[1] + ... (each decoded, ``dmlcore.compression``),
    added in executor order: the driver path's and every replica's bits."""
    codecs.decode_into(grads[0], out)
    for grad in grads[1:]:
        codecs.decode_into(grad, out, add=True)
    return out


def _sums(partials, dtype):
    """The executors' ``Partial``s (gradients encoded or not) decoded and added in order."""
    first = codecs.decode(partials[0].grad, dtype)
    grad = _add_in_order([first] + [p.grad for p in partials[1:]], np.empty_like(first))
    return Partial(sum(p.loss for p in partials), grad, sum(p.rows for p in partials))


class _Replica:
    """An executor's copy of the trainable values and optimizer state, and the
    slice [lo, hi) of them it updates (all of it when the exchange is full);
    ``compressor``: its gradients' encoder, or None."""

    def __init__(self, values, optimizer, opt_state, mesh, compression=None, seed=0,
                 momentum=0.0, sharded=False):
        self.values, self.optimizer, self.state = np.array(values, copy=True), optimizer, opt_state
        size, n = self.values.shape[0], mesh.size
        self.compressor = (None if compression is None
                           else codecs.Compressor(compression, seed, momentum))
        self.sharded = bool(sharded)
        self.bounds = shard_bounds(size, n)
        me = mesh.index
        self.lo, self.hi = (self.bounds[me], self.bounds[me + 1]) if self.sharded else (0, size)


@hosted
def replica_start(executor, values, optimizer, opt_state, compression=None, seed=0,
                  momentum=0.0, sharded=False):
    """Take the driver's trainable values and optimizer state as this replica's;
    ``compression``: how its partial gradients travel (a ``compression.parse``
    spec), ``momentum``: its top-k momentum correction (0 for none),
    ``sharded``: the driver's ``sharded_exchange`` decision (the same for all)."""
    executor.run_state = _Replica(values, optimizer, opt_state, executor.mesh,
                                  compression, seed, momentum, sharded)
    return True


@hosted
def compressed_loss_grad(executor, values, step, batch_size, seed, compression, momentum=0.0):
    """``loss_grad`` with the gradient encoded by this executor's ``Compressor``
    for ``compression`` and ``momentum`` (kept in ``run_state``, so top-k's
    residual and velocity carry over)."""
    state = executor.run_state
    if (not isinstance(state, codecs.Compressor) or state.spec != codecs.parse(compression)
            or state.momentum != float(momentum)):
        state = executor.run_state = codecs.Compressor(compression, seed, momentum)
    mine = executor.loss_grad(values, step, batch_size, seed)
    return mine._replace(grad=state.encode(mine.grad, (step, _sender(executor))))


@hosted
def replica_steps(executor, first_step, n_steps, batch_size, seed):
    """Run ``n_steps`` synchronous steps on the replica; a ``ReplicaRun``.

    A step: the local sums, then the exchange ``sharded_exchange`` picks. Both
    add the partial gradients in executor order (the driver's order, so the
    driver-applied path gets the same bits), divide by the rows and apply the
    optimizer:
    * full: every executor sends its whole gradient to every other and
      updates the whole vector (one round; n(n-1) vectors move);
    * sharded (ZeRO-1 style reduce-scatter + all-gather): executor j owns
      slice j (``shard_bounds``), receives every peer's gradient on it,
      updates that slice of the parameters and of the optimizer state, and
      sends the new slice to every peer (two rounds; 2(n-1) vectors move).
    An error closes the mesh, so the peers stop waiting at once.
    """
    try:
        return _replica_steps(executor, executor.run_state, executor.mesh, int(first_step),
                              int(n_steps), batch_size, seed)
    except BaseException:
        executor.close_mesh()
        raise


def _replica_steps(executor, replica, mesh, first_step, n_steps, batch_size, seed):
    values, bounds, (lo, hi) = replica.values, replica.bounds, (replica.lo, replica.hi)
    full = [np.empty_like(executor.full_params(values)) for _ in executor.parts]
    total = np.empty(hi - lo, dtype=values.dtype)
    run = ReplicaRun([], [], [])
    t0 = time.perf_counter()
    for step in range(first_step, first_step + n_steps):
        sent = mesh.bytes_sent
        mine = executor.loss_grad(values, step, batch_size, seed, buffers=full)
        if replica.compressor is not None:
            mine = mine._replace(grad=replica.compressor.encode(
                mine.grad, (step, _sender(executor))))
        if replica.sharded:
            everyone = mesh.alltoall([Partial(mine.loss, mine.grad[bounds[j]:bounds[j + 1]],
                                              mine.rows) for j in range(mesh.size)], "grad")
        else:
            everyone = mesh.exchange(mine, "grad")
        _add_in_order([p.grad for p in everyone], total)
        loss = sum(p.loss for p in everyone)
        rows = sum(p.rows for p in everyone)
        total /= local.mean_divisor(rows)
        replica.state = _update_slice(replica.optimizer, total, replica.state, values, lo, hi)
        if replica.sharded:
            for j, piece in enumerate(mesh.exchange(values[lo:hi], "values")):
                if j != mesh.index:
                    values[bounds[j]:bounds[j + 1]] = piece
        run.losses.append(loss / local.mean_divisor(rows))
        run.ends.append(time.perf_counter() - t0)
        run.sent.append(mesh.bytes_sent - sent)
    return run


@hosted
def replica_state(executor):
    """This replica's ``ReplicaState`` (its optimizer state current on [lo, hi))."""
    replica = executor.run_state
    return ReplicaState(replica.values, replica.state, replica.lo, replica.hi)


# ----------------------------------------------------------------------------
# The strategy (driver side)
# ----------------------------------------------------------------------------
def _partition_loss_grad(model, values, frozen, X, y, w, step, batch_size, seed, pid, trainable):
    """Task body of the "tasks" transport: one partition's ``Partial``."""
    view = model.trainable_view(trainable)
    params = values if view.index is None else view.scatter(frozen.copy(), values)
    rows = local.batch_slice(X.shape[0], batch_size, step, seed, pid)
    return Partial(*local.loss_grad_sum(model, params, X, y, rows, view, w=w))


class SyncSGD(Strategy):
    """Synchronous data-parallel training; see the module docstring.

    ``transport="tasks"`` costs a scheduler round per step, but its partials
    survive a worker's loss through the scheduler. ``apply_on="workers"``
    takes the replica path only with direct channels (``"actors"``),
    ``local_steps=1`` and sync points further apart than one step; otherwise
    the driver adds and updates (same bits, one driver round trip per step).
    """

    name = "sync"
    # what the workflow runner needs of a registered kind (``dmlcore.workflow.build``)
    unit = "steps"                    # what train.steps counts
    optimizer_keys = ()               # keywords that hold a {kind: ...} optimizer

    @classmethod
    def full_batch(cls, config):
        """Whether ``config`` computes every step on all rows (what a batch solver needs)."""
        return config.get("batch_size") is None and config.get("local_steps", 1) == 1

    def __init__(self, batch_size=None, fan_in=4, local_steps=1, transport="actors",
                 trainable=None, apply_on="workers", compression=None):
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
        compression = codecs.parse(compression)
        if compression is not None and transport == "tasks":
            raise ValueError("compression needs transport='actors' or 'actor-calls' (the "
                             "executors keep the senders' state)")
        self.compression = compression
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
    def run_steps(self, ctx):
        # one-step rounds: the optimizer applied, and the momentum top-k senders keep
        optimizer, momentum = codecs.momentum_correction(self.compression, ctx.optimizer)
        evaluate, pools, close = self._evaluator(ctx, momentum)
        try:
            # replicas pay off between sync points; syncing every step (a callback
            # without ``sync_every``, one step per epoch) is the driver path's job
            replicas = (self.apply_on == "workers" and pools is not None
                        and pools.pool.channels and self.local_steps == 1)
            if replicas and not ctx.syncs_every_step:
                yield from self._run_replicated(ctx, pools, optimizer, momentum)
                return
            per_epoch = self.steps_per_epoch(ctx.data)
            if replicas and per_epoch > 1:
                logger.warning("dmlcore: SyncSGD syncs with the driver at every step (a callback "
                               "without a sync_every attribute, or evaluations or checkpoints "
                               "every step), so each step's update runs on the driver instead "
                               "of on the workers' replicas; give the callback sync_every=k to "
                               "be called only every k steps")
            for step in range(ctx.start_step, ctx.total_steps):
                if pools is not None and step > ctx.start_step and step % per_epoch == 0:
                    pools.rebalance(step)   # joined workers get partitions, retiring ones none
                values = ctx.trainable_values()
                if self.local_steps == 1:
                    (loss, grad, rows), nbytes = evaluate(values, step)
                    grad /= local.mean_divisor(rows)
                    ctx.opt_state = optimizer.update(grad, ctx.opt_state, values)
                else:
                    values, loss, rows, nbytes = pools.attempt(
                        lambda pool: self._local_round(ctx, pool, values, step), step)
                ctx.set_trainable_values(values)
                yield {"loss": loss / local.mean_divisor(rows), "bytes_sent": nbytes}
        finally:
            close()

    def run_batch(self, ctx):
        """Full-batch L-BFGS: one tree-reduced (loss, grad) round trip per evaluation."""
        if self.batch_size is not None or self.local_steps != 1:
            raise ValueError("LBFGS needs SyncSGD(batch_size=None, local_steps=1)")
        if self.compression is not None:
            raise ValueError(f"compression={self.compression!r} needs an (init, update) "
                             "optimizer: a batch solver's line search needs exact gradients")
        evaluate, _, close = self._evaluator(ctx)
        spent, done = [0], [ctx.start_step]     # bytes since the last record, iterations

        def loss_grad(values):
            # full batches: the step only labels a recovery event
            (loss, grad, rows), nbytes = evaluate(values, done[0])
            spent[0] += nbytes
            rows = local.mean_divisor(rows)
            return loss / rows, grad / rows

        iterations = ctx.optimizer.iterations(
            loss_grad, ctx.trainable_values().copy(), ctx.view.decay_mask,
            max_iter=ctx.total_steps - ctx.start_step)
        try:
            while True:
                try:
                    values, loss = next(iterations)
                except StopIteration as done:
                    ctx.outputs["solver_result"] = done.value
                    return
                ctx.set_trainable_values(values)
                nbytes, spent[0] = spent[0], 0
                done[0] += 1
                yield {"loss": loss, "bytes_sent": nbytes}
        finally:
            iterations.close()
            close()

    def _evaluator(self, ctx, momentum=0.0):
        """``(evaluate, pools, close)``; ``evaluate(values, step) -> (Partial, bytes)``;
        ``pools``: the run's ``RecoveringPool`` (None on the "tasks" transport);
        ``momentum``: the top-k senders' momentum correction."""
        model, data, client = ctx.model, ctx.data, ctx.client
        if self.transport != "tasks" or client is None:
            def make(groups):
                pool = ExecutorPool(model, data, client, direct=self.transport == "actors",
                                    timeout=ctx.timeout, groups=groups)
                if ctx.trainable is not None:
                    pool.call("configure", ctx.params, ctx.trainable)
                return pool

            pools = RecoveringPool(ctx, make)

            def evaluate_on(pool, values, step):
                before = pool.traffic()
                if self.compression is None:
                    total = add_partials(*pool.call("loss_grad", values, step, self.batch_size,
                                                    ctx.seed))
                else:
                    total = _sums(pool.call("compressed_loss_grad", values, step,
                                            self.batch_size, ctx.seed, self.compression,
                                            momentum),
                                  values.dtype)
                return total, pool.traffic() - before

            def evaluate(values, step):
                return pools.attempt(lambda pool: evaluate_on(pool, values, step), step)

            return evaluate, pools, pools.close

        parts = data.partition_futures()
        workers = data.workers()
        frozen = client.scatter(ctx.params, broadcast=True) if ctx.trainable else None
        n_workers = len(set(workers))

        def evaluate(values, step):
            futures = [client.submit(_partition_loss_grad, model, values, frozen, X, y, w, step,
                                     self.batch_size, ctx.seed, pid, ctx.trainable,
                                     workers=[workers[pid]], pure=False)
                       for pid, (X, y, w) in enumerate(parts)]
            total = tree_reduce(client, futures, self.fan_in, workers=workers).result(
                timeout=ctx.timeout)
            # Dask moves these through the scheduler: the values to every task, one
            # partial per worker back (what its tree level sends)
            return total, values.nbytes * (len(parts) + n_workers)

        return evaluate, None, lambda: None

    def _run_replicated(self, ctx, pools, optimizer, momentum):
        """The ``apply_on="workers"`` loop: runs of steps between sync points. A
        lost worker's run is redone from the sync point it started at, on
        replicas started again from the driver's state (``RecoveringPool``).
        ``optimizer`` and ``momentum``: as ``compression.momentum_correction`` gives."""
        started, before, sharded = None, 0, False   # the pool generation holding replicas

        def run(pool, step, end):
            nonlocal started, before, sharded
            if started != pools.generation:
                pool.connect_mesh()
                before = pool.traffic()
                sharded = sharded_exchange(len(pool), ctx.trainable_values().nbytes,
                                           self.compression, len(set(pool.hosts())) == 1)
                ctx.outputs["replica_exchange"] = ("reduce-scatter + all-gather" if sharded
                                                   else "full")
                pool.call("replica_start", ctx.trainable_values(), optimizer,
                          ctx.opt_state, self.compression, ctx.seed, momentum, sharded)
                started = pools.generation
            # each of the executors' exchanges has the deadline; the run of steps
            # as a whole gets it once per step
            runs = pool.call("replica_steps", step, end - step, self.batch_size, ctx.seed,
                             wait=ctx.timeout * (end - step))
            if sharded:                     # each replica owns a slice of the state
                pieces = pool.call("replica_state")
            else:
                pieces = pool.results([pool.submit_one(0, "replica_state")])
            # the driver's calls (start, runs, states) count on the run's first step
            driver = pool.traffic() - before
            before += driver
            return runs, pieces, driver

        step, per_epoch = ctx.start_step, self.steps_per_epoch(ctx.data)
        while step < ctx.total_steps:
            end = ctx.next_sync(step)
            if step > ctx.start_step and step % per_epoch == 0:
                pools.rebalance(step)       # joined workers get partitions, retiring ones none
            t0 = time.perf_counter()
            runs, pieces, driver = pools.attempt(lambda pool: run(pool, step, end), step)
            new_values, ctx.opt_state = merge_states(pieces)
            for i, (loss, t) in enumerate(zip(runs[0].losses, runs[0].ends)):
                record = {"loss": loss, "bytes_sent": sum(r.sent[i] for r in runs),
                          "_time": t0 + t}
                if i == 0:
                    record["bytes_sent"] += driver
                if i == len(runs[0].losses) - 1:
                    ctx.set_trainable_values(new_values)
                yield record
            step = end

    def _local_round(self, ctx, pool, values, step):
        before = pool.traffic()
        results = pool.call("client_train", values, ctx.optimizer, round_=step,
                            local_steps=self.local_steps, batch_size=self.batch_size,
                            seed=ctx.seed, compression=self.compression)
        failed = [f for r in results for f in r.failed]
        if failed:
            raise RuntimeError(f"local training failed on partition {failed[0][0]}: "
                               f"{failed[0][1]}")
        weighted, weight, loss, rows = client_sums(results, values)
        new = (weighted / local.mean_divisor(weight)).astype(values.dtype)
        return new, loss, rows, pool.traffic() - before
