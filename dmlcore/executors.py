"""Per-worker executors: where the partitions' kernels run, one per worker.

A ``PartitionExecutor`` is a Dask actor on the worker that holds its
partitions and keeps REFERENCES to their arrays (no copies), plus a run's
frozen parameters. Executors host computations, they do not contain
algorithms: a strategy registers its worker-side functions with ``@hosted``
in its own module (SyncSGD's replica steps, FedAvg's client training, the
parameter server's loop) and the driver calls them by name. What a hosted
function keeps between calls lives in ``executor.run_state`` and can be
rebuilt from the driver's copy at any sync point.

The per-step calls take a ``channel`` socket to each executor (Dask actor
calls where workers are not on TCP/TLS, or with ``direct=False``). The tree
is the same either way: partitions are summed on their worker, then the
workers' partials on the driver (or on every replica after a ``PeerMesh``
exchange, in the same order). ``ExecutorPool`` creates one executor per
worker holding partitions (one in-process executor without a cluster) and
calls a method on all of them concurrently, with a deadline.
"""
from __future__ import annotations

import logging

import numpy as np

from . import local
from .aggregate import add_partials
from .messages import Partial
from .data import as_block
from .channel import (DEFAULT_TIMEOUT, Channel, ChannelServer, PeerMesh, call_frames,
                      first_error, wait_all)


logger = logging.getLogger("dmlcore")
_logged_fallbacks: set = set()


def log_once(key, message, *args):
    """``logger.warning(message, *args)`` the first time ``key`` is seen."""
    if key not in _logged_fallbacks:
        _logged_fallbacks.add(key)
        logger.warning(message, *args)


def _log_fallback(reason):
    """Log once per reason that the per-step calls take Dask actor calls."""
    log_once(reason, "dmlcore: per-step calls use Dask actor calls (no direct sockets, "
                     "driver-side updates): %s", reason)


def worker_tls():
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


def lane_bytes(model):
    """A shared-memory lane's slot for ``model``: two float64 parameter
    vectors (a gradient and its loss, in either dtype) plus 64 KiB."""
    return 16 * int(getattr(model, "n_params", 0) or 0) + (1 << 16)


def hosted(function):
    """Register ``function(executor, *args, **kwargs)`` as a method executors
    host: a strategy's worker-side step, written in the strategy's module and
    called by name like the executor's own methods (``ExecutorPool.call``)."""
    _HOSTED[function.__name__] = function
    return function


_HOSTED: dict = {}


def _hosted():
    """The hosted functions, every strategy module imported (workers too)."""
    from . import strategies  # noqa: F401 - registers the strategies' functions

    return _HOSTED


