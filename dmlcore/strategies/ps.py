"""A parameter server in a Dask actor: BSP, SSP and asynchronous SGD.

*Server*: the trainable values, optimizer state and clocks in one ``_Server``
actor (coroutines on its worker's event loop, one at a time) on the live
worker holding the fewest partitions; it moves once to the fastest loop
worker when the loop on its own worker computes its mini-batches more than
twice as slowly (a slow worker would serve every loop slowly).
*Workers*: each data worker's executor (``ExecutorPool``) hosts a loop, in a thread of its own, round-robin over its
partitions: pull, SUM (loss, gradient) over a mini-batch, push. A push and
the next pull are ONE call (``exchange``: ``Push`` in, ``Pull`` out; values
only when changed; in-process on the server's own worker, over a socket of
its own from the others, TLS on TLS clusters). Compression:
``"float16"`` sends values and MEAN gradients as float16; ``"int8"`` and
``{"topk": r}`` encode the pushed mean gradient (pulls stay exact).

*Clocks* (Li et al. 2014; Ho et al. 2013): a partition's clock counts its
pushes; the server clock C is the slowest active one. Clock c may pull when
c <= C (BSP), c <= C + staleness (SSP), always (async). BSP applies the summed
gradient of a clock once all pushed; SSP/async apply each push. Staleness =
C at apply minus C at pull. *Records*: one per applied update (``loss``,
``bytes_sent``, ``staleness``, ``partition``/``worker``, ``updates_lost``);
the history adds ``partition_updates``, ``worker_updates``, recovery events.
*Resilience*: each snapshot the driver polls carries the whole state. A lost
server restarts on a live worker from the last snapshot; a lost or joining
loop worker halts the server (exact state) and re-places the loops, dead
partitions made again from their source (``PartitionedData.rehost``) or
dropped when they keep none. A loop's error or a frozen worker ends the fit.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
import uuid

import numpy as np

from .. import compression as codecs
from .. import local
from ..channel import Channel, ChannelServer, first_error, wait_all
from ..executors import ExecutorPool, hosted, log_once, message_cap, worker_tls
from ..recovery import reassign
from ..messages import Pull, Push, Snapshot, Update
from .base import Strategy

logger = logging.getLogger("dmlcore.ps")

CONSISTENCY = ("bsp", "ssp", "async")
_WAIT = "wait"            # exchange's answer when a pull is not allowed yet: ask again
_MAX_WAIT = 1.0           # seconds a pull waits inside one exchange call
_LOCAL_CALLS = True       # the loop on the server's own worker calls it without the network
_SOCKET_CALLS = True      # the other loops call it over a socket (else: Dask actor calls)
_SERVERS: dict = {}       # run token -> the _Server living in this process (its worker)
MOVE_AFTER_S = 0.5        # the server's worker is judged after this long (see faster_host)
MOVE_SLOWER = 2.0         # ... and left when its loop's mini-batches take this much longer
MOVE_MIN_PUSHES = 10      # ... (over at least this many mini-batches of each worker)
MOVE_MIN_GAP_S = 1e-3     # ... and this much longer in seconds (tiny batches stay put)


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

    def __init__(self, *, token, consistency, staleness, optimizer, values, opt_state, clocks,
                 active, count, stop_at, transfer, remote_slots):
        self.token = token
        _SERVERS[token] = self
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
        self.transfer = None if transfer is None else np.dtype(transfer)
        self.remote_slots = set(remote_slots)
        self.updates = []
        self.pushes = {}                      # slot -> partition mini-batches since the last snapshot
        self.push_seconds = {}                # slot -> their compute seconds (Push.seconds)
        self.partition_pushes = np.zeros(len(self.clocks), dtype=np.int64)
        self.stopped = self.count >= self.stop_at
        self.buffer = None                    # BSP: [grad sum, loss sum, rows, bytes, staleness]
        # The state is shared by the actor's coroutines (the worker's event
        # loop) and the loop thread on this worker (``exchange_here``): every
        # read or change of it holds ``_lock``; waiters wake on ``_cond``
        # (threads) or ``_event`` (coroutines, set on ``_loop``).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._event = self._loop = None
        self._mean = np.empty_like(self.values)   # _apply's mean gradient, reused

    # ---- clocks and notification -------------------------------------------
    def _server_clock(self):
        return int(self.clocks[self.active].min())

    def _changed(self):
        """The event the next ``_notify`` sets (call in a coroutine, holding ``_lock``)."""
        if self._event is None:
            self._loop = asyncio.get_running_loop()
            self._event = asyncio.Event()
        return self._event

    def _notify(self):
        """Wake every waiter (hold ``_lock``): threads now, coroutines on their loop."""
        self._cond.notify_all()
        event, self._event = self._event, None
        if event is None:
            return
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:                # called from the loop thread, not a coroutine
            here = False
        if here:
            event.set()
        else:
            self._loop.call_soon_threadsafe(event.set)

    @contextlib.contextmanager
    def _held(self, timeout):
        """``with``: ``_lock``, acquired within ``timeout`` s (its holders only
        compute: a failure means a stuck server, reported instead of waited on)."""
        if not self._lock.acquire(timeout=timeout):
            raise TimeoutError(f"the parameter server's state stayed locked for {timeout} s")
        try:
            yield
        finally:
            self._lock.release()

    def _ready(self, pid):
        """Whether a pull for ``pid`` is answered now (a Pull, or None once stopped)."""
        return self.stopped or self._may_pull(pid)

    def _may_pull(self, pid):
        if self.consistency == "async":
            return True
        bound = 0 if self.consistency == "bsp" else self.staleness
        return self.clocks[pid] <= self._server_clock() + bound

    # ---- updates -------------------------------------------------------------
    def _apply(self, grad_sum, loss_sum, rows, nbytes, staleness, pid, slot):
        divisor = local.mean_divisor(rows)
        np.divide(grad_sum, divisor, out=self._mean, casting="unsafe")
        self.opt_state = self.optimizer.update(self._mean, self.opt_state, self.values)
        self.count += 1
        self.updates.append(Update(loss_sum / divisor, int(nbytes),
                                   int(staleness), pid, slot))
        if self.count >= self.stop_at:
            self.stopped = True

    def _push(self, slot, push):
        if self.stopped or not self.active[push.partition] or \
                push.clock != self.clocks[push.partition]:
            return                                      # after a stop or a recovery
        pid = push.partition
        if push.kind == "mean":
            grad_sum = push.payload.astype(self.dtype) * push.rows
        elif push.kind == "coded":
            grad_sum = codecs.decode(push.payload, self.dtype) * push.rows
        else:
            grad_sum = push.payload
        remote = slot in self.remote_slots
        nbytes = int(self.pull_bytes[pid]) + (codecs.nbytes(push.payload) if remote else 0)
        self.pull_bytes[pid] = 0
        before = self._server_clock()
        staleness = before - int(self.pulled_at[pid])
        self.clocks[pid] += 1
        self.partition_pushes[pid] += 1
        self.pushes[slot] = self.pushes.get(slot, 0) + 1
        self.push_seconds[slot] = self.push_seconds.get(slot, 0.0) + float(push.seconds)
        if self.consistency != "bsp":
            self._apply(grad_sum, push.loss, push.rows, nbytes, staleness, pid, slot)
            self._notify()
            return
        if self.buffer is None:
            self.buffer = [grad_sum.astype(self.dtype, copy=True), 0.0, 0, 0, 0]
        else:
            self.buffer[0] += grad_sum
        buf = self.buffer
        buf[1] += push.loss
        buf[2] += push.rows
        buf[3] += nbytes
        buf[4] = max(buf[4], staleness)
        if self._server_clock() > before:               # every partition pushed clock C
            self.buffer = None
            self._apply(buf[0], buf[1], buf[2], buf[3], buf[4], None, None)
            self._notify()

    def _pull(self, slot, pid, have_version, into=None):
        """The answer to a pull that may go ahead (hold ``_lock``); ``into``: an
        array of the values' shape that receives them (the Pull's values)."""
        if self.stopped or not self.active[pid]:
            return None
        self.pulled_at[pid] = self._server_clock()
        if have_version == self.count:
            return Pull(int(self.clocks[pid]), self.count, None)
        if into is None:
            values = _pack(self.values, self.transfer)
        else:
            values = into
            np.copyto(into, self.values if self.transfer is None
                      else _pack(self.values, self.transfer), casting="unsafe")
        self.pull_bytes[pid] += values.nbytes if slot in self.remote_slots else 0
        return Pull(int(self.clocks[pid]), self.count, values)

    # ---- the actor's interface ---------------------------------------------
    async def exchange(self, slot, push, pid, have_version):
        """Apply ``push`` (a ``Push`` or None), then pull for partition ``pid``.

        Returns None when training is over, ``"wait"`` when the pull is not
        allowed within ``_MAX_WAIT`` s (ask again), else a ``Pull`` (its
        values None when ``have_version`` is current).
        """
        deadline = time.monotonic() + _MAX_WAIT
        while True:
            with self._held(_MAX_WAIT):
                if push is not None:
                    self._push(slot, push)
                    push = None
                if self._ready(pid):
                    return self._pull(slot, pid, have_version)
                changed = self._changed().wait()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                changed.close()
                return _WAIT
            try:
                await asyncio.wait_for(changed, remaining)
            except asyncio.TimeoutError:
                pass

    def exchange_here(self, slot, push, pid, have_version, into=None):
        """``exchange`` for the loop thread on the server's own worker: the same
        answer, computed in the calling thread (no event-loop hop, so the loop
        does not queue behind the remote workers' calls); pulled values are
        copied into ``into`` when given."""
        deadline = time.monotonic() + _MAX_WAIT
        with self._held(_MAX_WAIT):
            if push is not None:
                self._push(slot, push)
            while not self._ready(pid):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return _WAIT
                self._cond.wait(remaining)
            return self._pull(slot, pid, have_version, into)

    async def open_channel(self, tls, max_bytes):
        """Serve ``exchange`` to ONE remote loop on a socket of this worker
        (TLS with its certificate when ``tls``); returns the (host, port,
        token) the loop's ``Channel`` connects with. ``max_bytes``: the
        largest push accepted."""
        from distributed import get_worker
        from distributed.comm import get_address_host

        served = ChannelServer(_SocketExchanges(self), get_address_host(get_worker().address),
                               max_bytes=max_bytes,
                               ssl_context=worker_tls()[0] if tls else None)
        return served.address

    async def snapshot(self, wait):
        """A ``Snapshot``: the updates since the last one (waiting up to ``wait``
        s for one) and the whole state. Under BSP the clocks are those of the
        last applied update (pushes waiting in the buffer are redone)."""
        with self._held(_MAX_WAIT):
            changed = None if self.updates or self.stopped else self._changed().wait()
        if changed is not None:
            try:
                await asyncio.wait_for(changed, wait)
            except asyncio.TimeoutError:
                pass
        with self._held(_MAX_WAIT):
            return self._snapshot()

    def _snapshot(self):
        """Take the updates since the last snapshot (hold ``_lock``)."""
        updates, self.updates = self.updates, []
        pushes, self.pushes = self.pushes, {}
        seconds, self.push_seconds = self.push_seconds, {}
        partition_pushes = self.partition_pushes.copy()
        self.partition_pushes[:] = 0
        clocks = self.clocks.copy()
        if self.consistency == "bsp":
            clocks = np.minimum(clocks, self._server_clock())
        return Snapshot(updates, self.values.copy(), _copy_state(self.opt_state), self.count,
                        clocks, self.active.copy(), self.stopped, pushes, partition_pushes,
                        seconds)

    async def halt(self):
        """Stop and return the last ``Snapshot`` (the exact state)."""
        with self._held(_MAX_WAIT):
            self.stopped = True
            self._notify()
            return self._snapshot()

    async def stop(self):
        """End training: waiting and later pulls answer None."""
        with self._held(_MAX_WAIT):
            self.stopped = True
            self._notify()
        _SERVERS.pop(self.token, None)
        return self.count


class _SocketExchanges:
    """What one remote loop's socket serves (a ``ChannelServer`` target, in
    that server's thread): ``exchange`` as ``_Server.exchange_here``, pulled
    values copied into a buffer of this connection (each reply is sent
    before the connection's next call is read)."""

    CHANNEL_METHODS = ("exchange",)

    def __init__(self, server):
        self.server = server
        self.values = np.empty_like(server.values) if server.transfer is None else None

    def exchange(self, slot, push, pid, have_version):
        return self.server.exchange_here(slot, push, pid, have_version, into=self.values)


class _SocketExchange:
    """A remote loop's ``exchange`` over a ``Channel`` to the server's worker:
    wire frames on a socket of its own (TLS on TLS clusters), answered by a
    thread there without the worker's event loop or Dask's serialization."""

    def __init__(self, server, server_worker, timeout, worker, max_bytes):
        tls = worker.address.startswith("tls://")
        address = server.open_channel(tls, max_bytes).result(timeout=timeout)
        self._channel = Channel(tuple(address), timeout=timeout, name=server_worker,
                                max_bytes=max_bytes,
                                ssl_context=worker_tls()[1] if tls else None)

    def __call__(self, slot, push, pid, have_version, into=None):
        return self._channel.submit("exchange", slot, push, pid, have_version).result()

    def close(self):
        self._channel.close()


# ----------------------------------------------------------------------------
# The worker loop (hosted by each data worker's executor, in a thread of its own)
# ----------------------------------------------------------------------------
def _exchange_function(server, token, server_worker, timeout, worker, max_bytes):
    """``(exchange, via)``: ``exchange(slot, push, pid, have_version, into=None)
    -> reply`` for the loop on ``worker``, which blocks until the server answers
    (``push`` consumed by then), and how it reaches the server.

    On the server's own worker the loop thread calls ``exchange_here``
    directly (the server's lock orders it with the actor's calls), without
    serialising the vectors, a network round trip or a wait for the event
    loop; elsewhere it calls it over a socket of its own (``_SocketExchange``),
    or through actor calls where that socket cannot be opened (logged once).
    ``max_bytes``: the largest message either way on that socket.
    """
    here = _SERVERS.get(token) if _LOCAL_CALLS and worker.address == server_worker else None
    if here is not None:
        return here.exchange_here, "in-process"
    getattr(server, "exchange")    # binds the handle to this worker while its context is set
    scheme = worker.address.split("://")[0]
    if _SOCKET_CALLS and scheme in ("tcp", "tls"):
        try:
            return (_SocketExchange(server, server_worker, timeout, worker, max_bytes),
                    "tls socket" if scheme == "tls" else "socket")
        except (OSError, ValueError) as exc:        # ConnectionError, timeouts included
            reason = f"{type(exc).__name__}: {exc}"
            log_once(("parameter server", reason),
                     "dmlcore: the parameter server's exchanges from %s use Dask actor calls "
                     "(its socket to %s failed: %s)", worker.address, server_worker, reason)
    return lambda *args, into=None: server.exchange(*args).result(timeout=timeout), "actor calls"


class _Loop:
    """One executor's worker loop: its thread, and its ending or error once done."""

    def __init__(self):
        self.done = threading.Event()
        self.ending = self.error = None

    def run(self, executor, exchange, via, *args):
        try:
            self.ending = {**_worker_loop(executor, exchange, *args), "via": via}
        except BaseException as exc:  # noqa: BLE001 - reported by ps_ending
            self.error = exc
        finally:
            close = getattr(exchange, "close", None)
            if close is not None:
                close()
            self.done.set()


@hosted
def ps_start(executor, server, token, server_worker, slot, batch_size, seed, transfer, slow,
             timeout, compression=None):
    """Start this executor's worker loop over its partitions (from the
    parameters of its last ``configure``) and return at once; ``compression``:
    "int8" or {"topk": r} (the pushes' encoding), else None."""
    from distributed import get_worker

    exchange, via = _exchange_function(server, token, server_worker, timeout, get_worker(),
                                       message_cap(executor.model, len(executor.parts)))
    loop = executor.run_state = _Loop()
    # the thread runs in this call's context, so code in it knows its worker
    threading.Thread(target=contextvars.copy_context().run, daemon=True,
                     name=f"dmlcore-ps-loop-{slot}",
                     args=(loop.run, executor, exchange, via, slot, batch_size, seed,
                           transfer, slow, compression)).start()
    return True


@hosted
def ps_ending(executor, wait=0.0):
    """None while the loop runs (after ``wait`` s at most); then its ending
    ``{"slot", "pushes", "ended", "via"}`` (``via``: "in-process", "socket",
    "tls socket" or "actor calls"), or the error it raised."""
    loop = executor.run_state
    if not isinstance(loop, _Loop):
        raise RuntimeError("no parameter-server loop was started on this executor")
    if not loop.done.wait(float(wait)):
        return None
    if loop.error is not None:
        raise loop.error
    return loop.ending


def _worker_loop(executor, exchange, slot, batch_size, seed, transfer, slow, compression=None):
    """Pull, compute, push round-robin over the executor's partitions until stopped.

    Returns ``{"slot", "pushes", "ended"}``; an unreachable server ends the loop
    normally (the driver decides what to do), a computation error raises.
    """
    view, model = executor.view, executor.model
    params = np.array(executor.params, copy=True)
    parts = {pid: (X, y, w) for pid, X, y, w in executor.parts}
    pids = sorted(parts)
    transfer = None if transfer is None else np.dtype(transfer)
    coder = None if compression is None else codecs.Compressor(compression, seed)
    # every exchange consumes its push before it returns: one gradient buffer
    # serves every step; a local pull of every value lands in params directly
    grad_buf = np.empty_like(params)
    into = params if view.index is None else None
    version, push, pushes, i = -1, None, 0, 0
    while True:
        pid = pids[i % len(pids)]
        try:
            reply = exchange(slot, push, pid, version, into=into)
        except Exception as exc:   # the server's worker died, or the call timed out
            return {"slot": slot, "pushes": pushes, "ended": f"server unreachable: {exc!r}"}
        pushes += push is not None
        push = None
        if reply is None:
            return {"slot": slot, "pushes": pushes, "ended": "stopped"}
        if isinstance(reply, str):             # not allowed to pull yet: ask again
            continue
        if reply.values is not None:
            version = reply.version
            view.scatter(params, reply.values)
        X, y, w = parts[pid]
        started = time.perf_counter()
        rows = local.batch_slice(X.shape[0], batch_size, reply.clock, seed, pid)
        loss, grad, n = local.loss_grad_sum(model, params, X, y, rows, view, out=grad_buf, w=w)
        if slow.get(pid):
            time.sleep(slow[pid])
        kind, payload = "sum", grad
        if transfer is not None:
            mean = (grad / local.mean_divisor(n)).astype(transfer)
            if np.isfinite(mean).all():
                kind, payload = "mean", mean
        elif coder is not None:
            kind = "coded"
            payload = coder.encode(grad / local.mean_divisor(n), (pid, reply.clock))
        push = Push(pid, reply.clock, loss, n, kind, payload, time.perf_counter() - started)
        i += 1


# ----------------------------------------------------------------------------
# The strategy (driver side)
# ----------------------------------------------------------------------------
class ParameterServer(Strategy):
    """Parameters in a Dask actor; workers pull, compute and push; see the module docstring.

    ``consistency``: ``"bsp"`` | ``"ssp"`` | ``"async"``; ``staleness``: SSP's
    bound s (clocks); ``batch_size``: rows per partition mini-batch (None =
    the whole partition); ``compression``: None, ``"float16"``, ``"int8"``
    or ``{"topk": ratio}`` (``transfer_dtype="float16"`` is an alias of
    ``compression="float16"``); ``trainable``: layer names (frozen layers are neither
    computed nor sent); ``poll_interval``: seconds between the driver's
    snapshots of the server; ``slow_partitions``: ``{partition: seconds}`` of
    sleep after each of that partition's mini-batches (stragglers).

    Recovery restarts from the last snapshot the driver saw: updates applied
    after it are lost and redone; no update the history showed is lost.
    """

    name = "ps"
    # what the workflow runner needs of a registered kind (``dmlcore.workflow.build``)
    unit = "steps"
    optimizer_keys = ()

    @classmethod
    def full_batch(cls, config):
        return False

    def __init__(self, consistency="async", staleness=2, batch_size=64, transfer_dtype=None,
                 trainable=None, poll_interval=0.05, slow_partitions=None, compression=None):
        super().__init__(trainable)
        if consistency not in CONSISTENCY:
            raise ValueError(f"consistency {consistency!r} is not one of {', '.join(CONSISTENCY)}")
        if int(staleness) < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
        if transfer_dtype not in (None, "float16", np.float16):
            raise ValueError(f"transfer_dtype must be None or 'float16', got {transfer_dtype!r}")
        compression = codecs.parse(compression)
        if transfer_dtype is not None and compression not in (None, "float16"):
            raise ValueError(f"transfer_dtype='float16' (an alias of compression='float16') "
                             f"conflicts with compression={compression!r}: give one of them")
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self.consistency = consistency
        self.staleness = int(staleness)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.transfer_dtype = None if transfer_dtype is None else "float16"
        self.compression = "float16" if transfer_dtype is not None else compression
        self.poll_interval = float(poll_interval)
        self.slow_partitions = {int(k): float(v) for k, v in (slow_partitions or {}).items()}

    @property
    def transfer(self):
        """The pulls' and float16 pushes' dtype: "float16" or None."""
        return "float16" if self.compression == "float16" else None

    @property
    def coded(self):
        """The pushes' ``compression`` spec when it is not float16 (else None)."""
        return None if self.compression in (None, "float16") else self.compression

    def steps_per_epoch(self, data):
        batches = [local.n_batches(int(n), self.batch_size) for n in data.partition_sizes]
        return max(batches) if self.consistency == "bsp" else sum(batches)

    def run_steps(self, ctx):
        if ctx.client is None:
            raise ValueError("ParameterServer needs a Dask cluster (its server is a Dask "
                             "actor): pass client=... or let dml.fit start one")
        return _Run(self, ctx).records()


class _Run:
    """One parameter-server run: the server actor, the worker loops, the
    driver's last snapshot of the state, the counts and the recoveries."""

    def __init__(self, strategy, ctx):
        self.cfg, self.ctx, self.client = strategy, ctx, ctx.client
        P = ctx.data.n_partitions
        self.parts = ctx.data.partition_futures()
        start = ctx.start_step if strategy.consistency == "bsp" else ctx.start_step // P
        self.partition_counts = np.zeros(P, dtype=np.int64)
        resumed = np.asarray(ctx.extra.get("partition_updates", ()), dtype=np.int64)
        if resumed.shape == (P,):           # dml.fit(resume=True) restores ctx.extra
            self.partition_counts += resumed
        self.worker_counts, self.slots, self.dead = {}, [], set()
        self.worker_seconds, self.moved_server = {}, False
        self.pool, self.actor_future, self.server = None, None, None
        # the state to resume from should the server be lost: the last snapshot's
        self.last = Snapshot([], ctx.trainable_values().copy(), _copy_state(ctx.opt_state),
                             ctx.start_step, np.full(P, start, dtype=np.int64),
                             np.ones(P, dtype=bool), False, {}, None, {})

    # ---- the driver's loop ----------------------------------------------------
    def records(self):
        ctx, timeout = self.ctx, self.ctx.timeout
        self.launch(self.last, ctx.data.workers())
        yielded, lost_pending = ctx.start_step, 0
        try:
            while True:
                started = time.monotonic()
                dead = self.dead_loop_workers()
                joined = [] if dead else self.newcomers()
                target = None if dead or joined else self.faster_host()
                try:
                    if dead or joined or target:  # stop here (exact state), re-place
                        snap = self.server.halt().result(timeout=timeout)
                    else:
                        snap = self.server.snapshot(self.cfg.poll_interval).result(
                            timeout=self.cfg.poll_interval + timeout)
                except Exception as exc:  # noqa: BLE001 - decided by server_lost
                    if not self.server_lost():
                        raise
                    lost_pending += self.recover(yielded, [self.server_worker], exc)
                    continue
                self.take(snap)
                for update in snap.updates:
                    yielded += 1
                    yield {"loss": float(update.loss), "bytes_sent": update.nbytes,
                           "staleness": update.staleness,
                           "partition": np.nan if update.partition is None else update.partition,
                           "worker": np.nan if update.slot is None else update.slot,
                           "updates_lost": lost_pending}
                    lost_pending = 0
                if dead:
                    lost_pending += self.recover(yielded, dead, None)
                    continue
                if joined:
                    self.grow(yielded, joined)
                    continue
                if target:
                    self.move_server(yielded, target)
                    continue
                if snap.stopped and not snap.updates and snap.count >= ctx.total_steps:
                    self.finish()
                    return
                rest = self.cfg.poll_interval - (time.monotonic() - started)
                if rest > 0:
                    time.sleep(rest)
        except GeneratorExit:       # the fit has its steps (or stops early): end cleanly
            self.finish()
            raise
        finally:
            self.shutdown()

    def take(self, snap):
        """Keep ``snap`` as the state to resume from; publish state and counts."""
        ctx = self.ctx
        self.last = snap
        if snap.updates:
            ctx.set_trainable_values(snap.values.astype(ctx.params.dtype, copy=False))
            ctx.opt_state = snap.opt_state
        self.partition_counts += snap.partition_pushes
        ctx.extra["partition_updates"] = self.partition_counts.copy()
        for slot, n in snap.pushes.items():
            address = self.slots[slot]
            self.worker_counts[address] = self.worker_counts.get(address, 0) + n
            self.worker_seconds[address] = (self.worker_seconds.get(address, 0.0)
                                            + snap.push_seconds[slot])
        self.publish()

    def publish(self):
        import xarray as xr

        counts, addresses = self.partition_counts, sorted(self.worker_counts)
        # (the per-step ``partition`` and ``worker`` variables name the pusher of
        # each update, so these counts run over dimensions of their own)
        self.ctx.outputs["partition_updates"] = xr.DataArray(
            counts.copy(), dims="partition_id",
            coords={"partition_id": np.arange(len(counts))})
        self.ctx.outputs["worker_updates"] = xr.DataArray(
            np.array([self.worker_counts[a] for a in addresses], dtype=np.int64),
            dims="worker_address", coords={"worker_address": np.array(addresses, dtype=str)})

    # ---- placement --------------------------------------------------------------
    def launch(self, state, placement, server_worker=None):
        """Start a server from ``state`` (a ``Snapshot``) and the worker loops
        on ``placement`` (partition -> worker, None for dropped ones); the
        server on ``server_worker`` if it is live, else on the live worker
        holding the fewest partitions."""
        ctx, cfg, client = self.ctx, self.cfg, self.client
        live = sorted(set(client.nthreads()) - self.dead)
        if not live:
            raise RuntimeError("the Dask cluster has no live worker left for the parameter server")
        by_worker = {}
        for pid in np.flatnonzero(state.active):
            by_worker.setdefault(placement[pid], []).append(int(pid))
        load = {w: len(by_worker.get(w, ())) for w in live}
        self.server_worker = (server_worker if server_worker in live
                              else min(live, key=lambda w: (load[w], w)))
        self.at_launch = (dict(self.worker_counts), dict(self.worker_seconds))
        self.launched_at = time.monotonic()
        slots = {}
        for w in sorted(by_worker):
            slots[w] = len(self.slots)
            self.slots.append(w)
        token = uuid.uuid4().hex
        self.actor_future = client.submit(
            _Server, token=token, consistency=cfg.consistency, staleness=cfg.staleness,
            optimizer=ctx.optimizer, values=state.values, opt_state=state.opt_state,
            clocks=state.clocks, active=state.active, count=state.count,
            stop_at=ctx.total_steps, transfer=cfg.transfer,
            remote_slots=[s for w, s in slots.items() if w != self.server_worker],
            actor=True, workers=[self.server_worker], allow_other_workers=False, pure=False)
        with client.as_current():       # the handle calls through this client, not the default
            self.server = self.actor_future.result(timeout=ctx.timeout)
        self.last_liveness = self.last_census = time.monotonic()
        # the loops run in the executors of the workers holding the partitions
        self.pool = ExecutorPool(ctx.model, ctx.data, client, direct=False, timeout=ctx.timeout,
                                 placement=[w if state.active[p] else None
                                            for p, w in enumerate(placement)])
        self.loop_workers = list(self.pool.workers)
        self.pool.call("configure", ctx.params, ctx.trainable)
        self.pool.call("ps_start", per_executor=[
            (self.server, token, self.server_worker, slots[w], cfg.batch_size, ctx.seed,
             cfg.transfer, cfg.slow_partitions, ctx.timeout, cfg.coded)
            for w in self.pool.workers])

    # ---- monitoring ---------------------------------------------------------------
    def dead_loop_workers(self):
        """Workers running loops that left the cluster; raises the error of a
        loop that failed (a computation error, naming its worker). Checked at
        most once a second."""
        now = time.monotonic()
        if now - self.last_liveness < 1.0:
            return []
        self.last_liveness = now
        try:
            self.pool.call("ps_ending", 0.0)
        except Exception:
            if not self.gone():
                raise
        return self.gone()

    def newcomers(self):
        """Live workers that run no loop (they joined after the launch), while some
        loop worker runs more than one partition; checked at most once a second."""
        now = time.monotonic()
        if now - self.last_census < 1.0:
            return []
        self.last_census = now
        counts = {}
        for w in self.placement_now():
            if w is not None:
                counts[w] = counts.get(w, 0) + 1
        if not counts or max(counts.values()) < 2:
            return []
        live = set(self.client.nthreads()) - self.dead
        return sorted(live - set(counts) - {self.server_worker})

    def placement_now(self):
        """The worker of each active partition's loop (None: dropped)."""
        out = [None] * len(self.last.active)
        for w, ids in zip(self.pool.workers, self.pool.partition_ids):
            for pid in ids:
                out[pid] = w
        return out

    def grow(self, yielded, joined):
        """Move partitions from the busiest loop workers to the ``joined`` ones
        (whole partitions, to within one of even) and start server and loops
        again from the halted state: nothing is lost."""
        ctx, t0 = self.ctx, time.monotonic()
        placement = self.placement_now()
        by_worker = {w: [] for w in joined}
        for pid, w in enumerate(placement):
            if w is not None:
                by_worker.setdefault(w, []).append(pid)
        moves = []
        while True:
            big = max(by_worker, key=lambda w: (len(by_worker[w]), w))
            small = min(by_worker, key=lambda w: (len(by_worker[w]), w))
            if len(by_worker[big]) - len(by_worker[small]) < 2:
                break
            pid = by_worker[big].pop()
            by_worker[small].append(pid)
            placement[pid] = small
            moves.append((pid, small))
        for pid, w in moves:
            ctx.data.moved([pid], w)        # the new loop fetches it from where it is
        self.relaunch(placement)
        self.event(yielded, joined, "loops moved to a joined worker", t0,
                   partitions_moved=" ".join(str(p) for p, _ in moves))
        logger.info("parameter server: partitions %s moved to joined worker(s) %s",
                    [p for p, _ in moves], joined)

    def faster_host(self):
        """The loop worker the server should move to, or None.

        Once per run, ``MOVE_AFTER_S`` seconds after the launch: when the loop
        on the server's worker took more than ``MOVE_SLOWER`` times as long
        per mini-batch as the fastest loop (``Push.seconds``, its computation
        only, no waits) and ``MOVE_MIN_GAP_S`` longer, the server moves to that
        fastest worker; a slow worker (a CPU quota, a loaded host) would serve
        every loop slowly. Needs ``MOVE_MIN_PUSHES`` mini-batches of each.
        """
        if self.moved_server or time.monotonic() - self.launched_at < MOVE_AFTER_S:
            return None
        counts, seconds = self.at_launch
        per_push = {}
        for w in self.loop_workers:
            n = self.worker_counts.get(w, 0) - counts.get(w, 0)
            if n >= MOVE_MIN_PUSHES:
                per_push[w] = (self.worker_seconds.get(w, 0.0) - seconds.get(w, 0.0)) / n
        if self.server_worker not in per_push or len(per_push) < 2:
            return None
        best = min(per_push, key=lambda w: (per_push[w], w))
        here, there = per_push[self.server_worker], per_push[best]
        if here > MOVE_SLOWER * there and here - there > MOVE_MIN_GAP_S:
            return best
        return None

    def move_server(self, yielded, target):
        """Halt the server (exact state) and start it again on ``target``, the
        loops where they are: nothing is lost."""
        t0, source = time.monotonic(), self.server_worker
        self.moved_server = True
        self.relaunch(self.placement_now(), server_worker=target)
        self.event(yielded, [source], "server moved off a slow worker", t0, partitions_moved="")
        logger.info("parameter server: moved from %s (its loop computed more than %gx "
                    "slower) to %s", source, MOVE_SLOWER, target)

    def relaunch(self, placement, server_worker=None):
        """End the loops and the (halted) server; start both again from the last
        snapshot on ``placement`` (``launch``)."""
        self.pool.close()
        self.end_server()
        self.launch(self.last, placement, server_worker=server_worker)

    def event(self, yielded, workers, what, t0, updates_lost=0, partitions_dropped="[]",
              **more):
        """Record a recovery or placement event of ``workers`` begun at ``t0``."""
        self.ctx.events.append({"step": yielded, "time": time.time(), "worker": ", ".join(workers),
                                "what": what, "server_worker": self.server_worker,
                                "from_update": self.last.count, "updates_lost": updates_lost,
                                "partitions_dropped": partitions_dropped, **more,
                                "recovery_s": time.monotonic() - t0})

    def gone(self):
        """Loop workers (other than the server's) no longer in the cluster."""
        live = set(self.client.nthreads())
        return sorted({w for w in self.loop_workers if w not in live} - {self.server_worker})

    def server_lost(self):
        """True when the server's worker is gone (its actor with it)."""
        return self.left(self.server_worker, also=lambda: self.actor_future.status
                         in ("error", "lost", "cancelled"))

    # ---- recovery -----------------------------------------------------------------
    def recover(self, yielded, dead, exc):
        """Re-create the server from the driver's last snapshot after ``dead``
        workers died; returns the updates lost (yielded but not in the snapshot)."""
        ctx, t0 = self.ctx, time.monotonic()
        self.dead.update(dead)              # the scheduler may still list them for a moment
        self.pool.close()                   # live loops end at their next call of the dead server
        self.end_server()
        state = self.last
        active = state.active.copy()
        placement, dropped = self.surviving_placement(active)
        dropped = self.rebuild(dropped, placement)
        if dropped:
            logger.warning("parameter server recovery: the data of partitions %s are lost "
                           "with worker %s; training goes on without them", dropped, dead)
            active[dropped] = False
        if not active.any():
            raise RuntimeError(f"every partition's data was lost with worker {dead}") from exc
        lost = max(0, yielded - state.count)
        self.launch(state._replace(active=active), placement)
        self.event(yielded, dead, "parameter server restarted", t0, updates_lost=lost,
                   partitions_dropped=str(dropped))
        logger.warning("parameter server re-created on %s from update %d after %s died: "
                       "%d update(s) lost", self.server_worker, state.count, dead, lost)
        return lost

    def rebuild(self, lost, placement):
        """Make the ``lost`` partitions again from their source, each on the live
        worker holding the fewest rows (``recovery.reassign``; ``placement``
        updated); returns those that keep no source (dropped)."""
        data = self.ctx.data
        live = sorted(set(self.client.nthreads()) - self.dead)
        if not live or not lost:
            return list(lost)
        held = [(w, [pid]) for pid, w in enumerate(placement) if w is not None]
        _, moved = reassign(held + [(None, [pid]) for pid in lost], data.partition_sizes,
                            live, [None])
        dropped = []
        for (pid,), target in moved:
            try:
                data.rehost([pid], target)
            except RuntimeError as exc:
                logger.warning("parameter server recovery: partition %d cannot be made "
                               "again (%s)", pid, exc)
                dropped.append(pid)
                continue
            placement[pid] = target
        self.parts = data.partition_futures()
        return dropped

    def surviving_placement(self, active, timeout=10.0):
        """Where each partition's data live now, and the partitions whose data are lost."""
        from distributed import wait

        futures = [f for pid in np.flatnonzero(active) for f in self.parts[pid]
                   if f is not None]
        try:       # data being recomputed by the scheduler
            wait([f for f in futures if f.status == "pending"], timeout=timeout)
        except Exception:  # noqa: BLE001 - timeouts and lost keys are judged below
            pass
        live = set(self.client.nthreads()) - self.dead
        kept = [f for f in futures if f.status == "finished"]
        try:
            who = self.client.who_has(kept) if kept else {}
        except Exception:  # noqa: BLE001 - a key forgotten meanwhile: ask one by one
            who = {}
            for f in kept:
                try:
                    who.update(self.client.who_has([f]))
                except Exception:  # noqa: BLE001
                    pass
        placement, dropped = [None] * len(active), []
        for pid in np.flatnonzero(active):
            holders = None
            for f in self.parts[pid]:
                if f is None:
                    continue
                here = {w for w in who.get(f.key, ()) if w in live}
                holders = here if holders is None else holders & here
            if not holders or any(f is not None and f.status != "finished"
                                  for f in self.parts[pid]):
                dropped.append(int(pid))
            else:
                placement[pid] = sorted(holders)[0]
        return placement, dropped

    def finish(self):
        """Stop the server and wait for every loop's ending (within the
        deadline); raises a loop's error, naming its worker. The driver holds
        every update by now, so a worker that left since (the server's or a
        loop's) costs the fit nothing: it is logged, and its loop's ending
        says "worker lost after the last update"."""
        timeout = self.ctx.timeout
        try:
            self.server.stop().result(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - decided by whether its worker left
            if not self.server_lost():
                raise
            logger.warning("parameter server: its worker %s left after the last update (%r); "
                           "the fit has every update", self.server_worker, exc)
        self.server = None
        pool = self.pool
        outcomes = wait_all([pool.submit_one(i, "ps_ending", timeout) for i in range(len(pool))],
                            timeout + 5, grace=min(timeout, 2.0))
        for i, ((ok, _), worker) in enumerate(zip(outcomes, pool.workers)):
            if not ok and self.left(worker):
                logger.warning("parameter server: loop worker %s left after the last update",
                               worker)
                slot = max(s for s, w in enumerate(self.slots) if w == worker)
                outcomes[i] = (True, {"slot": slot, "pushes": None, "via": None,
                                      "ended": "worker lost after the last update"})
        error = first_error(outcomes, pool.workers)
        if error is not None:
            raise error
        self.ctx.outputs["loop_endings"] = [ending for _, ending in outcomes]

    def left(self, worker, within=10.0, also=lambda: False):
        """Whether ``worker`` is no longer in the cluster, or ``also()`` holds
        (waiting up to ``within`` s for the scheduler to notice a death)."""
        deadline = time.monotonic() + within
        while not also() and worker in self.client.nthreads():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def shutdown(self):
        """Stop the server and release everything (after ``finish``, or an error)."""
        if self.server is not None:
            try:
                self.server.stop().result(timeout=self.ctx.timeout)
            except Exception as exc:  # noqa: BLE001 - the loops end on their own then
                logger.debug("parameter server stop failed: %r", exc)
        if self.pool is not None:
            self.pool.close()
        self.end_server()
        self.pool = None

    def end_server(self):
        """Cancel the server's actor (its handle holds a future of its own: a mere
        release would leave it on its worker until garbage collection)."""
        if self.actor_future is not None:
            try:
                self.client.cancel([self.actor_future])
            except Exception as exc:  # noqa: BLE001 - a closed client: nothing left to end
                logger.debug("cancelling the parameter server failed: %r", exc)
        self.actor_future, self.server = None, None
