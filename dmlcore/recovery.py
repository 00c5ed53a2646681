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

from .executors import placement_groups

logger = logging.getLogger("dmlcore")

# errors (or their base classes) that a lost worker causes on the driver, besides
# ConnectionError: e.g. distributed's FutureCancelledError, a CancelledError
_LOSS_ERRORS = ("CommClosedError", "FuturesCancelledError", "CancelledError", "KilledWorker",
                "StreamClosedError")


def looks_lost(exc):
    """Whether ``exc`` (or what caused it) is what a dead worker's calls raise: a
    connection closed or reset. (A timeout is what a frozen worker causes; the
    scheduler lists it until its heartbeats time out, so it is not waited for.)"""
    while exc is not None:
        if isinstance(exc, ConnectionError) or any(
                cls.__name__ in _LOSS_ERRORS for cls in type(exc).__mro__):
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


def grow(groups, rows, live):
    """``groups`` spread onto the ``live`` workers that host none; None when
    none is idle or nothing can move. Whole groups move first, from the
    workers hosting several (most rows first): sums keep their bits. When
    every worker still hosts one group and some stay idle, the partitions are
    grouped again, ``p mod W`` over the live workers (the sums' bracketing
    changes: their rounding may). Returns (groups, regrouped)."""
    hosted = {}
    for i, (worker, ids) in enumerate(groups):
        hosted.setdefault(worker, []).append(i)
    idle = [w for w in live if w not in hosted]
    if not idle:
        return None
    out, moved = [list(g) for g in groups], False
    weight = lambda i: sum(int(rows[p]) for p in groups[i][1])  # noqa: E731
    for worker in idle:
        crowded = [w for w, i in hosted.items() if len(i) > 1]
        if not crowded:
            break
        source = max(crowded, key=lambda w: (sum(map(weight, hosted[w])), w))
        i = max(hosted[source], key=lambda i: (weight(i), -i))
        hosted[source].remove(i)
        hosted[worker] = [i]
        out[i][0], moved = worker, True
    n_parts = sum(len(ids) for _, ids in groups)
    if all(w in hosted for w in live) or n_parts < len(live):
        return ([tuple(g) for g in out], False) if moved else None
    live = sorted(live)
    ids = sorted(p for _, g in groups for p in g)
    return [(w, [p for p in ids if p % len(live) == k]) for k, w in enumerate(live)], True