class PartitionExecutor:
    """Holds ``[(partition id, X, y, w), ...]`` of one worker (``w``: row weights
    or None) and runs local computations; built from ``(X, y, w)`` triples.

    Its own methods are the transport and the generic computation (the
    trainable view, ``loss_grad``); a strategy's worker-side algorithm is a
    ``hosted`` function, which keeps its per-run state in ``self.run_state``
    (dropped when the driver hangs up)."""

    # the executor's own methods the driver may call over the channel; hosted
    # functions are callable too (``channel.ChannelServer``)
    OWN_METHODS = ("configure", "loss_grad", "open_peers", "connect_peers")

    def __init__(self, model, partition_ids, *arrays):
        self.model = model
        self.parts = [(int(pid), arrays[3 * i], self._labels(arrays[3 * i], arrays[3 * i + 1]),
                       arrays[3 * i + 2]) for i, pid in enumerate(partition_ids)]
        self.params = None
        self.view = model.trainable_view(None)
        self._channel = self.mesh = None
        self.run_state = None
        self._tls = None                    # (server, client) SSL contexts on TLS clusters
        self.timeout = DEFAULT_TIMEOUT

    @property
    def CHANNEL_METHODS(self):  # noqa: N802 - the name ChannelServer reads
        return self.OWN_METHODS + tuple(_hosted())

    def __getattr__(self, name):
        function = _hosted().get(name) if not name.startswith("_") else None
        if function is None:
            raise AttributeError(f"{type(self).__name__} has no method {name!r}")
        return lambda *args, **kwargs: function(self, *args, **kwargs)

    def host(self, name, *args, **kwargs):
        """Run the hosted function ``name`` here (the Dask-actor path to it)."""
        return getattr(self, name)(*args, **kwargs)

    def _labels(self, X, y):
        """``y`` in the dtype the model's kernel takes, converted once (y is ~1/d of X)."""
        dtype = self.model.label_dtype(X.dtype)
        return y if y.dtype == dtype else np.ascontiguousarray(y, dtype=dtype)

    def configure(self, params, trainable=None):
        """Keep the full parameters (frozen layers are taken from here) and the trainable set."""
        self.params = np.array(params, copy=True)
        self.view = self.model.trainable_view(trainable)
        return True

    def full_params(self, values):
        """Full parameter vector with ``values`` on the trainable entries."""
        if self.view.index is None:
            return values
        return self.view.scatter(self.params, values)

    def open_channel(self, host, timeout=DEFAULT_TIMEOUT, tls=False):
        """Serve this executor's methods on a socket on ``host``; returns the
        ``(host, port, token)`` a ``channel.Channel`` connects with. ``timeout``
        bounds this executor's data-plane waits (its peer exchanges); ``tls``:
        this socket and the peer mesh use the worker's TLS certificates."""
        self.timeout = float(timeout)
        self._tls = worker_tls() if tls else None
        self._channel = ChannelServer(self, host, max_bytes=message_cap(self.model, len(self.parts)),
                                      timeout=self.timeout,
                                      ssl_context=self._tls and self._tls[0])
        return self._channel.address

    def channel_closed(self):
        """The driver hung up: drop the run's state and the peer sockets."""
        self.close_mesh()

    # ---- the peer mesh (executor <-> executor) ------------------------------------
    def open_peers(self, host):
        """Listen for the other executors; returns this executor's mesh address."""
        self.close_mesh()
        self.mesh = PeerMesh(host, timeout=self.timeout,
                             max_bytes=message_cap(self.model, len(self.parts)),
                             ssl_contexts=self._tls, lane_bytes=lane_bytes(self.model))
        return self.mesh.address

    def connect_peers(self, index, addresses):
        return self.mesh.connect(index, addresses)

    def close_mesh(self):
        """Close the peer sockets (the peers stop waiting for this executor) and
        drop the run's state."""
        mesh, self.mesh, self.run_state = self.mesh, None, None
        if mesh is not None:
            mesh.close()

    # ---- generic computation ------------------------------------------------------
    def loss_grad(self, values, step, batch_size, seed, buffers=None):
        """``messages.Partial``: the sums over local partitions on the batch of ``step``.

        ``buffers``: one full-gradient buffer per partition, reused by loops
        (the returned gradient may then be a view of one of them).
        """
        params = self.full_params(values)
        partials = [
            Partial(*local.loss_grad_sum(
                self.model, params, X, y,
                local.batch_slice(X.shape[0], batch_size, step, seed, pid), self.view,
                out=None if buffers is None else buffers[i], w=w))
            for i, (pid, X, y, w) in enumerate(self.parts)
        ]
        return partials[0] if len(partials) == 1 else add_partials(*partials)


def array_bytes(obj):
    """Total ``nbytes`` of the NumPy arrays in nested tuples, lists and dicts."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(array_bytes(v) for v in obj)
    if isinstance(obj, dict):
        return sum(array_bytes(v) for v in obj.values())
    return 0


class _Done:
    """A finished in-process call, shaped like a future: ``result()`` returns or raises."""

    def __init__(self, value=None, error=None):
        self.value, self.error = value, error

    def result(self, timeout=None):
        if self.error is not None:
            raise self.error
        return self.value


def _sent(send):
    """``send()``'s channel future, or a failed one when the send itself failed (a
    dead worker's socket): the error is then raised by ``results`` with the others."""
    try:
        return send()
    except ConnectionError as exc:
        return _Done(error=exc)


def placement_groups(placement):
    """``[(worker, [partition ids])]``, one group per worker in ``placement`` (the
    worker of each partition; None: left out), sorted by worker."""
    ids_by_worker: dict[str, list[int]] = {}
    for pid, worker in enumerate(placement):
        if worker is not None:
            ids_by_worker.setdefault(worker, []).append(pid)
    return [(w, ids_by_worker[w]) for w in sorted(ids_by_worker)]


