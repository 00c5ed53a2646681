"""Balanced row partitions of a data set, persisted where they will be used.

``partition(X, y, ...)`` turns a source (numpy, memory-mapped ``.npy``, dask,
xarray, zarr, netCDF, scipy.sparse) into a ``PartitionedData``: dask arrays
``X``, ``y`` (and row weights ``w``) with ONE row chunk per partition, each
held in memory on one worker.

1. *Normalise*: X is 2-D, float32 or float64 (else float64; sparse -> CSR);
   integer/bool y -> int64 class labels, float y -> X's dtype (regression).
2. *Plan* (on the client, from the labels only): one array of source rows per
   partition (``source_rows``). ``iid`` shuffles and cuts near-equal parts;
   ``shards`` deals ``n_partitions * shards_per_partition`` label-sorted
   shards; ``dirichlet`` splits each class with Dir(alpha) proportions; rows
   inside a non-iid partition are shuffled (seeded).
3. *Place*: ``p mod W`` for near-equal sizes, else longest-processing-time
   greedy over the rows, so bytes per worker stay balanced.
4. *Materialise and validate in one pass* (dtype conversion, NaN/inf check):
   a numpy source is cut here and scattered to each part's worker; a dask
   source is split on the cluster and each part assembled on its own worker
   (X never visits the client); without a client the same happens in this
   process, or lazily with ``persist=False``. A bad value raises here.
5. *Row weights* (``sample_weight``): checked on the client (finite, >= 0,
   positive total) and cut by the same plan, in X's dtype.
Strategies read ``partition_futures()`` and ``workers()`` (no transfer).
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
import weakref
from pathlib import Path

from typing import NamedTuple

import numpy as np

from ._util import is_dask

__all__ = ["partition", "partition_in_place", "PartitionedData", "SCHEMES", "make_plan"]

SCHEMES = ("iid", "shards", "dirichlet")
logger = logging.getLogger("dmlcore")
_DIRICHLET_TRIES = 100


# --------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------
def _is_sparse(a) -> bool:
    import scipy.sparse as sp
    return sp.issparse(a)


def as_block(a):
    """A computed partition block as the kernels take it: CSR stays CSR, else numpy."""
    return a if _is_sparse(a) else np.asarray(a)


def _nbytes(a) -> int:
    """Bytes held by a numpy array or a CSR matrix (data + indices + indptr)."""
    if _is_sparse(a):
        return int(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes)
    return int(a.nbytes)


def _source_arrays(X, y, x_name, y_name_default="y"):
    """Return (X, y) as numpy or dask arrays (y may be None)."""
    import xarray as xr
    from .datasets import load_arrays

    y_name = y if isinstance(y, str) else y_name_default
    if isinstance(X, (str, os.PathLike)):
        labels = y if isinstance(y, (str, os.PathLike)) else None
        X, loaded_y = load_arrays(X, labels=labels, x=x_name, y=y_name)
        y = loaded_y if (y is None or isinstance(y, (str, os.PathLike))) else y
    elif isinstance(X, xr.Dataset):
        if x_name not in X.data_vars:
            raise ValueError(f"the Dataset has no variable {x_name!r} (pass x=...); "
                             f"it holds {list(X.data_vars)}")
        if isinstance(y, str) or y is None:
            if y_name in X.data_vars:
                y = X[y_name].data
            elif isinstance(y, str):
                raise ValueError(f"the Dataset has no variable {y!r}; it holds "
                                 f"{list(X.data_vars)}")
        X = X[x_name].data
    elif isinstance(y, (str, os.PathLike)):
        from .datasets import _open_container
        kind, obj = _open_container(Path(y))
        if kind != "array":
            raise ValueError(f"labels file {y} holds several variables; load it with "
                             f"dmlcore.datasets.load_arrays")
        y = obj
    if isinstance(X, xr.DataArray):
        X = X.data
    if isinstance(y, xr.DataArray):
        y = y.data
    if not is_dask(X):
        try:
            import zarr
            if isinstance(X, zarr.Array):
                import dask.array as da
                X = da.from_zarr(X)
        except ImportError:  # pragma: no cover - zarr is a dependency
            pass
    if _is_sparse(X):
        X = X.tocsr()
    elif not is_dask(X) and not isinstance(X, np.ndarray):
        X = np.asarray(X)
    if y is not None and not is_dask(y) and not isinstance(y, np.ndarray):
        y = np.asarray(y)
    return X, y


def _x_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    return dtype if dtype in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float64)


def _prepare_labels(y: np.ndarray, x_dtype: np.dtype, n: int, check_finite: bool):
    """``(labels, is_class)``: 1-D integer labels (classes, int64), or float
    targets in X's dtype, 1-D or 2-D (n, k) (multi-output regression, multilabel
    indicators; a 2-D y is always float targets)."""
    y = np.asarray(y)
    if y.ndim not in (1, 2):
        raise ValueError(f"y must be 1-D (labels, targets) or 2-D (n, outputs), got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"X has {n} rows but y has {y.shape[0]}")
    if y.ndim == 2 and y.dtype.kind in "iub":
        y = y.astype(x_dtype)
    if y.dtype.kind in "iub":
        return y.astype(np.int64, copy=False), True
    if y.dtype.kind != "f":
        raise ValueError(f"y must hold numbers (integer class labels or float targets), "
                         f"got dtype {y.dtype}")
    y = y.astype(x_dtype, copy=False)
    if check_finite:
        problem = _finite_problem(y)
        if problem:
            raise _bad_values("y", problem, problem[1])
    return y, False


def _prepare_weights(sample_weight, x_dtype: np.dtype, n: int):
    """Row weights as a 1-D array of X's dtype; one clear error for a bad one."""
    if is_dask(sample_weight):
        sample_weight = sample_weight.compute()
    w = np.asarray(sample_weight)
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"sample_weight must be 1-D with one weight per row ({n}), "
                         f"got shape {w.shape}")
    if w.dtype.kind not in "biuf":
        raise ValueError(f"sample_weight must hold numbers, got dtype {w.dtype}")
    w = w.astype(x_dtype, copy=False)
    problem = _finite_problem(w)
    if problem:
        raise _bad_values("sample_weight", problem, problem[1])
    if n and w.min() < 0:
        row = int(np.argmin(w))
        raise ValueError(f"sample_weight must be >= 0, got {w[row]} at row {row}")
    if n and not w.sum() > 0:
        raise ValueError("sample_weight: the weights sum to 0 (nothing to fit)")
    return w


def _finite_problem(a: np.ndarray):
    """None if every value is finite, else (description, first bad row)."""
    if a.dtype.kind not in "fc" or a.size == 0:
        return None
    ok = np.isfinite(a)
    if ok.all():
        return None
    bad = ~ok if a.ndim == 1 else ~ok.all(axis=1)
    n_nan = int(np.isnan(a).sum())
    n_inf = int((~ok).sum()) - n_nan
    parts = ([f"{n_nan} NaN"] if n_nan else []) + ([f"{n_inf} infinite"] if n_inf else [])
    return " and ".join(parts) + " value(s)", int(np.flatnonzero(bad)[0])


