"""Going on after a worker is lost: its executors are made again on the survivors.

An ``ExecutorPool``'s executors are the groups of partitions the fit started
with, and every sum adds their partials in a fixed order (by partition
within a group, then by group), so which worker runs a group changes no bit
of any sum. ``RecoveringPool.attempt(work)`` runs ``work(pool)``; when it
fails and the scheduler no longer lists some of the pool's workers, it closes
the pool, makes the lost groups' partitions again from their source
(``PartitionedData.rehost``: Dask's lineage, or the driver's array) on the
live worker with the fewest rows, starts a pool with the same groups there,
records an event in ``ctx.events`` and runs ``work`` again. The work a
strategy passes is what it redoes: everything since its last sync point,
so the steps are the same steps (batches depend on seed, step and partition).
Any other failure (a computation error, a frozen worker that is still
listed) is raised as it came, naming its worker.
"""
from __future__ import annotations

import logging
import time

logger = logging.getLogger("dmlcore")

# errors that a lost worker causes on the driver, besides ConnectionError/TimeoutError
_LOSS_ERRORS = ("CommClosedError", "FuturesCancelledError", "CancelledError", "KilledWorker",
                "StreamClosedError")


def looks_lost(exc):
    """Whether ``exc`` (or what caused it) is what a dead worker's calls raise: a
    connection closed or reset. (A timeout is what a frozen worker causes; the
    scheduler lists it until its heartbeats time out, so it is not waited for.)"""
    while exc is not None:
        if isinstance(exc, ConnectionError) or type(exc).__name__ in _LOSS_ERRORS:
            return True
        exc = exc.__cause__
    return False


def lost_workers(workers, client, exc, grace=10.0):
    """Those of ``workers`` the scheduler no longer lists. After an error that a
    dead worker causes (``looks_lost``), waits up to ``grace`` seconds for the
    scheduler to see it."""
    deadline = time.monotonic() + (grace if looks_lost(exc) else 0.0)
    while True:
        gone = sorted(set(workers) - set(client.nthreads()))
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(0.1)


def reassign(groups, rows, live, lost):
    """``groups`` (``[(worker, [partition ids])]``) with each group of a ``lost``
    worker moved, whole, to the ``live`` worker holding the fewest rows
    (``rows[p]``: partition p's row count); returns (groups, [(ids, worker)] moved)."""
    if not live:
        raise RuntimeError(f"every worker was lost ({', '.join(lost)}): nothing to go on with")
    load = {w: 0 for w in live}
    for worker, ids in groups:
        if worker in load:
            load[worker] += sum(int(rows[p]) for p in ids)
    out, moved = [], []
    for worker, ids in groups:
        if worker in lost:
            worker = min(live, key=lambda w: (load[w], w))
            load[worker] += sum(int(rows[p]) for p in ids)
            moved.append((list(ids), worker))
        out.append((worker, list(ids)))
    return out, moved


class RecoveringPool:
    """The current ``ExecutorPool`` of a run, re-created after a worker is lost.

    ``make(groups)`` builds a ready pool (``groups=None``: where the data lie;
    else ``[(worker, [partition ids])]``); ``ctx``: the run's ``RunContext``
    (its data, client, deadline and events). ``pool``: the current pool;
    ``generation`` counts the pools made (work that set state up on the
    executors checks it to know when to set it up again).
    """

    def __init__(self, ctx, make):
        self.ctx, self.make = ctx, make
        self.pool = make(None)
        self.generation = 0

    def attempt(self, work, step):
        """``work(pool)``, redone on a re-created pool each time a worker is lost
        (``step``: the step the work starts at, for the event)."""
        while True:
            try:
                return work(self.pool)
            except Exception as exc:
                detected = time.time()
                lost = self.lost(exc)
                if not lost:
                    raise
                self.recover(lost, step, detected, exc)

    def lost(self, exc, workers=None):
        """Which of ``workers`` (default: the pool's) are gone after ``exc``; [] in-process."""
        if self.ctx.client is None:
            return []
        return lost_workers(self.pool.workers if workers is None else workers,
                            self.ctx.client, exc, grace=min(self.ctx.timeout, 10.0))

    def recover(self, lost, step, detected, exc):
        """Re-create the pool with the groups of the ``lost`` workers on live ones
        (``step``, ``detected`` (``time.time()``) and ``exc`` go into the events)."""
        t0 = time.monotonic()
        ctx, pool = self.ctx, self.pool
        groups = list(zip(pool.workers, pool.partition_ids))
        pool.close()
        live = sorted(set(ctx.client.nthreads()) - set(lost))
        try:
            groups, moved = reassign(groups, ctx.data.partition_sizes, live, lost)
        except RuntimeError as err:
            raise err from exc
        for ids, worker in moved:
            ctx.data.rehost(ids, worker)
        self.pool = self.make(groups)
        self.generation += 1
        recovery_s = time.monotonic() - t0
        for ids, worker in moved:
            ctx.events.append({"step": int(step), "time": detected, "worker": ", ".join(lost),
                               "what": "executor re-created on a survivor",
                               "moved_to": worker, "partitions": " ".join(map(str, ids)),
                               "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200],
                               "recovery_s": recovery_s})
        logger.warning("dmlcore: worker %s lost at step %d (%s); partitions %s made again "
                       "on %s in %.2f s",
                       ", ".join(lost), step, type(exc).__name__,
                       [ids for ids, _ in moved], [w for _, w in moved], recovery_s)

    def close(self):
        self.pool.close()