class RecoveringPool:
    """The current ``ExecutorPool`` of a run, re-created after a worker is lost.

    ``make(groups)`` builds a ready pool (``groups=None``: where the data lie;
    else ``[(worker, [partition ids])]``); ``ctx``: the run's ``RunContext``
    (its data, client, deadline and events). ``pool``: the current pool;
    ``generation`` counts the pools made (work that set state up on the
    executors checks it to know when to set it up again).
    """

    check_interval = 0.1    # seconds between membership checks at boundaries (each ~1 ms)

    def __init__(self, ctx, make):
        self.ctx, self.make = ctx, make
        self.pool = self._first_pool()
        self.generation = 0
        self.since = time.time()            # retirement requests after this are served
        self.checked = time.monotonic()     # the last membership check (``rebalance``)

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

    def _first_pool(self):
        """``make(groups)`` with the groups where the data lie (``make(None)``
        in-process); a worker lost while the pool starts (its executor's
        actor cancelled, a socket reset) has its groups made again on a live one
        (an event at the run's first step), as ``attempt`` does later on."""
        ctx = self.ctx
        groups = None if ctx.client is None else placement_groups(ctx.data.workers())
        while True:
            try:
                return self.make(groups)
            except Exception as exc:
                detected = time.time()
                lost = self.lost(exc, [w for w, _ in groups or ()])
                if not lost:
                    raise
                t0 = time.monotonic()
                groups, moved = self._regroup(groups, lost, exc)
                self._record(moved, lost, ctx.start_step, detected, exc, t0)

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
        groups, moved = self._regroup(list(zip(self.pool.workers, self.pool.partition_ids)),
                                      lost, exc)
        self._replace(groups)
        self._record(moved, lost, step, detected, exc, t0)

    def _regroup(self, groups, lost, exc):
        """``groups`` with the ``lost`` workers' groups on live workers, their
        partitions made again there when no live worker holds them;
        returns (groups, [(ids, worker)] moved)."""
        ctx = self.ctx
        live = sorted(set(ctx.client.nthreads()) - set(lost))
        try:
            groups, moved = reassign(groups, ctx.data.partition_sizes, live, lost)
        except RuntimeError as err:
            raise err from exc
        for ids, worker in moved:
            gone = ctx.data.lost_partitions(ids, live)
            if gone:
                ctx.data.rehost(gone, worker)
        return groups, moved

    def _record(self, moved, lost, step, detected, exc, t0):
        recovery_s = time.monotonic() - t0
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        for ids, worker in moved:
            self._event(step, detected, lost, "executor re-created on a survivor", worker,
                        " ".join(map(str, ids)), recovery_s, error)
        logger.warning("dmlcore: worker %s lost at step %d (%s); partitions %s made again "
                       "on %s in %.2f s",
                       ", ".join(lost), step, type(exc).__name__,
                       [ids for ids, _ in moved], [w for _, w in moved], recovery_s)

    def retiring(self):
        """The pool's workers that ``client.retire_workers`` was asked to retire
        since the run began and could not (Dask does not move the executors,
        which are actors), from the scheduler's ``"all"`` events."""
        def asked(dask_scheduler, since):
            # runs on the scheduler (a nested function travels by value, so the
            # scheduler needs no dmlcore); only the addresses come back, not the
            # other events (some hold objects that do not serialise)
            out = []
            for when, msg in dask_scheduler.get_events("all"):
                if (when >= since and isinstance(msg, dict)
                        and msg.get("action") == "retire-workers"):
                    out.extend(str(a) for a in msg.get("could-not-retire", ()))
            return out

        names = self.ctx.client.run_on_scheduler(asked, since=self.since)
        return sorted(set(names) & set(self.pool.workers))

    def rebalance(self, step):
        """At an epoch or round boundary: move the executors off workers asked to
        retire (whole groups: no bit changes), then retire those workers, and
        give workers that joined executors (``grow``); True if the pool changed.
        Asks the scheduler at most every ``check_interval`` seconds: a boundary
        every step (full batches) would otherwise pay two scheduler round trips."""
        now = time.monotonic()
        if self.ctx.client is None or now - self.checked < self.check_interval:
            return False
        self.checked = now
        leaving = self.retiring()
        if leaving:
            self._hand_over(leaving, step)
        return self._grow(step) or bool(leaving)

    def _hand_over(self, leaving, step):
        ctx, pool, t0 = self.ctx, self.pool, time.monotonic()
        live = sorted(set(ctx.client.nthreads()) - set(leaving))
        groups, moved = reassign(list(zip(pool.workers, pool.partition_ids)),
                                 ctx.data.partition_sizes, live, leaving)
        self._replace(groups)
        self._retire(leaving)
        self.since = time.time()
        for ids, worker in moved:
            self._event(step, time.time(), leaving, "executor handed over by a retiring "
                        "worker", worker, " ".join(map(str, ids)), time.monotonic() - t0)

    def _retire(self, leaving, patience=10.0):
        """``client.retire_workers(leaving)``, asked again while the scheduler still
        sees the closed executors there (their release takes a moment)."""
        client, deadline = self.ctx.client, time.monotonic() + patience
        while True:
            client.retire_workers(leaving)
            still = set(leaving) & set(client.nthreads())
            if not still:
                return
            if time.monotonic() > deadline:
                logger.warning("dmlcore: workers %s could not be retired (their data "
                               "were handed over; they stay in the cluster)", sorted(still))
                return
            time.sleep(0.2)

    def _grow(self, step):
        ctx, pool = self.ctx, self.pool
        live = sorted(ctx.client.nthreads())
        groups = list(zip(pool.workers, pool.partition_ids))
        plan = grow(groups, ctx.data.partition_sizes, live)
        if plan is None:
            return False
        t0 = time.monotonic()
        new_groups, regrouped = plan
        self._replace(new_groups)
        joined = sorted(set(live) - set(pool.workers))
        self._event(step, time.time(), joined, "partitions regrouped over the live workers"
                    if regrouped else "executor moved to a joined worker", ", ".join(joined),
                    " | ".join(" ".join(map(str, ids)) for w, ids in new_groups if w in joined),
                    time.monotonic() - t0)
        logger.info("dmlcore: worker(s) %s joined; executors now on %d workers (%s)",
                    ", ".join(joined), len(set(self.pool.workers)),
                    "regrouped" if regrouped else "whole groups moved")
        return True

    def _replace(self, groups):
        """Close the pool and make one with ``groups``; each partition is read where
        its group now runs (Dask moves a block still held elsewhere)."""
        self.pool.close()
        for worker, ids in groups:
            self.ctx.data.moved(ids, worker)
        self.pool = self.make(groups)
        self.generation += 1

    def _event(self, step, when, workers, what, moved_to, partitions, seconds, error=""):
        self.ctx.events.append({"step": int(step), "time": when, "worker": ", ".join(workers),
                                "what": what, "moved_to": moved_to, "partitions": partitions,
                                "error": error, "recovery_s": seconds})

    def close(self):
        self.pool.close()