# --------------------------------------------------------------------------
# Plans: which source rows go to which partition
# --------------------------------------------------------------------------
def _plan_iid(n, P, rng):
    return np.array_split(rng.permutation(n), P)


def _plan_shards(labels, P, S, rng):
    n = labels.shape[0]
    n_shards = P * S
    if n < n_shards:
        raise ValueError(f"cannot cut {n} rows into {n_shards} shards "
                         f"({P} partitions x {S} shards_per_partition)")
    shuffled = rng.permutation(n)                      # ties in random order ...
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]   # ... then a stable sort
    shards = np.array_split(order, n_shards)            # sizes differ by at most one row
    deal = rng.permutation(n_shards)
    return [rng.permutation(np.concatenate([shards[s] for s in deal[p * S:(p + 1) * S]]))
            for p in range(P)]


def _plan_dirichlet(labels, P, alpha, rng):
    """Per class, Dir(alpha) proportions over partitions.

    Empty partitions: the draw is repeated (the same seeded stream, so the
    result is deterministic) up to ``_DIRICHLET_TRIES`` times until every
    partition holds at least one row, as in the NIID-Bench reference code;
    if that still fails (tiny alpha, many partitions), each empty partition
    takes one random row from the currently largest partition, which
    guarantees a minimum of one row.
    """
    n = labels.shape[0]
    if n < P:
        raise ValueError(f"cannot cut {n} rows into {P} non-empty partitions")
    classes = np.unique(labels)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(_DIRICHLET_TRIES):
        parts = [[] for _ in range(P)]
        for rows in members:
            props = rng.dirichlet(np.full(P, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * len(rows)).astype(np.int64)
            for p, piece in enumerate(np.split(rows, cuts)):
                parts[p].append(piece)
        parts = [np.concatenate(pp) for pp in parts]
        if min(len(p) for p in parts) > 0:
            break
    else:
        for p in range(P):
            if len(parts[p]) == 0:
                big = int(np.argmax([len(q) for q in parts]))
                k = int(rng.integers(len(parts[big])))
                parts[p] = parts[big][k:k + 1]
                parts[big] = np.delete(parts[big], k)
    return [rng.permutation(p) for p in parts]


def make_plan(n, labels, n_partitions, scheme="iid", seed=0, *, shards_per_partition=2,
              alpha=0.5):
    """Source row numbers of each partition: a list of ``n_partitions`` int64 arrays."""
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        if n < n_partitions:
            raise ValueError(f"cannot cut {n} rows into {n_partitions} partitions")
        return _plan_iid(n, n_partitions, rng)
    if labels is None:
        raise ValueError(f"scheme {scheme!r} needs labels y")
    if scheme == "shards":
        if int(shards_per_partition) < 1:
            raise ValueError(f"shards_per_partition must be >= 1, got {shards_per_partition}")
        return _plan_shards(labels, n_partitions, int(shards_per_partition), rng)
    if scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        return _plan_dirichlet(labels, n_partitions, alpha, rng)
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def _placement(sizes, n_workers):
    """Worker index per partition, from the partitions' row counts.

    Near-equal partitions (iid, shards: sizes within one row) go round robin,
    partition p to worker ``p mod W``. Unequal ones (dirichlet) go greedy
    largest-first onto the least-loaded worker (ties to the lowest index),
    which keeps the bytes per worker balanced.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) == 0 or sizes.max() - sizes.min() <= 1:
        return np.arange(len(sizes)) % n_workers
    load = np.zeros(n_workers, dtype=np.int64)
    out = np.empty(len(sizes), dtype=np.int64)
    for p in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        w = int(np.argmin(load))
        out[p] = w
        load[w] += sizes[p]
    return out


# --------------------------------------------------------------------------
# Task functions (run on the workers; they never mutate their inputs)
# --------------------------------------------------------------------------
def _bad_values(what, problem, row):
    return ValueError(f"{what} contains {problem[0]} (first at source row {row}); remove or "
                      f"impute them before partitioning, or pass check_finite=False")


def _take_rows(X, rows, dtype, check_finite):
    """Rows ``rows`` of X in ``dtype`` (one pass: gather, convert, NaN/inf check);
    a CSR X gives a CSR part (its stored values are checked)."""
    if _is_sparse(X):
        part = X[rows].astype(dtype, copy=False)
        part.sort_indices()
        if check_finite:
            problem = _finite_problem(part.data)
            if problem:
                row = int(np.searchsorted(part.indptr, problem[1], side="right") - 1)
                raise _bad_values("X", problem, int(rows[row]))
        return part
    part = np.asarray(np.take(X, rows, axis=0)).astype(dtype, copy=False)
    if check_finite:
        problem = _finite_problem(part)
        if problem:
            raise _bad_values("X", problem, int(rows[problem[1]]))
    return part


def _split_chunk(chunk, plan, dtype, check_finite, offset):
    """Split one source chunk (rows ``offset...``) into per-partition ``(rows, positions)``."""
    order, counts, positions = plan
    if chunk.ndim != 2:
        raise ValueError(f"X must be 2-D, got a chunk of shape {chunk.shape}")
    rows = np.take(chunk, order, axis=0).astype(dtype, copy=False)
    if check_finite:
        problem = _finite_problem(rows)
        if problem:
            raise _bad_values("X", problem, offset + int(order[problem[1]]))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [(rows[bounds[p]:bounds[p + 1]], positions[bounds[p]:bounds[p + 1]])
            for p in range(len(counts))]


def _block_rows(block):
    return np.array([len(block)])


def _piece(pieces, p):
    return pieces[p]


def _assemble(n_rows, n_features, dtype, pieces):
    out = np.empty((n_rows, n_features), dtype=dtype)
    filled = 0
    for rows, positions in pieces:
        out[positions] = rows
        filled += len(positions)
    if filled != n_rows:  # a plan that does not cover the partition is a bug
        raise RuntimeError(f"partition assembly got {filled} rows, expected {n_rows}")
    return out


def _chunk_plans(plan, lengths):
    """Per source chunk: (order, counts per partition, positions in the partition)."""
    n = int(sum(lengths))
    P = len(plan)
    dest = np.empty(n, dtype=np.int64)
    pos = np.empty(n, dtype=np.int64)
    for p, rows in enumerate(plan):
        dest[rows] = p
        pos[rows] = np.arange(len(rows))
    out, lo = [], 0
    for length in lengths:
        d, q = dest[lo:lo + length], pos[lo:lo + length]
        order = np.lexsort((q, d))
        out.append((order, np.bincount(d, minlength=P), q[order]))
        lo += length
    return out


# --------------------------------------------------------------------------
# Building the dask arrays
# --------------------------------------------------------------------------
def _array_from_blocks(blocks, name, chunks, dtype, ndim, sparse=False):
    """A dask array whose chunk p is ``blocks[p]`` (futures under the array's keys,
    or numpy; ``sparse``: CSR chunks)."""
    import dask.array as da
    keys = [(name, p, 0) if ndim == 2 else (name, p) for p in range(len(blocks))]
    return da.Array(dict(zip(keys, blocks)), name, chunks, meta=_meta(dtype, ndim, sparse))


def _meta(dtype, ndim, sparse):
    """The empty block dask describes the chunks by: CSR or numpy."""
    if sparse:
        import scipy.sparse as sp
        return sp.csr_matrix((0, 0), dtype=dtype)
    return np.empty((0,) * ndim, dtype=dtype)


def _aligned(block):
    """``block`` (an ndarray or a CSR matrix) with every array aligned to its item
    size: ``np.require`` copies only a misaligned array."""
    if not _is_sparse(block):
        return np.require(block, requirements="A")
    for name in ("data", "indices", "indptr"):
        setattr(block, name, np.require(getattr(block, name), requirements="A"))
    return block


class _Aligned:
    """A block in transit to a worker that is unpickled there as ``_aligned(block)``.

    A received array starts wherever its bytes fell in the message's frame,
    often at an address that is no multiple of its item size; NumPy's matmul
    then skips BLAS (3x slower for a 1M x 100 ``X @ w``; benchmarks/HISTORY.md),
    and so would anything a user runs on ``data.X``. Only for workers in other
    processes: one in the client's own (``inproc://``) stores what it is given."""

    __slots__ = ("block",)

    def __init__(self, block):
        self.block = block

    def __reduce__(self):
        return _aligned, (self.block,)

    def __sizeof__(self):                   # what dask's sizeof reports to the scheduler
        return _nbytes(self.block)


def _scatter_parts(client, make_part, n_parts, name, ndim, workers, batch_bytes=128 * 2**20):
    """Scatter ``make_part(p)`` to ``workers[p]`` under the array key of chunk p.

    Each worker's parts are built one at a time and sent in batches of about
    ``batch_bytes`` (``scatter_to``), every worker's in its own thread, so the
    workers receive (and, on TLS, decrypt) at the same time and the client holds
    at most one batch per worker beyond its input. Every part arrives aligned
    (``_Aligned``).
    """
    from concurrent.futures import ThreadPoolExecutor

    futures = [None] * n_parts

    def send(worker):
        batch, size = {}, 0
        mine = [q for q in range(n_parts) if workers[q] == worker]
        for i, p in enumerate(mine):
            key = (name, p, 0) if ndim == 2 else (name, p)
            part = make_part(p)
            size += _nbytes(part)
            batch[key] = part if worker.startswith("inproc://") else _Aligned(part)
            if size >= batch_bytes or i == len(mine) - 1:
                for k, f in scatter_to(client, batch, [worker]).items():
                    futures[k[1]] = f
                batch, size = {}, 0

    owners = sorted(set(workers))
    with ThreadPoolExecutor(max_workers=max(1, len(owners)),
                            thread_name_prefix="dmlcore-scatter") as pool:
        for done in [pool.submit(send, w) for w in owners]:
            done.result()
    return futures


# clients whose workers this process could not reach directly (see scatter_to)
_VIA_SCHEDULER = weakref.WeakSet()
_VIA_SCHEDULER_LOCK = threading.Lock()


def scatter_to(client, data, workers=None, **kwargs):
    """``client.scatter(data, workers=workers)``, sent straight to the workers.

    Through the scheduler (Dask's default) every byte crosses two connections
    and queues on the scheduler's event loop (benchmarks/HISTORY.md has the
    times). A client created with ``direct_to_workers=False``, or one whose
    workers could not be reached (the reason is logged once), goes through the
    scheduler.
    """
    if client.direct_to_workers is not False and client not in _VIA_SCHEDULER:
        try:
            return client.scatter(data, workers=workers, direct=True, **kwargs)
        except OSError as exc:          # unreachable worker (a timeout is an OSError too)
            with _VIA_SCHEDULER_LOCK:
                first = client not in _VIA_SCHEDULER
                _VIA_SCHEDULER.add(client)
            if first:
                logger.warning("dmlcore: partitions go through the scheduler: a worker "
                               "cannot be reached directly from this process (%s)", exc)
    return client.scatter(data, workers=workers, **kwargs)


def _raise_first_error(futures):
    from distributed import wait
    wait(futures)
    for f in futures:
        if f.status == "error":
            f.result()  # re-raises the task's exception (a ValueError for bad data)


def _list_workers(client):
    workers = sorted(client.nthreads())
    if not workers:
        raise RuntimeError("the Dask cluster has no workers")
    return workers


def _default_client():
    try:
        from distributed import default_client
        return default_client()
    except (ImportError, ValueError):
        return None


# --------------------------------------------------------------------------
# PartitionedData
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Materialisers: where the blocks are made and held
# --------------------------------------------------------------------------
def _chunk_futures(Xp):
    """The futures of a persisted dask array's row chunks, in row order (one column block)."""
    from distributed import futures_of

    by_key = {f.key: f for f in futures_of(Xp)}
    return [by_key[(Xp.name, b, 0)] for b in range(Xp.numblocks[0])]


def _unknown_rows(Xs) -> bool:
    return any(np.isnan(c) for c in Xs.chunks[0])


class _Chunks(NamedTuple):
    """A dask source X ready to split: one handle per row chunk (future or delayed) and
    its row count (int)."""
    handles: list
    lengths: list


class _Blocks(NamedTuple):
    """One array's partitions: ``blocks[p]`` holds partition p's rows (numpy or CSR,
    a future under the key ``(name, p[, 0])``, or a delayed object), ``dtype`` the
    blocks' dtype and ``tail`` the shape after the row axis ((n_features,), () or (k,))."""
    blocks: list
    name: str
    dtype: np.dtype
    tail: tuple
    sparse: bool = False


def _to_dask(b: _Blocks, sizes):
    """The dask array whose chunk p is ``b.blocks[p]`` with ``sizes[p]`` rows."""
    import dask.array as da
    from dask.delayed import Delayed

    tail = tuple(int(k) for k in b.tail)
    if b.blocks and isinstance(b.blocks[0], Delayed):
        meta = _meta(b.dtype, 1 + len(tail), b.sparse)
        return da.concatenate([da.from_delayed(part, (int(s),) + tail, dtype=b.dtype, meta=meta)
                               for part, s in zip(b.blocks, sizes)], axis=0)
    chunks = (tuple(int(s) for s in sizes),) + tuple((k,) for k in tail)
    return _array_from_blocks(b.blocks, b.name, chunks, b.dtype, 1 + len(tail), sparse=b.sparse)


def _futures_array(futures, sizes, like):
    """The dask array whose chunk p is the block held by ``futures[p]`` (rows
    ``sizes[p]``), with the trailing shape, dtype and chunk type of ``like``."""
    import dask.array as da

    tail = tuple(int(k) for k in like.shape[1:])
    return da.concatenate([da.from_delayed(f, (int(s),) + tail, dtype=like.dtype,
                                           meta=like._meta)
                           for f, s in zip(futures, sizes)], axis=0)


def _new_name(kind):
    return f"dml-{kind}-{uuid.uuid4().hex}"


class _InProcess:
    """Makes partitions as numpy (or CSR) blocks in this process.

    The three materialisers (here, ``_Lazy``, ``_Cluster``) share one interface:
    ``source`` readies the source, ``place(sizes)`` fixes where partition p lives,
    ``blocks`` holds parts built by the client, ``take``/``shuffle`` cut X by the
    plan, ``tasks``/``map`` run one task per partition/item.
    """
    client = None
    placement = None              # worker address per partition (None: not on a cluster)
    persisted = True

    def source(self, Xs, ys):
        """``(X, y)`` ready to cut: a dask X (and y) computed here."""
        if not is_dask(Xs):
            return Xs, ys
        import dask
        return dask.compute(Xs, ys) if is_dask(ys) else (Xs.compute(), ys)

    def place(self, sizes):
        """Fix where each of the ``len(sizes)`` partitions lives."""
        self.n_parts = len(sizes)

    def blocks(self, make_part, kind, dtype, tail, sparse=False) -> _Blocks:
        """``make_part(p)`` (built here) for every partition, held where p lives."""
        return _Blocks([make_part(p) for p in range(self.n_parts)], _new_name(kind),
                       np.dtype(dtype), tuple(tail), sparse)

    def take(self, X, plan, dtype, check_finite) -> _Blocks:
        """Partition p = rows ``plan[p]`` of an in-memory X, in ``dtype``, checked."""
        return self.blocks(lambda p: _take_rows(X, plan[p], dtype, check_finite), "X", dtype,
                           (int(X.shape[1]),), _is_sparse(X))

    def shuffle(self, src: _Chunks, plan, dtype, check_finite, n_features) -> _Blocks:
        """Partition p = rows ``plan[p]`` of a chunked X: one split task per source chunk
        (gather, convert, NaN/inf check), one piece per (chunk, partition) that has rows
        for it, one assembly per partition where it lives. X never visits the client."""
        P, B = len(plan), len(src.lengths)
        chunk_plans = _chunk_plans(plan, src.lengths)
        offsets = [int(o) for o in np.concatenate([[0], np.cumsum(src.lengths)])[:-1]]
        tag = uuid.uuid4().hex
        split = self.map(_split_chunk, src.handles, self.put_each(chunk_plans),
                         [dtype.str] * B, [check_finite] * B, offsets,
                         keys=[f"dml-split-{tag}-{b}" for b in range(B)])
        wanted = [(b, p) for b, (_, counts, _) in enumerate(chunk_plans) for p in range(P)
                  if counts[p]]
        found = self.map(_piece, [split[b] for b, _ in wanted], [p for _, p in wanted],
                         keys=[f"dml-piece-{tag}-{b}-{p}" for b, p in wanted])
        pieces = [[] for _ in range(P)]
        for (b, p), f in zip(wanted, found):
            pieces[p].append(f)
        return self.tasks(_assemble, [len(r) for r in plan], [n_features] * P, [dtype.str] * P,
                          pieces, kind="X", dtype=dtype, tail=(n_features,))

    def tasks(self, fn, *iterables, kind, dtype, tail, sparse=False) -> _Blocks:
        """Partition p = ``fn(*args_p)``, computed where p lives."""
        name = _new_name(kind)
        keys = [(name, p, 0) if tail else (name, p) for p in range(self.n_parts)]
        return _Blocks(self.map(fn, *iterables, keys=keys, pinned=True), name, np.dtype(dtype),
                       tuple(tail), sparse)

    def map(self, fn, *iterables, keys, pinned=False):
        """``fn(*args)`` for every item of ``zip(*iterables)`` (key ``keys[i]``)."""
        return [fn(*args) for args in zip(*iterables)]

    def put_each(self, objs):
        """``objs`` as task arguments."""
        return list(objs)


class _Lazy(_InProcess):
    """Makes partitions as a lazy dask computation, validated when it is computed."""
    persisted = False

    def source(self, Xs, ys):
        if not is_dask(Xs):
            return Xs, ys
        lengths = (list(Xs.chunks[0]) if not _unknown_rows(Xs)
                   else list(Xs.map_blocks(_block_rows, chunks=(1,), drop_axis=1,
                                           dtype=np.int64).compute()))
        return _Chunks(list(Xs.to_delayed().ravel()), lengths), ys

    def take(self, X, plan, dtype, check_finite):
        import dask
        src = dask.delayed(X, name=_new_name("source"))
        return _Blocks(self.map(_take_rows, [src] * len(plan), plan, [dtype.str] * len(plan),
                                [check_finite] * len(plan), keys=None),
                       "", np.dtype(dtype), (int(X.shape[1]),), _is_sparse(X))

    def map(self, fn, *iterables, keys, pinned=False):
        import dask
        return [dask.delayed(fn, pure=True)(*args) for args in zip(*iterables)]


class _Cluster(_InProcess):
    """Makes partitions on ``client``'s workers: partition p held by ``placement[p]``
    (given, or chosen by ``place`` among ``workers``)."""

    def __init__(self, client, workers, placement=None):
        self.client, self.workers = client, workers
        self.placement = placement
        self.n_parts = None if placement is None else len(placement)

    def source(self, Xs, ys):
        """A dask X (and y) persisted on the cluster; X as its chunks' futures."""
        if not is_dask(Xs):
            return Xs, ys
        persisted = self.client.persist([Xs] + ([ys] if is_dask(ys) else []))
        handles = _chunk_futures(persisted[0])
        lengths = (self.client.gather(self.client.map(len, handles))
                   if _unknown_rows(persisted[0]) else list(persisted[0].chunks[0]))
        return _Chunks(handles, lengths), (persisted[1] if is_dask(ys) else ys)

    def place(self, sizes):
        super().place(sizes)
        self.placement = [self.workers[w] for w in _placement(sizes, len(self.workers))]

    def blocks(self, make_part, kind, dtype, tail, sparse=False):
        name = _new_name(kind)
        futures = _scatter_parts(self.client, make_part, self.n_parts, name, 1 + len(tail),
                                 self.placement)
        return _Blocks(futures, name, np.dtype(dtype), tuple(tail), sparse)

    def map(self, fn, *iterables, keys, pinned=False):
        """One task per item under ``keys``; ``pinned``: task p only on ``placement[p]``."""
        if not pinned:
            return self.client.map(fn, *iterables, key=keys)
        args, out = list(zip(*iterables)), [None] * len(keys)
        for worker in sorted(set(self.placement)):
            mine = [p for p in range(len(keys)) if self.placement[p] == worker]
            futures = self.client.map(fn, *(list(a) for a in zip(*[args[p] for p in mine])),
                                      key=[keys[p] for p in mine], workers=[worker],
                                      allow_other_workers=False)
            for p, f in zip(mine, futures):
                out[p] = f
        return out

    def put_each(self, objs):
        return scatter_to(self.client, list(objs), hash=False)


def _materialiser(client, workers, persist):
    """Where ``partition`` makes the partitions: lazily (``persist=False``), on
    ``client``'s workers, or in this process (no client)."""
    if not persist:
        return _Lazy()
    return _InProcess() if client is None else _Cluster(client, workers)


class _Source(NamedTuple):
    """Where partition p's rows can be made again once the worker holding them is
    lost: rows ``rows[p]`` of ``x`` (numpy, memory-mapped, CSR, or a dask array
    whose graph recomputes them: Dask's lineage) and of ``y`` / ``w`` (the same
    kinds, or None), X and w in ``dtype``. Kept by reference: no copy."""
    x: object
    y: object
    w: object
    rows: list
    dtype: np.dtype

    def futures(self, client, p, worker):
        """(X, y, w) futures of partition p (None where absent), held on ``worker``."""
        rows = np.asarray(self.rows[p])
        return tuple(None if a is None else self._future(client, a, rows, dtype, worker)
                     for a, dtype in ((self.x, self.dtype), (self.y, None), (self.w, self.dtype)))

    @staticmethod
    def _future(client, a, rows, dtype, worker):
        dtype = a.dtype if dtype is None else dtype
        if is_dask(a):              # recomputed on the cluster from its graph
            return client.compute(a[rows].astype(dtype), workers=[worker],
                                  allow_other_workers=False)
        part = _take_rows(a, rows, dtype, False) if a.ndim == 2 else np.asarray(a[rows], dtype)
        return scatter_to(client, part, [worker], hash=False)


def _held(run, layout, x, y, w, source=None):
    """The PartitionedData of the blocks ``x`` (``y``, ``w``: _Blocks or None) that
    ``run`` made; on a cluster, waits for X's blocks, raising the first task's error
    (bad data: a ValueError). ``source``: a ``_Source`` to rebuild lost partitions from."""
    on_cluster = run.client is not None
    if on_cluster:
        _raise_first_error(x.blocks)
    sizes = [len(r) for r in layout.source_rows]
    X, Y, W = (None if b is None else _to_dask(b, sizes) for b in (x, y, w))
    fx, fy, fw = (b.blocks if on_cluster and b is not None else None for b in (x, y, w))
    data = PartitionedData(X, Y, w=W, layout=layout, client=run.client,
                           placement=run.placement, x_futures=fx, y_futures=fy, w_futures=fw,
                           persisted=run.persisted)
    data._source = source if on_cluster else None
    return data


# --------------------------------------------------------------------------
# What every copy of the same partitions shares: plan, labels, weights
# --------------------------------------------------------------------------
class _TargetStats(NamedTuple):
    """Regression targets per partition: ``mean`` and ``std``, each (n_partitions,) in
    y's dtype (over all of a partition's values for 2-D targets)."""
    mean: np.ndarray
    std: np.ndarray


class _Layout(NamedTuple):
    """The partitions' plan and summaries, the same wherever their blocks are held."""
    source_rows: list            # one int64 array of source rows per partition
    scheme: str
    seed: int
    params: dict                 # the scheme's parameters
    classes: np.ndarray | None   # sorted class labels (classification)
    label_counts: np.ndarray | None    # (n_partitions, n_classes) int64 (classification)
    target_stats: _TargetStats | None  # regression
    weight_sums: np.ndarray | None     # (n_partitions,) float64 (weighted)
    nnz: np.ndarray | None             # (n_partitions,) int64 stored entries (CSR)


def _layout(plan, scheme, seed, params, labels, is_class, weights, row_nnz=None):
    """The _Layout of ``plan`` for these labels (None, class labels or float targets),
    row weights (None or (n,)) and stored entries per source row (CSR; else None)."""
    classes = counts = stats = None
    if is_class:
        classes = np.unique(labels)
        counts = np.stack([np.bincount(np.searchsorted(classes, labels[r]),
                                       minlength=len(classes)) for r in plan])
    elif labels is not None:
        stats = _TargetStats(np.array([labels[r].mean() for r in plan]),
                             np.array([labels[r].std() for r in plan]))
    return _Layout(plan, scheme, seed, dict(params), classes, counts, stats,
                   None if weights is None else _weight_sums(weights, plan),
                   None if row_nnz is None else _nnz_sums(row_nnz, plan))


def _weight_sums(weights, plan):
    """Total weight of every partition (float64)."""
    return np.array([weights[r].sum(dtype=np.float64) for r in plan])


def _nnz_sums(row_nnz, plan):
    """Stored entries of every partition (int64), from each source row's count."""
    return np.array([int(row_nnz[r].sum()) for r in plan], dtype=np.int64)


class PartitionedData:
    """Row partitions of (X, y) as dask arrays with one chunk per partition.

    Attributes: ``X`` (n_rows, n_features) and ``y`` (n_rows,) dask arrays
    (y is None without labels), ``w`` (n_rows,) row weights in X's dtype
    (None: every row weighs 1), ``n_partitions``, ``n_rows``, ``n_features``,
    ``partition_sizes`` (int64 array), ``dtype`` (X's), ``classes`` (sorted
    labels, None for regression), ``n_classes``, ``nbytes``, ``scheme``,
    ``seed``, ``source_rows`` (the source row number of every row, one int64
    array per partition), ``client`` (None if the data live in this process).
    """

    def __init__(self, X, y, *, layout, client=None, placement=None, x_futures=None,
                 y_futures=None, persisted=True, w=None, w_futures=None):
        self.X = X
        self.y = y
        self.w = w
        self._layout = layout
        self._w_futures = w_futures
        self.partition_weights = layout.weight_sums   # (n_partitions,) float64, None unweighted
        self.partition_nnz = layout.nnz               # (n_partitions,) stored entries; None dense
        self.source_rows = layout.source_rows
        self.scheme = layout.scheme
        self.seed = layout.seed
        self.classes = layout.classes
        self._label_counts = layout.label_counts      # (n_partitions, n_classes); None: no classes
        self._target_stats = layout.target_stats      # _TargetStats; None: no float targets
        self.client = client
        self._placement = placement          # worker address per partition (planned)
        self._x_futures = x_futures
        self._y_futures = y_futures
        self.params = dict(layout.params)
        self.persisted = persisted
        self.partition_sizes = np.array([len(r) for r in self.source_rows], dtype=np.int64)
        self._source = None                  # _Source: how lost partitions are made again

    @property
    def _class_count(self):
        """The label count matrix ((n_partitions, n_classes) int64), or None."""
        return self._label_counts

    # ---- shape -----------------------------------------------------------
    @property
    def n_partitions(self) -> int:
        return len(self.partition_sizes)

    @property
    def n_rows(self) -> int:
        return int(self.partition_sizes.sum())

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.X.dtype)

    @property
    def n_classes(self):
        return None if self.classes is None else len(self.classes)

    @property
    def is_classification(self) -> bool:
        return self.classes is not None

    @property
    def is_sparse(self) -> bool:
        """Whether the partitions are scipy.sparse CSR matrices."""
        return self.partition_nnz is not None

    def _partition_nbytes(self):
        if self.is_sparse:      # data + 8-byte indices per stored entry, indptr per row
            x = self.partition_nnz * (self.dtype.itemsize + 8) + (self.partition_sizes + 1) * 8
            row = 0
        else:
            x, row = 0, self.n_features * self.dtype.itemsize
        if self.y is not None:
            row += np.dtype(self.y.dtype).itemsize * (1 if self.y.ndim == 1 else self.y.shape[1])
        if self.w is not None:
            row += self.dtype.itemsize
        return x + self.partition_sizes * row

    @property
    def nbytes(self) -> int:
        return int(self._partition_nbytes().sum())

    # ---- blocks ----------------------------------------------------------
    def x_blocks(self):
        """One single-chunk dask array per partition."""
        return [self.X.blocks[p] for p in range(self.n_partitions)]

    def y_blocks(self):
        if self.y is None:
            return [None] * self.n_partitions
        return [self.y.blocks[p] for p in range(self.n_partitions)]

    def w_blocks(self):
        """One dask array of row weights per partition (None each when unweighted)."""
        if self.w is None:
            return [None] * self.n_partitions
        return [self.w.blocks[p] for p in range(self.n_partitions)]

    @property
    def is_weighted(self) -> bool:
        return self.w is not None

    def partition_futures(self):
        """``[(X future, y future or None, w future or None), ...]``, one per partition.

        Pass them to ``client.submit(fn, xf, yf, wf, workers=[data.workers()[p]])``:
        the task receives the partition's numpy arrays where they already live.
        """
        if self._x_futures is None:
            raise RuntimeError(
                "these partitions are not held on a Dask cluster (made without a client "
                "or with persist=False); call data.placed(client) first")
        none = [None] * self.n_partitions
        ys = self._y_futures if self._y_futures is not None else none
        ws = self._w_futures if self._w_futures is not None else none
        return list(zip(self._x_futures, ys, ws))

    def workers(self):
        """Address of the worker holding each partition (None for in-process data)."""
        if self._x_futures is None:
            return [None] * self.n_partitions
        from distributed.client import FuturesCancelledError

        try:
            who = self.client.who_has(self._x_futures)
        except FuturesCancelledError:   # cancelled with a lost worker: the planned
            who = {}                    # places, where a pool finds the loss
        out = []
        for p, f in enumerate(self._x_futures):
            holders = list(who.get(f.key, ()))
            planned = self._placement[p]
            out.append(planned if (planned in holders or not holders) else sorted(holders)[0])
        return out

    def lost_partitions(self, partitions, live):
        """Those of ``partitions`` (ids) of which some block is held by no ``live``
        worker (its worker died; Dask may have moved the others, e.g. on retirement)."""
        futures = self.partition_futures()
        held = [(p, [f for f in futures[p] if f is not None]) for p in partitions]
        ready = [f for _, fs in held for f in fs if f.status == "finished"]
        try:
            who = self.client.who_has(ready) if ready else {}
        except Exception:  # noqa: BLE001 - a key forgotten meanwhile: judged lost below
            who = {}
        live = set(live)
        return [p for p, fs in held
                if any(f.status != "finished" or not live & set(who.get(f.key, ())) for f in fs)]

    def moved(self, partitions, worker):
        """Record that ``partitions`` are now used on ``worker`` (``workers()`` says so
        once Dask holds them there)."""
        for p in partitions:
            self._placement[p] = worker

    def rehost(self, partitions, worker):
        """Make ``partitions`` (ids) again from their source, held on ``worker``
        (after the worker holding them was lost); this object then reads them
        there. Raises RuntimeError when the data keep no source to rebuild from."""
        if self._source is None or self._x_futures is None:
            raise RuntimeError(
                f"partitions {list(partitions)} were lost with their worker and these "
                "partitions keep no source to rebuild them from (made in this process, "
                "lazily, or from blocks dmlcore did not cut)")
        lists = [list(f) if f is not None else None
                 for f in (self._x_futures, self._y_futures, self._w_futures)]
        for p in partitions:
            for held, new in zip(lists, self._source.futures(self.client, p, worker)):
                if held is not None:
                    held[p] = new
            self._placement[p] = worker
        _raise_first_error([lists[0][p] for p in partitions])
        self._x_futures, self._y_futures, self._w_futures = lists
        self.X, self.y, self.w = (
            None if a is None else _futures_array(f, self.partition_sizes, a)
            for a, f in zip((self.X, self.y, self.w), lists))

    def placed(self, client):
        """These partitions held on ``client``'s workers (``self`` if they already are).

        ``client=False``: an in-process copy (numpy chunks in the graph).
        """
        here = self._x_futures is None and self.persisted      # numpy chunks in this process
        if client is None or (self._x_futures is not None and self.client is client) or (
                client is False and here):
            return self
        run = _InProcess() if client is False else _Cluster(client, _list_workers(client))
        run.place(self.partition_sizes)
        if client is False or here:
            x = run.blocks(self._fetch(self.X, self._x_futures), "X", self.dtype,
                           (self.n_features,), self.is_sparse)
        else:   # lazy, or held by another client: compute there, then pin a copy
            x = run.tasks(_identity, _chunk_futures(client.persist(self.X)), kind="X",
                          dtype=self.dtype, tail=(self.n_features,), sparse=self.is_sparse)
        y = None if self.y is None else run.blocks(self._fetch(self.y, self._y_futures), "y",
                                                   self.y.dtype, self.y.shape[1:])
        w = None if self.w is None else run.blocks(self._fetch(self.w, self._w_futures), "w",
                                                   self.dtype, ())
        offsets = np.concatenate([[0], np.cumsum(self.partition_sizes)])
        return _held(run, self._layout, x, y, w, self._source or _Source(
            self.X, self.y, self.w, [np.arange(offsets[p], offsets[p + 1])
                                     for p in range(self.n_partitions)], self.dtype))

    def _fetch(self, arr, futures):
        """``p -> partition p of arr`` as numpy or CSR, fetched from the cluster or computed."""
        if futures is not None:
            return lambda p: as_block(self.client.gather(futures[p]))
        scheduler = "sync" if self.persisted else None      # numpy chunks in this process
        return lambda p: as_block(arr.blocks[p].compute(scheduler=scheduler))

    # ---- diagnostics -----------------------------------------------------
    def skew_report(self):
        """``xarray.Dataset`` over ``partition`` (and ``class``) describing the split.

        Variables: ``rows``, ``bytes``, ``worker``, ``weight`` (sum of the row
        weights; weighted data only), ``nnz`` and ``nnz_imbalance`` (stored
        entries per partition, max/mean; sparse data only); for classification
        ``class_count`` (partition x class) and ``label_tv_distance`` (total
        variation distance of each partition's label distribution from the
        global one, 0 = identical, 1 = disjoint); for regression
        ``label_mean`` and ``label_std``; scalars ``imbalance`` (max/mean rows)
        and, for classification, ``max_label_tv_distance``. Attrs repeat the
        scheme and its parameters.
        """
        import xarray as xr

        rows = self.partition_sizes
        imbalance = float(rows.max() / rows.mean())
        workers = [w if w is not None else "in-process" for w in self.workers()]
        data_vars = {
            "rows": ("partition", rows),
            "bytes": ("partition", self._partition_nbytes().astype(np.int64)),
            "worker": ("partition", np.array(workers, dtype=object).astype(str)),
            "imbalance": ((), imbalance),
        }
        if self.partition_weights is not None:
            data_vars["weight"] = ("partition", np.asarray(self.partition_weights))
        if self.is_sparse:
            data_vars["nnz"] = ("partition", np.asarray(self.partition_nnz))
            data_vars["nnz_imbalance"] = ((), float(self.partition_nnz.max()
                                                    / max(self.partition_nnz.mean(), 1)))
        coords = {"partition": np.arange(self.n_partitions)}
        if self._label_counts is not None:
            tv = self.label_tv_distance()
            data_vars["class_count"] = (("partition", "class"), self._label_counts)
            data_vars["label_tv_distance"] = ("partition", tv)
            data_vars["max_label_tv_distance"] = ((), float(np.nanmax(tv)))
            coords["class"] = self.classes
        elif self._target_stats is not None:
            data_vars["label_mean"] = ("partition", self._target_stats.mean)
            data_vars["label_std"] = ("partition", self._target_stats.std)
        attrs = {"scheme": self.scheme, "seed": int(self.seed),
                 "n_rows": self.n_rows, "n_features": self.n_features,
                 "imbalance": imbalance, **{k: v for k, v in self.params.items()
                                            if isinstance(v, (int, float, str))}}
        return xr.Dataset(data_vars, coords=coords, attrs=attrs)

    def label_tv_distance(self):
        """Total variation distance of each partition's label mix from the global one:
        (n_partitions,) float64, 0 = identical, 1 = disjoint (NaN for an empty
        partition); None without class labels."""
        counts = self._label_counts
        if counts is None:
            return None
        global_p = counts.sum(axis=0) / counts.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            local_p = counts / counts.sum(axis=1, keepdims=True)
        return 0.5 * np.abs(local_p - global_p).sum(axis=1)

    def __repr__(self):
        sizes = self.partition_sizes
        where = "in-process" if self._x_futures is None else None
        if where is None:
            counts = {}
            for w in self._placement:
                counts[w] = counts.get(w, 0) + 1
            where = ", ".join(f"{w}: {c}" for w, c in sorted(counts.items()))
        labels = ("regression" if self.classes is None and self.y is not None
                  else "unlabelled" if self.y is None else f"{self.n_classes} classes")
        lazy = (("" if self.persisted else ", lazy") + (", weighted" if self.w is not None else "")
                + (", sparse CSR" if self.is_sparse else ""))
        return (f"PartitionedData(scheme={self.scheme!r}, seed={self.seed}, "
                f"n_partitions={self.n_partitions}, n_rows={self.n_rows}, "
                f"n_features={self.n_features}, dtype={self.dtype}, {labels}, "
                f"rows/partition={sizes.min()}..{sizes.max()} "
                f"(imbalance {sizes.max() / sizes.mean():.2f}), "
                f"nbytes={_human_bytes(self.nbytes)}{lazy}, partitions per worker: {{{where}}})")