class ExecutorPool:
    """One executor per group of partitions (by default the partitions of one
    worker); ``call`` runs a method on all. ``workers[i]`` hosts executor i,
    which holds partitions ``partition_ids[i]``; results come in that order."""

    def __init__(self, model, data, client=None, direct=True, timeout=DEFAULT_TIMEOUT,
                 placement=None, groups=None):
        """``direct``: make the calls over ``channel`` sockets (workers on TCP;
        otherwise, or when the sockets cannot connect, Dask actor calls, the
        fallback logged once with its reason);
        ``timeout``: the deadline of every data-plane wait (seconds);
        ``placement``: the worker of each partition (None: left out), default
        where the data lie (``data.workers()``);
        ``groups``: ``[(worker, [partition ids]), ...]``, one executor each, in
        this order (a worker may host several): a pool re-made after a worker
        was lost keeps the groups, hence the order of every sum."""
        self.client = client
        self.model, self.timeout = model, float(timeout)
        self.channels = []
        self._actor_bytes = 0
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
        if groups is None:
            groups = placement_groups(data.workers() if placement is None else placement)
        self.workers = [w for w, _ in groups]
        self.partition_ids = [list(ids) for _, ids in groups]
        actor_futures = [
            client.submit(PartitionExecutor, model, ids,
                          *[f for pid in ids for f in futures[pid]],
                          actor=True, workers=[w], allow_other_workers=False, pure=False)
            for w, ids in zip(self.workers, self.partition_ids)
        ]
        with client.as_current():       # the handles call through this client, not the default
            self.executors = [f.result(timeout=self.timeout) for f in actor_futures]
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
            return _sent(lambda: self.channels[index].submit(method, *args, **kwargs))
        executor = self.executors[index]
        if self.client is not None:         # a Dask actor: hosted functions go through host()
            self._actor_bytes += array_bytes((args, kwargs))
            if method in _hosted():
                return executor.host(method, *args, **kwargs)
            return getattr(executor, method)(*args, **kwargs)
        try:
            return _Done(getattr(executor, method)(*args, **kwargs))
        except Exception as exc:  # mirror a failed remote call
            return _Done(error=exc)

    def submit(self, method, *args, **kwargs):
        """Start ``method`` on every executor; returns one future-like per executor."""
        if self.channels:                   # encode the call once for every channel
            frames = call_frames(method, *args, **kwargs)
            return [_sent(lambda c=channel: c.submit_frames(method, frames))
                    for channel in self.channels]
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

    def results(self, futures, wait=None, indices=None):
        """The values of ``futures`` (one per executor, from ``submit``; or of
        the executors ``indices``), all waited on together; raises like ``call``."""
        outcomes = wait_all(futures, self.timeout if wait is None else float(wait),
                            grace=min(self.timeout, 2.0))
        names = self.workers if indices is None else [self.workers[i] for i in indices]
        error = first_error(outcomes, names)
        if error is not None:
            raise error
        values = [value for _, value in outcomes]
        if self.client is not None and not self.channels:
            self._actor_bytes += array_bytes(values)
        return values

    def traffic(self):
        """Bytes that crossed between the driver and the executors so far: the
        channels' message frames both ways, or, over Dask actor calls, the
        arrays in the calls and their replies (0 in-process)."""
        return self._actor_bytes + sum(c.bytes_sent + c.bytes_received for c in self.channels)

    def _close_channels(self):
        for channel in self.channels:
            channel.close()
        self.channels = []

    def close(self):
        """Close the channels and end the executors: their actors are cancelled,
        not only released (each actor handle holds a future of its own, so a
        released actor would live on its worker until the handles are
        garbage-collected, and Dask refuses to retire a worker holding one)."""
        self._close_channels()
        self.executors = []
        futures, self._actor_futures = getattr(self, "_actor_futures", []), []
        if futures:
            try:
                self.client.cancel(futures)
            except Exception as exc:  # noqa: BLE001 - a closed client: nothing left to end
                logger.debug("cancelling the executors failed: %r", exc)
