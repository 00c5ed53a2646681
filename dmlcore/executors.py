"""Per-worker executors: where the partitions' kernels run, one per worker.

A ``PartitionExecutor`` lives on the worker that holds its partitions (as a
Dask actor) and keeps REFERENCES to those partitions' arrays — the same
objects the worker holds, no copies — plus the frozen parameters of a run.
The driver (or the parameter server) owns the training state; under
``SyncSGD(apply_on="workers")`` each executor also holds a REPLICA of the
trainable parameters and optimizer state between the driver's sync points
(``start_replica`` / ``replica_steps`` / ``replica_state``), and the driver's
copy is authoritative again after each sync, so an executor can still be
re-created at any sync point.

Why executors for the hot path: a scheduler round trip per step waits for the
client's batched-send interval. An actor call goes straight to the worker,
but still crosses the client's event loop; so each executor also
opens a ``channel`` (a token-guarded socket served by a thread on its worker)
and the per-step calls take that path, with Dask actors as the control plane
and the fallback where workers do not talk TCP. The tree is the same:
partitions are summed on their worker, then the workers' partials are summed
on the driver (or, for replicas, on every executor after a ``PeerMesh``
exchange, in the same order).

``ExecutorPool`` creates one executor per worker holding partitions (or one
in-process executor when there is no cluster) and calls a method on all of
them concurrently.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from . import local
from .aggregate import add_partials
from .data import as_block
from .channel import (DEFAULT_TIMEOUT, Channel, ChannelServer, PeerMesh, call_frames,
                      first_error, wait_all)


logger = logging.getLogger("dmlcore")
_logged_fallbacks: set = set()


def _log_fallback(reason):
    """Log once per reason that the per-step calls take Dask actor calls."""
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        logger.warning("dmlcore: per-step calls use Dask actor calls (no direct sockets, "
                       "driver-side updates): %s", reason)


def _worker_tls():
    """(server, client) SSL contexts from the ``distributed.Security`` of the
    worker this runs on (its certificate, the cluster's CA)."""
    from distributed import get_worker

    security = get_worker().security
    contexts = (security.get_listen_args("worker")["ssl_context"],
                security.get_connection_args("worker")["ssl_context"])
    if None in contexts:
        raise ValueError("this worker's Security holds no TLS certificate")
    return contexts


def message_cap(model, n_parts):
    """The largest data-plane message accepted for ``model`` with ``n_parts``
    partitions on one executor: eight float64 parameter vectors per partition
    and one more (values, gradients, optimizer state), plus 1 MiB of slack."""
    n_params = int(getattr(model, "n_params", 0) or 0)
    return 8 * 8 * n_params * (int(n_parts) + 1) + (1 << 20)


class PartitionExecutor:
    """Holds ``[(partition id, X, y, w), ...]`` of one worker (``w``: row weights
    or None) and runs local computations; built from ``(X, y, w)`` triples."""

    # what the driver may call over the channel (``channel.ChannelServer``)
    CHANNEL_METHODS = ("configure", "loss_grad", "local_train", "open_peers",
                       "connect_peers", "start_replica", "replica_steps", "replica_state",
                       "close_replica")

    def __init__(self, model, partition_ids, *arrays):
        self.model = model
        self.parts = [(int(pid), arrays[3 * i], self._labels(arrays[3 * i], arrays[3 * i + 1]),
                       arrays[3 * i + 2]) for i, pid in enumerate(partition_ids)]
        self.params = None
        self.trainable = None
        self.idx = None
        self._channel = self._mesh = self._replica = None
        self._tls = None                    # (server, client) SSL contexts on TLS clusters
        self.timeout = DEFAULT_TIMEOUT

    def _labels(self, X, y):
        """``y`` in the dtype the model's kernel takes, converted once (y is ~1/d of X)."""
        dtype = self.model.label_dtype(X.dtype)
        return y if y.dtype == dtype else np.ascontiguousarray(y, dtype=dtype)

    def configure(self, params, trainable=None):
        """Keep the full parameters (frozen layers are taken from here) and the trainable set."""
        self.params = np.array(params, copy=True)
        self.trainable = None if trainable is None else list(trainable)
        self.idx = local.trainable_index(self.model, self.trainable)
        return True

    def _params(self, values):
        """Full parameter vector with ``values`` on the trainable entries."""
        if self.trainable is None:
            return values
        self.params[self.idx] = values
        return self.params

    def open_channel(self, host, timeout=DEFAULT_TIMEOUT, tls=False):
        """Serve this executor's methods on a socket on ``host``; returns the
        ``(host, port, token)`` a ``channel.Channel`` connects with. ``timeout``
        bounds this executor's data-plane waits (its peer exchanges); ``tls``:
        this socket and the peer mesh use the worker's TLS certificates."""
        self.timeout = float(timeout)
        self._tls = _worker_tls() if tls else None
        self._channel = ChannelServer(self, host, max_bytes=message_cap(self.model, len(self.parts)),
                                      timeout=self.timeout,
                                      ssl_context=self._tls and self._tls[0])
        return self._channel.address

    def channel_closed(self):
        """The driver hung up: drop the replica and the peer sockets."""
        self.close_replica()

    # ---- replicated optimizer (DDP): see strategies/sync.py ---------------------
    def open_peers(self, host):
        """Listen for the other executors; returns this executor's mesh address."""
        self.close_replica()
        self._mesh = PeerMesh(host, timeout=self.timeout,
                              max_bytes=message_cap(self.model, len(self.parts)),
                              ssl_contexts=self._tls)
        return self._mesh.address

    def connect_peers(self, index, addresses):
        return self._mesh.connect(index, addresses)

    def start_replica(self, values, optimizer, opt_state):
        """Take the driver's trainable values and optimizer state as this replica's."""
        self._replica = [np.array(values, copy=True), optimizer, opt_state]
        return True

    def replica_steps(self, first_step, n_steps, batch_size, seed):
        """Run ``n_steps`` synchronous steps on the replica; returns (mean
        losses, seconds since the call began at each step's end).

        A step: the local (loss, grad, rows) sums, then the exchange that
        ``sharded_exchange`` picks. Both add the partial gradients in executor
        order (the driver's order, so the driver-applied path gets the same
        bits), divide by the rows and apply the optimizer:
        * full: every executor sends its whole gradient to every other and
          updates the whole vector (one round; n(n-1) vectors move);
        * sharded (ZeRO-1 style reduce-scatter + all-gather): executor j owns
          slice j of the vector (``shard_bounds``), receives every peer's
          gradient on that slice, updates that slice of the parameters and
          of the optimizer state, and sends the new slice to every peer (two
          rounds; 2(n-1) vectors move; 1/n of the update work each).
        """
        try:
            return self._replica_steps(first_step, n_steps, batch_size, seed)
        except BaseException:
            self.close_replica()        # the peers stop waiting for this executor now
            raise

    def _replica_steps(self, first_step, n_steps, batch_size, seed):
        values, optimizer, state = self._replica
        n, me = self._mesh.size, self._mesh.index
        sharded, bounds, (lo, hi) = self._replica_slices()
        # buffers reused by every step: full gradient of each partition, the total
        full = [np.empty_like(self._params(values)) for _ in self.parts]
        total = np.empty(hi - lo, dtype=values.dtype)
        losses, ends = [], []
        t0 = time.perf_counter()
        for step in range(int(first_step), int(first_step) + int(n_steps)):
            loss, grad, rows = self.loss_grad(values, step, batch_size, seed, buffers=full)
            if sharded:
                everyone = self._mesh.alltoall(
                    [(loss, grad[bounds[j]:bounds[j + 1]], rows) for j in range(n)], "grad")
            else:
                everyone = self._mesh.exchange((loss, grad, rows), "grad")
            np.copyto(total, everyone[0][1])        # (p0 + p1) + p2 ...: the driver's order
            for other in everyone[1:]:
                total += other[1]
            loss = sum(p[0] for p in everyone)
            rows = sum(p[2] for p in everyone)
            total /= local.mean_divisor(rows)
            state = _update_slice(optimizer, total, state, values, lo, hi)
            if sharded:
                for j, piece in enumerate(self._mesh.exchange(values[lo:hi], "values")):
                    if j != me:
                        values[bounds[j]:bounds[j + 1]] = piece
            self._replica[2] = state
            losses.append(loss / local.mean_divisor(rows))
            ends.append(time.perf_counter() - t0)
        return losses, ends

    def _replica_slices(self):
        """``(sharded, bounds, (lo, hi))``: whether the exchange is sharded, the
        slices' boundaries, and the slice [lo, hi) this replica updates (all of
        the vector when not sharded)."""
        size, n, me = self._replica[0].shape[0], self._mesh.size, self._mesh.index
        sharded = sharded_exchange(n, self._replica[0].nbytes)
        bounds = shard_bounds(size, n)
        return sharded, bounds, ((bounds[me], bounds[me + 1]) if sharded else (0, size))

    def replica_state(self):
        """``(trainable values, optimizer state, (lo, hi))``: the state is
        current on [lo, hi) only (the slice this executor updates)."""
        values, _, state = self._replica
        return values, state, self._replica_slices()[2]

    def close_replica(self):
        mesh, self._mesh, self._replica = self._mesh, None, None
        if mesh is not None:
            mesh.close()

    def loss_grad(self, values, step, batch_size, seed, buffers=None):
        """Sum over local partitions of (loss sum, grad sum, rows) on the batch of ``step``.

        ``buffers``: one full-gradient buffer per partition, reused by loops
        (the returned gradient may then be a view of one of them).
        """
        params = self._params(values)
        partials = [
            local.loss_grad_sum(self.model, params, X, y,
                                local.batch_slice(X.shape[0], batch_size, step, seed, pid),
                                self.trainable, self.idx,
                                out=None if buffers is None else buffers[i], w=w)
            for i, (pid, X, y, w) in enumerate(self.parts)
        ]
        return partials[0] if len(partials) == 1 else add_partials(*partials)

    def local_train(self, values, optimizer, *, round_, batch_size, seed, local_epochs=None,
                    local_steps=None, proximal_mu=0.0, partitions=None, fail=()):
        """Local SGD on each selected partition (client) from ``values``; sums taken here.

        Client k runs ``local_steps`` steps, or ``local_epochs`` epochs of its
        ``n_batches_k`` mini-batches, of ``batch_size`` rows; its local step
        counter starts at ``round_ * (its steps per round)`` so every round
        visits fresh mini-batch orders. ``partitions``: ids to train (None =
        all). Clients are isolated: one that raises, or whose weights are not
        finite, is reported in ``failed`` and left out of the sums. ``fail``: ids
        that raise on purpose (the failure-policy testing hook).
        Returns ``(sum_k n_k * w_k in float64 or None, sum_k n_k, loss sum, rows
        seen, ids that counted, failed [(id, message)])``, ``n_k`` = client k's
        rows (its total row weight on weighted data).
        """
        if (local_epochs is None) == (local_steps is None):
            raise ValueError("give exactly one of local_epochs, local_steps")
        params = self._params(values)
        wanted = None if partitions is None else set(int(p) for p in partitions)
        fail = set(int(p) for p in fail)
        weighted, weight, loss, rows, ids, failed = None, 0, 0.0, 0, [], []
        for pid, X, y, w in self.parts:
            if wanted is not None and pid not in wanted:
                continue
            n_k = int(X.shape[0])
            n_steps = local_steps or local_epochs * local.n_batches(n_k, batch_size)
            if w is not None:
                n_k = float(w.sum(dtype=np.float64))
            try:
                if pid in fail:
                    raise RuntimeError(f"injected failure of client {pid} in round {round_}")
                new, loss_k, rows_k = local.local_sgd(
                    self.model, optimizer, params, X, y, batch_size=batch_size,
                    n_steps=n_steps, seed=seed, partition=pid,
                    first_step=int(round_) * n_steps, trainable=self.trainable,
                    idx=self.idx, proximal_mu=proximal_mu, w=w)
                if not (np.isfinite(new).all() and np.isfinite(loss_k)):
                    raise FloatingPointError(f"client {pid}: non-finite weights or loss")
            except Exception as exc:  # noqa: BLE001 — the failure policy is the caller's
                failed.append((pid, f"{type(exc).__name__}: {exc}"))
                continue
            contribution = n_k * new.astype(np.float64)     # exact: n_k * float32 in float64
            if weighted is None:
                weighted = contribution
            else:
                weighted += contribution
            weight += n_k
            loss += loss_k
            rows += rows_k
            ids.append(pid)
        return weighted, weight, loss, rows, ids, failed

def sharded_exchange(n, nbytes):
    """Whether ``n`` replicas of an ``nbytes`` vector use reduce-scatter +
    all-gather (two rounds, 2(n-1) vectors) rather than a full exchange of
    gradients (one round, n(n-1) vectors). Two replicas move the same bytes
    either way and the single round is cheaper (one round trip fewer); above
    two, sharding wins once the extra vectors cost more than a round, taken
    here as 64 KiB per executor."""
    return n > 2 and (n - 2) * nbytes > 1 << 16


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
    """The driver's optimizer state from each executor's ``replica_state``:
    per-parameter fields taken slice by slice from their owners."""
    values, state, _ = pieces[0]
    size = values.shape[0]
    names = _per_parameter(state, size)
    merged = {name: np.empty_like(getattr(state, name)) for name in names}
    for _, piece_state, (lo, hi) in pieces:
        for name in names:
            merged[name][lo:hi] = getattr(piece_state, name)[lo:hi]
    return values, state._replace(**merged)


class _Done:
    """A finished in-process call, shaped like a future: ``result()`` returns or raises."""

    def __init__(self, value=None, error=None):
        self.value, self.error = value, error

    def result(self, timeout=None):
        if self.error is not None:
            raise self.error
        return self.value


class ExecutorPool:
    """One executor per worker holding partitions; ``call`` runs a method on all."""

    def __init__(self, model, data, client=None, direct=True, timeout=DEFAULT_TIMEOUT):
        """``direct``: make the calls over ``channel`` sockets (workers on TCP;
        otherwise, or when the sockets cannot connect, Dask actor calls, the
        fallback logged once with its reason);
        ``timeout``: the deadline of every data-plane wait (seconds)."""
        self.client = client
        self.model, self.timeout = model, float(timeout)
        self.channels = []
        ids_by_worker: dict[str, list[int]] = {}
        if client is None:
            blocks = [(as_block(xb.compute(scheduler="sync")),
                       np.asarray(yb.compute(scheduler="sync")),
                       None if wb is None else np.asarray(wb.compute(scheduler="sync")))
                      for xb, yb, wb in zip(data.x_blocks(), data.y_blocks(), data.w_blocks())]
            self.executors = [PartitionExecutor(model, list(range(len(blocks))),
                                                *[a for xyw in blocks for a in xyw])]
            self.workers = ["in-process"]
            self.partition_ids = [list(range(len(blocks)))]
            return
        futures = data.partition_futures()
        for pid, worker in enumerate(data.workers()):
            ids_by_worker.setdefault(worker, []).append(pid)
        self.workers = sorted(ids_by_worker)
        self.partition_ids = [ids_by_worker[w] for w in self.workers]
        actor_futures = [
            client.submit(PartitionExecutor, model, ids,
                          *[f for pid in ids for f in futures[pid]],
                          actor=True, workers=[w], allow_other_workers=False, pure=False)
            for w, ids in zip(self.workers, self.partition_ids)
        ]
        with client.as_current():       # the handles call through this client, not the default
            self.executors = [f.result() for f in actor_futures]
        self._actor_futures = actor_futures
        if not direct:
            return
        protocols = sorted({w.split("://")[0] for w in self.workers})
        if protocols not in (["tcp"], ["tls"]):
            _log_fallback(f"workers on {', '.join(p + '://' for p in protocols)} (direct "
                          "sockets need tcp:// or tls://)")
            return
        tls = None
        if protocols == ["tls"]:
            tls = getattr(client, "security", None)
            tls = tls and tls.get_connection_args("client")["ssl_context"]
            if tls is None:
                _log_fallback("a tls:// cluster, but the client's Security holds no "
                              "certificate for the direct sockets")
                return
        try:
            self._open_channels(tls)
        except (OSError, ValueError) as exc:
            _log_fallback(f"the direct sockets could not connect ({exc})")

    def hosts(self):
        """The host of each executor's worker (where its sockets listen)."""
        from distributed.comm import get_address_host

        return [get_address_host(w) for w in self.workers]

    def connect_mesh(self):
        """Connect every pair of executors (``PeerMesh``); needs channels."""
        addresses = self.call("open_peers", per_executor=[(h,) for h in self.hosts()])
        self.call("connect_peers", per_executor=[(i, addresses) for i in range(len(self))])

    def _open_channels(self, ssl_context=None):
        """One channel per executor; ``ssl_context`` (the client's, TLS
        clusters): the channels and the executors' mesh run over TLS."""
        tls = ssl_context is not None
        addresses = [e.open_channel(h, self.timeout, tls)
                     for e, h in zip(self.executors, self.hosts())]
        try:
            for address, worker, ids in zip(addresses, self.workers, self.partition_ids):
                self.channels.append(Channel(address.result(timeout=self.timeout),
                                             timeout=self.timeout, name=worker,
                                             max_bytes=message_cap(self.model, len(ids)),
                                             ssl_context=ssl_context))
        except BaseException:
            self._close_channels()
            raise

    def __len__(self):
        return len(self.executors)

    def submit_one(self, index, method, *args, **kwargs):
        """Start ``method`` on executor ``index``; a future-like whose ``result()``
        returns the value or raises the call's error (in-process calls too)."""
        if self.channels:
            return self.channels[index].submit(method, *args, **kwargs)
        executor = self.executors[index]
        if self.client is not None:
            return getattr(executor, method)(*args, **kwargs)
        try:
            return _Done(getattr(executor, method)(*args, **kwargs))
        except Exception as exc:  # mirror a failed remote call
            return _Done(error=exc)

    def submit(self, method, *args, **kwargs):
        """Start ``method`` on every executor; returns one future-like per executor."""
        if self.channels:                   # encode the call once for every channel
            frames = call_frames(method, *args, **kwargs)
            return [channel.submit_frames(method, frames) for channel in self.channels]
        return [self.submit_one(i, method, *args, **kwargs) for i in range(len(self))]

    def call(self, method, *args, per_executor=None, wait=None, **kwargs):
        """Run ``method`` on every executor concurrently; list of results.

        ``per_executor``: one tuple of positional arguments per executor
        (instead of ``args``). ``wait``: seconds to wait for the first reply
        (default ``timeout``); see ``channel.wait_all``. When a call fails the
        error raised is the original one (not a peer's consequent
        ``PeerLost``), its message naming the worker it came from.
        """
        if per_executor is None:
            futures = self.submit(method, *args, **kwargs)
        else:
            futures = [self.submit_one(i, method, *a, **kwargs)
                       for i, a in enumerate(per_executor)]
        return self.results(futures, wait)

    def results(self, futures, wait=None):
        """The values of ``futures`` (one per executor, from ``submit``), all
        waited on together; raises like ``call``."""
        outcomes = wait_all(futures, self.timeout if wait is None else float(wait),
                            grace=min(self.timeout, 2.0))
        error = first_error(outcomes, self.workers)
        if error is not None:
            raise error
        return [value for _, value in outcomes]

    def _close_channels(self):
        for channel in self.channels:
            channel.close()
        self.channels = []

    def close(self):
        self._close_channels()
        self.executors = []
        for f in getattr(self, "_actor_futures", []):
            f.release()
        self._actor_futures = []