def _identity(x):
    return x


def _human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# --------------------------------------------------------------------------
# partition()
# --------------------------------------------------------------------------
def partition(X, y=None, n_partitions=None, scheme="iid", seed=0, *, client=None,
              shards_per_partition=2, alpha=0.5, persist=True, check_finite=True,
              x="X", sample_weight=None):
    """Cut (X, y) into balanced row partitions held on the workers of a Dask cluster.

    Parameters
    ----------
    X : numpy array, dask array, xarray DataArray or Dataset, zarr array, or a
        path (``.npy`` memory-mapped, ``.npz``, zarr store, netCDF).
    y : labels or targets (same kinds), a variable name for a Dataset / zarr
        group / netCDF / npz source (default variable ``"y"`` when present),
        or None.
    n_partitions : default 2 x the number of workers (2 without a client).
    scheme : ``"iid"`` | ``"shards"`` | ``"dirichlet"``.
    seed : seeds the plan (every random choice of every scheme).
    client : a ``distributed.Client``; default: the current default client,
        else (or with ``client=False``) the partitions stay in this process.
    shards_per_partition : shards dealt to each partition (``"shards"``).
    alpha : Dirichlet concentration (``"dirichlet"``): small = skewed.
    persist : materialise and place the partitions now (default). With
        False, X is a lazy dask array (validated when computed).
    check_finite : reject NaN/inf in X and y (checked in the same pass that
        builds the partitions).
    x : variable name of X in a Dataset / group source.
    sample_weight : (n_rows,) non-negative row weights (numpy or dask), cut
        with their rows; every loss and gradient sum is then weighted, and
        means divide by the total weight.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    Xs, ys = _source_arrays(X, y, x)
    if Xs.ndim != 2:
        raise ValueError(f"X must be 2-D (rows x features), got shape {Xs.shape}")
    if is_dask(Xs) and Xs.numblocks[1] != 1:
        Xs = Xs.rechunk({1: -1})
    dtype, n_features = _x_dtype(Xs.dtype), int(Xs.shape[1])
    client = _default_client() if client is None else (None if client is False else client)
    workers = _list_workers(client) if client is not None else None
    n_partitions = _n_partitions(n_partitions, workers)
    run = _materialiser(client, workers, persist)
    lineage = Xs                        # what rebuilds a lost partition (graph or array)
    src, ys = run.source(Xs, ys)        # a dask X: on the cluster (persisted) or chunked lazily
    del Xs
    n = int(sum(src.lengths)) if isinstance(src, _Chunks) else int(src.shape[0])
    labels, is_class = (None, False) if ys is None else _prepare_labels(
        ys.compute() if is_dask(ys) else ys, dtype, n, check_finite)
    weights = None if sample_weight is None else _prepare_weights(sample_weight, dtype, n)
    plan = make_plan(n, labels if is_class else None, n_partitions, scheme, seed,
                     shards_per_partition=shards_per_partition, alpha=alpha)
    run.place([len(r) for r in plan])
    sparse = not isinstance(src, _Chunks) and _is_sparse(src)
    layout = _layout(plan, scheme, seed, _scheme_params(scheme, shards_per_partition, alpha),
                     labels, is_class, weights, np.diff(src.indptr) if sparse else None)
    x = (run.shuffle(src, plan, dtype, check_finite, n_features) if isinstance(src, _Chunks)
         else run.take(src, plan, dtype, check_finite))
    del src                             # the scheduler keeps what the tasks need
    y = None if labels is None else run.blocks(lambda p: labels[plan[p]], "y", labels.dtype,
                                               labels.shape[1:])
    w = None if weights is None else run.blocks(lambda p: weights[plan[p]], "w", dtype, ())
    return _held(run, layout, x, y, w, _Source(lineage, labels, weights, plan, dtype))


def _n_partitions(n_partitions, workers) -> int:
    """The partition count asked for, else 2 x the workers (2 without a cluster); >= 1."""
    n = int(n_partitions) if n_partitions is not None else (2 * len(workers) if workers else 2)
    if n < 1:
        raise ValueError(f"n_partitions must be >= 1, got {n}")
    return n


def _scheme_params(scheme, shards_per_partition, alpha) -> dict:
    """The parameters ``scheme`` uses, as the skew report's attrs show them."""
    if scheme == "shards":
        return {"shards_per_partition": int(shards_per_partition)}
    return {"alpha": float(alpha)} if scheme == "dirichlet" else {}


