"""Computation on one partition, run where the partition lives.

These are pure functions of (model, parameters, local rows): they never mutate
their inputs, so a Dask task or an executor on a worker can call them on the
worker's own copy of the data. Every quantity returned is a SUM over rows,
with the row count beside it, so any tree of additions combines them exactly.
With row weights ``w`` the sums are weighted and the total weight of the rows
takes the row count's place (a weight of 2 counts the row twice).

Mini-batches are contiguous row slices (a partition's rows are already
shuffled by ``dml.partition``), so selecting one copies nothing; the ORDER of
the slices is reshuffled every epoch from ``(seed, epoch, partition)``, which
makes a run reproducible and resumable from the step number alone.
"""
from __future__ import annotations

import functools

import numpy as np


def n_batches(n_rows: int, batch_size: int | None) -> int:
    """Number of mini-batches that cover ``n_rows`` once (1 for full batch)."""
    if batch_size is None or batch_size >= n_rows:
        return 1
    return -(-n_rows // batch_size)


def batch_slice(n_rows, batch_size, step, seed, partition):
    """Rows of ``partition`` used at global ``step``: a slice of length <= batch_size.

    Epoch ``e`` of this partition visits its ``n_batches`` slices in the order
    ``permutation(seed, e, partition)``; ``step`` counts this partition's batches.
    """
    nb = n_batches(n_rows, batch_size)
    if nb == 1:
        return slice(0, n_rows)
    epoch, j = divmod(int(step), nb)
    start = int(_batch_order(nb, int(seed), epoch, int(partition))[j]) * batch_size
    return slice(start, min(start + batch_size, n_rows))


@functools.lru_cache(maxsize=64)
def _batch_order(nb, seed, epoch, partition):
    """The order of the ``nb`` slices in one epoch of one partition (cached: steps reuse it)."""
    order = np.random.default_rng((seed, epoch, partition)).permutation(nb)
    order.setflags(write=False)
    return order


def mean_divisor(count):
    """What turns a (weighted) sum into a mean: the row count or total weight,
    or 1 when it is 0 (rows of weight 0 only: every weighted sum is 0 too)."""
    return count if count > 0 else 1


def loss_grad_sum(model, params, X, y, rows=slice(None), view=None, out=None, w=None):
    """(loss sum, gradient sum over the trainable entries, row count) on ``X[rows]``.

    ``view``: a ``TrainableView`` (None = every layer trains): frozen layers'
    gradients are not computed where backpropagation can stop early, and the
    gradient returned holds the trainable entries only. ``out``: a buffer of
    ``params``' shape and dtype for the full gradient (reused by loops).
    ``w``: row weights of X (None = 1 each): weighted sums, and the rows'
    total weight (a float) in place of the count.
    """
    if isinstance(rows, slice) and rows.indices(X.shape[0]) == (0, X.shape[0], 1):
        Xb, yb, wb = X, y, w                # all rows: no slicing (a CSR slice is a copy)
    else:
        Xb, yb = X[rows], y[rows]
        wb = None if w is None else w[rows]
    grad = np.empty_like(params) if out is None else out
    trainable = None if view is None else view.trainable
    if wb is None:
        loss = model.loss_grad(params, Xb, yb, grad, trainable=trainable)
    else:
        loss = model.loss_grad(params, Xb, yb, grad, trainable=trainable, sample_weight=wb)
    if view is not None:
        grad = view.gather(grad)
    count = int(Xb.shape[0]) if wb is None else float(wb.sum(dtype=np.float64))
    return float(loss), grad, count


def local_sgd(model, optimizer, params, X, y, *, batch_size, n_steps, seed, partition,
              first_step=0, view=None, proximal_mu=0.0, w=None):
    """Run ``n_steps`` optimizer steps on local mini-batches, starting from ``params``.

    Returns ``(new trainable values, loss sum, rows seen)`` (with row weights
    ``w``: weighted means per step, the weight seen). ``view``: the
    ``TrainableView`` (None = all layers). The optimizer state starts fresh
    (``optimizer.init``) at step ``first_step`` so schedules go on. With
    ``proximal_mu`` (FedProx) each step's mean gradient gains
    ``mu * (w - w_start)`` on the trainable entries.
    """
    view = model.trainable_view(None) if view is None else view
    params = params.copy()
    values = view.gather(params).copy() if view.index is not None else params
    anchor = values.copy() if proximal_mu else None
    pull = np.empty_like(values) if proximal_mu else None     # mu * (w - w_start), reused
    state = optimizer.init(values, view.decay_mask)._replace(step=int(first_step))
    buffer = np.empty_like(params)
    loss_total, rows_total = 0.0, 0
    for k in range(n_steps):
        rows = batch_slice(X.shape[0], batch_size, first_step + k, seed, partition)
        view.scatter(params, values)
        loss, grad, n = loss_grad_sum(model, params, X, y, rows, view, out=buffer, w=w)
        grad /= mean_divisor(n)
        if proximal_mu:
            np.subtract(values, anchor, out=pull)
            pull *= proximal_mu
            grad += pull
        state = optimizer.update(grad, state, values)
        loss_total += loss
        rows_total += n
    return values, loss_total, rows_total
