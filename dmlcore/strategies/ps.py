"""A parameter server in a Dask actor: BSP, SSP and asynchronous SGD.

Design
------
*Server.* The trainable parameter entries, the optimizer state and the clocks
live in one ``_Server`` Dask actor, placed on the live worker holding the
fewest partitions (a spare worker when there is one, so that losing the
server loses no data). Its methods are coroutines: they run on the worker's
event loop one at a time (no locks), and a pull that must wait (SSP/BSP)
awaits an event instead of blocking other calls.

*Workers.* One long-running task per Dask worker holding partitions, pinned
there, loops round-robin over that worker's partitions: pull the parameters
for partition p, compute the SUM of (loss, gradient) over p's mini-batch with
``local.loss_grad_sum``, push it. A push and the next pull travel in ONE actor
call (``exchange``), and a pull sends the parameters only when they changed
since the worker's last pull, so an update costs one round trip. Why one task
per worker and not per partition: workers run one thread (``KernelThreads``);
a task per partition would either queue behind the others (and deadlock BSP,
whose clock needs every partition) or need ``secede`` and oversubscribe the
cores. Each partition still has its own clock, so the consistency model below
is per partition, whatever the placement (and it survives re-placement).
Pushes and pulls carry only the trainable entries, as flat vectors; with
``transfer_dtype="float16"`` both directions travel as float16 (the push as
the MEAN gradient, which keeps the values in float16's range; a message whose
values do not fit falls back to full precision).

*Clocks and consistency* (Li et al., OSDI 2014; Ho et al., NIPS 2013). A
partition's clock is the number of mini-batches it has pushed; the server
clock ``C`` is the slowest partition's clock. Partition p at clock c may pull
when ``c <= C`` (BSP), ``c <= C + staleness`` (SSP), always (async). BSP
buffers the gradients of clock C and applies their sum divided by the total
row count once every partition has pushed (one update per clock: the same
update as ``SyncSGD(batch_size=b)`` on the same batches); SSP and async apply
each push at once (one update per partition mini-batch). The staleness of an
applied update is ``C`` at apply time (before counting the push) minus ``C``
when its parameters were pulled: 0 under BSP, <= s under SSP, unbounded under
async.

*Records.* ``run`` polls the server (``drain``, one call every
``poll_interval`` s, waiting for new updates) and yields one record per
applied update: ``loss`` (mean over the update's rows), ``bytes_sent`` (pull
and push bytes of that update that crossed a process boundary; the loop on
the server's own worker costs 0), ``staleness``, ``partition`` and ``worker``
(the partition and the worker slot that pushed it; NaN under BSP, where every
partition contributes) and ``updates_lost`` (see below; 0 normally).
``ctx.params`` and ``ctx.opt_state`` are the server's state as of the poll
that brought the records, so at a record in the middle of a batch they may
be a few updates ahead; after the last update they are exact: the server
stops itself after exactly the requested number of updates. After the run,
``strategy.worker_updates_`` (an ``xarray.DataArray`` over ``worker``
addresses) and ``strategy.partition_updates_`` (over ``partition``) count the
partition mini-batches applied, and ``strategy.recoveries_`` lists the
recoveries; ``history.worker`` indexes ``strategy.worker_slots_``.

*Resilience.* The server writes its state (trainable values, optimizer state,
clocks) with ``checkpoint.save`` every ``checkpoint_every`` applied updates,
atomically and before the next update is applied, into ``checkpoint_dir`` (a
temporary directory removed at the end when None; on a multi-machine cluster
give a directory every worker and the client share). When the server's
worker dies, ``run`` re-creates the server from the newest checkpoint on a
live worker, restarts the worker loops where the partitions now are, and
carries on; the records already yielded after that checkpoint are lost
updates (at most ``checkpoint_every - 1``): the next record reports their
number in ``updates_lost`` and the run still ends after the requested number
of records. When a worker running a loop dies (checked once a second) while
the server lives, the server stops, checkpoints its exact state (BSP's
half-collected clock is redone, not lost) and is re-created the same way:
no update is lost. In both cases a partition whose data survive (replicas
made with ``client.replicate``, or data the scheduler can recompute) is
trained where its data now are; a partition whose data died with the worker
(``dml.partition`` scatters the labels, so a partition dies with its
worker) is dropped from training with a warning, BSP and SSP then wait only
for the remaining ones. The server goes to the live worker holding the
fewest partitions, so on a cluster with a spare worker losing it loses no
data. ``strategy.recoveries_`` records each recovery (dead workers, new
server worker, checkpoint used, updates lost, partitions dropped).

``slow_partitions={partition: seconds}`` is a debugging aid: that partition's
worker sleeps that long after each of its mini-batches (tests of the SSP
bound, straggler experiments).
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import checkpoint as ckpt
from .. import local
from ..optim import LBFGS
from .base import Strategy

logger = logging.getLogger("dmlcore.ps")

CONSISTENCY = ("bsp", "ssp", "async")
_WAIT = "wait"            # exchange's answer when a pull is not allowed yet: ask again
_MAX_WAIT = 1.0           # seconds a pull waits inside one exchange call
_CALL_TIMEOUT = 60.0      # seconds before a worker loop gives up on the server
_LOCAL_CALLS = True       # the loop on the server's own worker calls it without the network


def _copy_state(state):
    """The optimizer state with its arrays copied (the server updates them in place)."""
    if state is None:
        return None
    return type(state)(*[v.copy() if isinstance(v, np.ndarray) else v for v in state])


def _pack(vector, transfer):
    """Pull payload: ``vector`` in the transfer dtype (full precision when it does not fit)."""
    if transfer is not None:
        small = vector.astype(transfer)
        if np.isfinite(small).all():
            return small
    return vector.copy()


# ----------------------------------------------------------------------------
# The server (a Dask actor)
# ----------------------------------------------------------------------------
class _Server:
    """Trainable values, optimizer state and clocks; see the module docstring."""

    def __init__(self, *, consistency, staleness, optimizer, values, opt_state, clocks,
                 active, count, stop_at, checkpoint_dir, checkpoint_every, transfer,
                 remote_slots):
        from distributed import get_worker

        self.address = get_worker().address
        self.consistency = consistency
        self.staleness = int(staleness)
        self.optimizer = optimizer
        self.values = np.array(values, copy=True)
        self.dtype = self.values.dtype
        self.opt_state = _copy_state(opt_state)
        self.clocks = np.array(clocks, dtype=np.int64)
        self.active = np.array(active, dtype=bool)
        self.pulled_at = self.clocks.copy()
        self.pull_bytes = np.zeros(len(self.clocks), dtype=np.int64)
        self.count = int(count)
        self.stop_at = int(stop_at)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = int(checkpoint_every)
        self.transfer = None if transfer is None else np.dtype(transfer)
        self.remote_slots = set(remote_slots)
        self.records = []
        self.pushes = {}                      # slot -> partition mini-batches since the last drain
        self.partition_pushes = np.zeros(len(self.clocks), dtype=np.int64)
        self.stopped = self.count >= self.stop_at
        self.buffer = None                    # BSP: [grad sum, loss sum, rows, bytes, staleness]
        self._event = None

    # ---- clocks and notification -------------------------------------------
    def _server_clock(self):
        return int(self.clocks[self.active].min())

    def _changed(self):
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def _notify(self):
        event, self._event = self._event, None
        if event is not None:
            event.set()

    def _may_pull(self, pid):
        if self.consistency == "async":
            return True
        bound = 0 if self.consistency == "bsp" else self.staleness
        return self.clocks[pid] <= self._server_clock() + bound

    # ---- updates -------------------------------------------------------------
    def _apply(self, grad_sum, loss_sum, rows, nbytes, staleness, pid, slot):
        grad = grad_sum / local.mean_divisor(rows)
        self.opt_state = self.optimizer.update(grad.astype(self.dtype, copy=False),
                                               self.opt_state, self.values)
        self.count += 1
        self.records.append((loss_sum / local.mean_divisor(rows), int(nbytes), int(staleness),
                             pid, slot))
        if self.count % self.checkpoint_every == 0:
            self._checkpoint()
        if self.count >= self.stop_at:
            self.stopped = True

    def _checkpoint(self):
        clocks = self.clocks
        if self.consistency == "bsp":       # pushes waiting in the buffer are redone
            clocks = np.minimum(clocks, self._server_clock())
        ckpt.save(self.checkpoint_dir, self.count, self.values, self.opt_state,
                  extra={"clocks": clocks, "active": self.active},
                  meta={"consistency": self.consistency, "server": self.address}, keep=2)

    def _push(self, slot, push):
        pid, clock, loss_sum, rows, kind, payload = push
        if self.stopped or not self.active[pid] or clock != self.clocks[pid]:
            return                                      # after a stop or a recovery
        if kind == "mean":
            grad_sum = payload.astype(self.dtype) * rows
        else:
            grad_sum = payload
        remote = slot in self.remote_slots
        nbytes = int(self.pull_bytes[pid]) + (payload.nbytes if remote else 0)
        self.pull_bytes[pid] = 0
        before = self._server_clock()
        staleness = before - int(self.pulled_at[pid])
        self.clocks[pid] += 1
        self.partition_pushes[pid] += 1
        self.pushes[slot] = self.pushes.get(slot, 0) + 1
        if self.consistency != "bsp":
            self._apply(grad_sum, loss_sum, rows, nbytes, staleness, pid, slot)
            self._notify()
            return
        if self.buffer is None:
            self.buffer = [grad_sum.astype(self.dtype, copy=True), 0.0, 0, 0, 0]
        else:
            self.buffer[0] += grad_sum
        buf = self.buffer
        buf[1] += loss_sum
        buf[2] += rows
        buf[3] += nbytes
        buf[4] = max(buf[4], staleness)
        if self._server_clock() > before:               # every partition pushed clock C
            self.buffer = None
            self._apply(buf[0], buf[1], buf[2], buf[3], buf[4], None, None)
            self._notify()

    # ---- the actor's interface ---------------------------------------------
    async def exchange(self, slot, push, pid, have_version):
        """Apply ``push`` (or None), then pull for partition ``pid``.

        Returns None when training is over, ``"wait"`` when the pull is not
        allowed within ``_MAX_WAIT`` s (ask again), else ``(clock of pid,
        version, values or None)`` (None: the caller's ``have_version`` is
        current).
        """
        if push is not None:
            self._push(slot, push)
        deadline = time.monotonic() + _MAX_WAIT
        while not self.stopped and not self._may_pull(pid):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _WAIT
            try:
                await asyncio.wait_for(self._changed().wait(), remaining)
            except asyncio.TimeoutError:
                pass
        if self.stopped or not self.active[pid]:
            return None
        self.pulled_at[pid] = self._server_clock()
        if have_version == self.count:
            return int(self.clocks[pid]), self.count, None
        values = _pack(self.values, self.transfer)
        self.pull_bytes[pid] += values.nbytes if slot in self.remote_slots else 0
        return int(self.clocks[pid]), self.count, values

    async def drain(self, wait):
        """Records since the last drain (waiting up to ``wait`` s for one) and the state."""
        if not self.records and not self.stopped:
            try:
                await asyncio.wait_for(self._changed().wait(), wait)
            except asyncio.TimeoutError:
                pass
        records, self.records = self.records, []
        pushes, self.pushes = self.pushes, {}
        partition_pushes = self.partition_pushes.copy()
        self.partition_pushes[:] = 0
        return {"records": records, "values": self.values.copy(),
                "opt_state": _copy_state(self.opt_state), "count": self.count,
                "stopped": self.stopped, "pushes": pushes,
                "partition_pushes": partition_pushes}

    async def halt(self):
        """Stop, checkpoint the current state and return the last records (``drain``'s shape)."""
        self.stopped = True
        self._notify()
        self._checkpoint()
        return await self.drain(0)

    async def stop(self):
        """End training: waiting and later pulls answer None."""
        self.stopped = True
        self._notify()
        return self.count


# ----------------------------------------------------------------------------
# The worker loop (a long-running Dask task)
# ----------------------------------------------------------------------------
def _exchange_function(server):
    """``exchange(...) -> reply`` for a worker loop; blocks until the server answers.

    On the server's own worker the call runs the actor's coroutine on the
    worker's event loop directly (where actor calls run anyway, so the
    server's state sees the same single-threaded order), without serialising
    the vectors or a network round trip; elsewhere it is an actor call.
    """
    from distributed import get_worker
    from distributed.utils import sync

    try:
        worker = get_worker()
    except ValueError:
        worker = None
    here = worker.state.actors.get(server.key) if (
        _LOCAL_CALLS and worker is not None and worker.address == server._address) else None
    if here is not None:
        return lambda *args: sync(worker.loop, here.exchange, *args,
                                  callback_timeout=_CALL_TIMEOUT)
    return lambda *args: server.exchange(*args).result(timeout=_CALL_TIMEOUT)


def _worker_loop(server, model, params, trainable, slot, pids, batch_size, seed, transfer,
                 slow, *arrays):
    """Pull, compute, push round-robin over this worker's partitions until stopped.

    Returns ``{"slot", "pushes", "ended"}``; an unreachable server ends the loop
    normally (the driver decides what to do), a computation error raises.
    """
    from distributed import secede

    secede()                       # a long-running task: do not hold a slot of the pool
    idx = local.trainable_index(model, trainable)
    params = np.array(params, copy=True)
    parts = {pid: (arrays[3 * i], arrays[3 * i + 1], arrays[3 * i + 2])
             for i, pid in enumerate(pids)}
    transfer = None if transfer is None else np.dtype(transfer)
    exchange = _exchange_function(server)
    version, push, pushes, i = -1, None, 0, 0
    while True:
        pid = pids[i % len(pids)]
        try:
            reply = exchange(slot, push, pid, version)
        except Exception as exc:   # the server's worker died, or the call timed out
            return {"slot": slot, "pushes": pushes, "ended": f"server unreachable: {exc!r}"}
        pushes += push is not None
        push = None
        if reply is None:
            return {"slot": slot, "pushes": pushes, "ended": "stopped"}
        if isinstance(reply, str):             # not allowed to pull yet: ask again
            continue
        clock, new_version, values = reply
        if values is not None:
            version = new_version
            if idx is None:
                params[:] = values
            else:
                params[idx] = values
        X, y, w = parts[pid]
        rows = local.batch_slice(X.shape[0], batch_size, clock, seed, pid)
        loss, grad, n = local.loss_grad_sum(model, params, X, y, rows, trainable, idx, w=w)
        if slow.get(pid):
            time.sleep(slow[pid])
        kind, payload = "sum", grad
        if transfer is not None:
            mean = (grad / local.mean_divisor(n)).astype(transfer)
            if np.isfinite(mean).all():
                kind, payload = "mean", mean
        push = (pid, clock, loss, n, kind, payload)
        i += 1


# ----------------------------------------------------------------------------
# The strategy (driver side)
# ----------------------------------------------------------------------------
class ParameterServer(Strategy):
    """Parameters in a Dask actor; workers pull, compute and push; see the module docstring.

    ``consistency``: ``"bsp"`` | ``"ssp"`` | ``"async"``; ``staleness``: SSP's
    bound s (clocks); ``batch_size``: rows per partition mini-batch (None =
    the whole partition); ``checkpoint_every``: server updates between
    checkpoints; ``checkpoint_dir``: where (a temporary directory when None;
    the directory belongs to the server: stale checkpoints in it are removed
    at start); ``transfer_dtype``: None (the data's dtype) or ``"float16"``;
    ``trainable``: layer names (frozen layers are neither computed nor sent);
    ``poll_interval``: seconds between the driver's polls of the server;
    ``slow_partitions``: ``{partition: seconds}`` (debugging stragglers).
    """

    name = "ps"
    # what the workflow runner needs of a registered kind (``dmlcore.workflow.build``)
    unit = "steps"
    optimizer_keys = ()

    @classmethod
    def full_batch(cls, config):
        return False

    def __init__(self, consistency="async", staleness=2, batch_size=64, checkpoint_every=100,
                 checkpoint_dir=None, transfer_dtype=None, trainable=None,
                 poll_interval=0.05, slow_partitions=None):
        super().__init__(trainable)
        if consistency not in CONSISTENCY:
            raise ValueError(f"consistency {consistency!r} is not one of {', '.join(CONSISTENCY)}")
        if int(staleness) < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
        if int(checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if transfer_dtype not in (None, "float16", np.float16):
            raise ValueError(f"transfer_dtype must be None or 'float16', got {transfer_dtype!r}")
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self.consistency = consistency
        self.staleness = int(staleness)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.checkpoint_every = int(checkpoint_every)
        self.checkpoint_dir = None if checkpoint_dir is None else str(checkpoint_dir)
        self.transfer_dtype = None if transfer_dtype is None else "float16"
        self.poll_interval = float(poll_interval)
        self.slow_partitions = {int(k): float(v) for k, v in (slow_partitions or {}).items()}

    def steps_per_epoch(self, data):
        batches = [local.n_batches(int(n), self.batch_size) for n in data.partition_sizes]
        return max(batches) if self.consistency == "bsp" else sum(batches)

    # ---- the loop ----------------------------------------------------------
    def run(self, ctx):
        if isinstance(ctx.optimizer, LBFGS):
            raise ValueError("ParameterServer needs an (init, update) optimizer such as "
                             "dml.optim.SGD or Adam, not LBFGS")
        if ctx.client is None:
            raise ValueError("ParameterServer needs a Dask cluster (its server is a Dask "
                             "actor): pass client=... or let dml.fit start one")
        self._setup(ctx)
        yielded, lost_pending = ctx.start_step, 0
        try:
            while True:
                started = time.monotonic()
                dead = self._dead_loop_workers()
                try:
                    if dead:    # a data worker died: stop here (checkpointed), re-place
                        out = self._server.halt().result(timeout=_CALL_TIMEOUT)
                    else:
                        out = self._server.drain(self.poll_interval).result(
                            timeout=self.poll_interval + _CALL_TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - decided by _server_lost
                    if not self._server_lost():
                        raise
                    lost_pending += self._recover(ctx, yielded, [self._server_worker], exc)
                    continue
                if not dead:
                    self._check_loops()
                self._count(out)
                records = out["records"]
                if records:
                    ctx.set_trainable_values(out["values"].astype(ctx.params.dtype, copy=False))
                    ctx.opt_state = out["opt_state"]
                    ctx.extra["partition_updates"] = self._partition_counts.copy()
                for loss, nbytes, staleness, pid, slot in records:
                    yielded += 1
                    yield {"loss": float(loss), "bytes_sent": nbytes,
                           "staleness": staleness,
                           "partition": np.nan if pid is None else pid,
                           "worker": np.nan if slot is None else slot,
                           "updates_lost": lost_pending}
                    lost_pending = 0
                if dead:
                    lost_pending += self._recover(ctx, yielded, dead, None)
                    continue
                if out["stopped"] and not records and out["count"] >= self._stop_at:
                    return
                rest = self.poll_interval - (time.monotonic() - started)
                if rest > 0:
                    time.sleep(rest)
        finally:
            self._shutdown()

    # ---- set-up, monitoring, shutdown ----------------------------------------
    def _setup(self, ctx):
        self._client = ctx.client
        self._owns_dir = self.checkpoint_dir is None
        self._dir = Path(tempfile.mkdtemp(prefix="dmlcore-ps-") if self._owns_dir
                         else self.checkpoint_dir)
        for stale in ckpt.list_checkpoints(self._dir):
            stale.unlink(missing_ok=True)
        P = ctx.data.n_partitions
        self._parts = ctx.data.partition_futures()
        start = ctx.start_step if self.consistency == "bsp" else ctx.start_step // P
        self._partition_counts = np.zeros(P, dtype=np.int64)
        resumed = np.asarray(ctx.extra.get("partition_updates", ()), dtype=np.int64)
        if resumed.shape == (P,):           # dml.fit(resume=True) restores ctx.extra
            self._partition_counts += resumed
        self._worker_counts = {}
        self.worker_slots_ = []
        self.recoveries_ = []
        self._dead = set()
        self._loops, self._actor_future, self._server = [], None, None
        clocks, active = np.full(P, start, dtype=np.int64), np.ones(P, dtype=bool)
        ckpt.save(self._dir, ctx.start_step, ctx.trainable_values(), ctx.opt_state,
                  extra={"clocks": clocks, "active": active}, meta={"initial": True}, keep=2)
        self._stop_at = ctx.total_steps
        self._launch(ctx, ctx.trainable_values(), ctx.opt_state, clocks, active,
                     ctx.start_step, self._stop_at, ctx.data.workers())

    def _launch(self, ctx, values, opt_state, clocks, active, count, stop_at, placement):
        client = self._client
        live = sorted(set(client.nthreads()) - self._dead)
        if not live:
            raise RuntimeError("the Dask cluster has no live worker left for the parameter server")
        by_worker = {}
        for pid in np.flatnonzero(active):
            by_worker.setdefault(placement[pid], []).append(int(pid))
        load = {w: len(by_worker.get(w, ())) for w in live}
        server_worker = min(live, key=lambda w: (load[w], w))
        slots = {}
        for w in sorted(by_worker):
            slots[w] = len(self.worker_slots_)
            self.worker_slots_.append(w)
        remote = [s for w, s in slots.items() if w != server_worker]
        self._actor_future = client.submit(
            _Server, consistency=self.consistency, staleness=self.staleness,
            optimizer=ctx.optimizer, values=values, opt_state=opt_state, clocks=clocks,
            active=active, count=count, stop_at=stop_at, checkpoint_dir=str(self._dir),
            checkpoint_every=self.checkpoint_every, transfer=self.transfer_dtype,
            remote_slots=remote, actor=True, workers=[server_worker],
            allow_other_workers=False, pure=False)
        with client.as_current():       # the handle calls through this client, not the default
            self._server = self._actor_future.result()
        self._server_worker = server_worker
        self._loop_workers = sorted(by_worker)
        self._last_liveness = time.monotonic()
        self._loops = []
        for w, pids in sorted(by_worker.items()):
            arrays = [f for pid in pids for f in self._parts[pid]]
            self._loops.append(client.submit(
                _worker_loop, self._server, ctx.model, ctx.params, ctx.trainable, slots[w], pids, self.batch_size, ctx.seed, self.transfer_dtype,
                self.slow_partitions, *arrays, workers=[w], allow_other_workers=False,
                pure=False))

    def _count(self, out):
        self._partition_counts += out["partition_pushes"]
        for slot, n in out["pushes"].items():
            address = self.worker_slots_[slot]
            self._worker_counts[address] = self._worker_counts.get(address, 0) + n
        import xarray as xr

        self.partition_updates_ = xr.DataArray(
            self._partition_counts.copy(), dims="partition", name="partition_updates",
            coords={"partition": np.arange(len(self._partition_counts))})
        addresses = sorted(self._worker_counts)
        self.worker_updates_ = xr.DataArray(
            np.array([self._worker_counts[a] for a in addresses], dtype=np.int64),
            dims="worker", coords={"worker": np.array(addresses, dtype=str)},
            name="worker_updates")

    def _dead_loop_workers(self):
        """Workers running loops that left the cluster (checked at most once a second)."""
        now = time.monotonic()
        if now - self._last_liveness < 1.0:
            return []
        self._last_liveness = now
        live = set(self._client.nthreads())
        return sorted({w for w in self._loop_workers if w not in live}
                      - {self._server_worker})

    def _check_loops(self):
        """Raise the error of a worker loop that failed (a computation error)."""
        for f in self._loops:
            if f.status == "error":
                f.result()

    def _server_lost(self):
        """True when the server's worker is gone (its actor with it)."""
        if self._actor_future is None:
            return False
        deadline = time.monotonic() + 10.0
        while True:
            if self._actor_future.status in ("error", "lost", "cancelled"):
                return True
            if self._server_worker not in self._client.nthreads():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def _recover(self, ctx, yielded, dead, exc):
        """Re-create the server from the newest checkpoint after ``dead`` workers died.

        Returns the number of updates lost (yielded after that checkpoint).
        """
        saved = ckpt.latest(self._dir)
        if saved is None:
            raise RuntimeError(
                f"worker(s) {dead} died and no parameter-server checkpoint "
                f"is readable in {self._dir} (on a multi-machine cluster give "
                f"ParameterServer(checkpoint_dir=...) on storage every machine shares)") from exc
        self._dead.update(dead)             # the scheduler may still list them for a moment
        self._client.cancel(self._loops)    # they end at their next call of the dead server
        self._loops = []
        self._actor_future.release()
        self._actor_future, self._server = None, None
        active = saved["extra"]["active"].astype(bool)
        placement, dropped = self._surviving_placement(active)
        if dropped:
            logger.warning("parameter server recovery: the data of partitions %s are lost "
                           "with worker %s; training goes on without them", dropped, dead)
            active[dropped] = False
        if not active.any():
            raise RuntimeError(f"every partition's data was lost with worker {dead}") from exc
        lost = max(0, yielded - saved["step"])
        self._stop_at = saved["step"] + (ctx.total_steps - yielded)
        opt_state = ckpt.restore_state(ctx.opt_state, saved["opt"])
        values = saved["params"].astype(ctx.params.dtype)
        self._launch(ctx, values, opt_state, saved["extra"]["clocks"], active, saved["step"],
                     self._stop_at, placement)
        self.recoveries_.append({"dead_workers": dead, "server_worker": self._server_worker,
                                 "checkpoint_step": saved["step"], "at_step": yielded,
                                 "updates_lost": lost, "partitions_dropped": dropped})
        logger.warning("parameter server re-created on %s from the checkpoint of update %d "
                       "after %s died: %d update(s) lost", self._server_worker, saved["step"],
                       dead, lost)
        return lost

    def _surviving_placement(self, active, timeout=10.0):
        """Where each partition's data live now, and the partitions whose data are lost."""
        from distributed import wait

        futures = [f for pid in np.flatnonzero(active) for f in self._parts[pid]
                   if f is not None]
        try:       # data being recomputed by the scheduler
            wait([f for f in futures if f.status == "pending"], timeout=timeout)
        except Exception:  # noqa: BLE001 - timeouts and lost keys are judged below
            pass
        live = set(self._client.nthreads()) - self._dead
        kept = [f for f in futures if f.status == "finished"]
        try:
            who = self._client.who_has(kept) if kept else {}
        except Exception:  # noqa: BLE001 - a key forgotten meanwhile: ask one by one
            who = {}
            for f in kept:
                try:
                    who.update(self._client.who_has([f]))
                except Exception:  # noqa: BLE001
                    pass
        placement, dropped = [None] * len(active), []
        for pid in np.flatnonzero(active):
            holders = None
            for f in self._parts[pid]:
                if f is None:
                    continue
                here = {w for w in who.get(f.key, ()) if w in live}
                holders = here if holders is None else holders & here
            if not holders or any(f is not None and f.status != "finished"
                                  for f in self._parts[pid]):
                dropped.append(int(pid))
            else:
                placement[pid] = sorted(holders)[0]
        return placement, dropped

    def _shutdown(self):
        """Stop the server, wait for the worker loops, release everything."""
        from distributed import wait

        client = getattr(self, "_client", None)
        if client is None:
            return
        if self._server is not None:
            try:
                self._server.stop().result(timeout=_CALL_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - the loops end on their own then
                logger.debug("parameter server stop failed: %r", exc)
        loops = self._loops
        try:
            wait(loops, timeout=_CALL_TIMEOUT + 5)
        except Exception:  # noqa: BLE001
            pass
        self.loop_results_ = [f.result() if f.status == "finished" else f.status
                              for f in self._loops]
        client.cancel(loops)
        if self._actor_future is not None:
            self._actor_future.release()
        self._loops, self._server, self._actor_future = [], None, None
        if self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._client = None