# --------------------------------------------------------------------------
# partition_in_place(): the chunks of a dask array where they lie
# --------------------------------------------------------------------------
def _as_partition(chunk, dtype, check_finite, offset):
    """One source chunk as a partition: C-contiguous ``dtype`` (the chunk itself
    when it already is), checked for NaN/inf."""
    if chunk.ndim != 2:
        raise ValueError(f"X must be 2-D, got a chunk of shape {chunk.shape}")
    part = np.ascontiguousarray(chunk, dtype=dtype)
    if check_finite:
        problem = _finite_problem(part)
        if problem:
            raise _bad_values("X", problem, offset + problem[1])
    return part


def _keep_or_move(lengths, holders, workers):
    """Worker per chunk: where it lies, unless that worker already holds its
    share of the rows (n / workers, at least one chunk); such chunks (and
    chunks whose holder is unknown) go to the least-loaded worker. Balanced
    placements therefore move nothing; a skewed one moves whole chunks only."""
    share = max(float(np.sum(lengths)) / len(workers), float(np.max(lengths)))
    load = {w: 0 for w in workers}
    out = [None] * len(lengths)
    for b, (rows, held) in enumerate(zip(lengths, holders)):
        w = held[0] if held and held[0] in load else None
        if w is not None and load[w] + rows <= share * 1.0001:
            out[b] = w
            load[w] += int(rows)
    for b, rows in enumerate(lengths):
        if out[b] is None:
            w = min(workers, key=lambda a: (load[a], a))
            out[b] = w
            load[w] += int(rows)
    return out


def partition_in_place(X, y=None, *, client, check_finite=True, max_imbalance=1.5,
                       seed=0, sample_weight=None):
    """Partitions of a dask ``X`` that use its chunks where they lie: no rows move.

    ``X`` (and a dask ``y``) is persisted on ``client`` (a no-op for data
    already persisted there); every row chunk becomes one partition, held by
    the worker that holds the chunk (``source_rows`` are the chunk's
    contiguous row range, ``scheme="chunks"``). Only the labels travel (from
    the client to the chunk's worker) and, when the workers hold unequal
    shares of the rows, the whole chunks beyond a worker's share (to the
    least-loaded workers). This suits full-batch solvers, whose
    gradient is the same sum over rows however they are split; mini-batch
    training wants ``partition(scheme="iid")``, which mixes the rows.

    When the chunks themselves are skewed (a chunk larger than
    ``max_imbalance`` x the mean chunk, or an empty chunk) or X is not a dask array with
    one column block, this returns ``partition(X, y, scheme="iid",
    seed=seed, client=client, check_finite=check_finite)`` instead (which
    moves every row; its ``scheme`` says so). ``sample_weight`` travels as
    the labels do.
    """
    Xs, ys = _source_arrays(X, y, "X")
    fallback = dict(scheme="iid", seed=seed, client=client, check_finite=check_finite,
                    sample_weight=sample_weight)
    if not is_dask(Xs) or Xs.ndim != 2 or Xs.numblocks[1] != 1:
        return partition(X, y, **fallback)
    dtype = _x_dtype(Xs.dtype)
    persisted = client.persist([Xs] + ([ys] if is_dask(ys) else []))
    chunk_futures = _chunk_futures(persisted[0])
    lengths = (client.gather(client.map(len, chunk_futures)) if _unknown_rows(persisted[0])
               else list(persisted[0].chunks[0]))
    _raise_first_error(chunk_futures)        # where they lie is known once they exist
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0 or lengths.min() == 0 or lengths.max() > max_imbalance * lengths.mean():
        return partition(X, y, **fallback)
    who = client.who_has(chunk_futures)
    workers = _list_workers(client)
    run = _Cluster(client, workers, _keep_or_move(
        lengths, [sorted(who.get(f.key, ()))[:1] for f in chunk_futures], workers))
    n = int(lengths.sum())
    ys = persisted[1].compute() if is_dask(ys) else ys
    labels, is_class = (None, False) if ys is None else _prepare_labels(ys, dtype, n,
                                                                       check_finite)
    weights = None if sample_weight is None else _prepare_weights(sample_weight, dtype, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    plan = [np.arange(offsets[b], offsets[b + 1], dtype=np.int64) for b in range(len(lengths))]
    x = run.tasks(_as_partition, chunk_futures, [dtype.str] * len(plan),
                  [check_finite] * len(plan), [int(o) for o in offsets[:-1]], kind="X",
                  dtype=dtype, tail=(int(Xs.shape[1]),))
    rows = [slice(offsets[b], offsets[b + 1]) for b in range(len(plan))]
    y = None if labels is None else run.blocks(lambda p: labels[rows[p]], "y", labels.dtype,
                                               labels.shape[1:])
    w = None if weights is None else run.blocks(lambda p: weights[rows[p]], "w", dtype, ())
    return _held(run, _layout(plan, "chunks", seed, {}, labels, is_class, weights), x, y, w,
                 _Source(Xs.astype(dtype), labels, weights, plan, dtype))
