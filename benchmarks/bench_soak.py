"""Soak: 64 partitions x 2,000 SyncSGD steps, then 20,000 parameter-server updates, on
LocalCluster(2 workers x 1 thread), watching for leaks.

One cluster, one client and one partitioned data set serve the whole soak,
as a user's session would: the SyncSGD steps run as ``--fits`` successive
``dml.fit`` calls (each continuing from the last one's parameters), then the
parameter-server updates (async) as as many fits. A callback samples, every
``--sample-every`` steps, the driver's and each worker's memory (RSS),
threads and open inet sockets (psutil; the worker pids from
``client.run(os.getpid)``) and the scheduler's task count
(``client.run_on_scheduler``). The driver process also runs the
LocalCluster's scheduler, so its figures include the scheduler's.

Checks (PASS/FAIL each; ``--strict`` makes a FAIL exit 1): memory at the
end <= 1.1 x its value after the first 100 steps (driver, each worker);
threads and sockets at the end back to their counts at the start; the
scheduler's task count back to its start. "Cold start" is before any fit;
"start" is after one ``--warmup``-step fit of each strategy, which pays what a
session pays once (Dask's actor thread on each worker, pooled connections;
the differences are printed by thread name and socket peer); "end" is after
the last fit, once the counts have settled (up to ``--settle`` seconds) and
after ``gc.collect()``; the scheduler's tasks are also checked before any
collection ("end, no gc": Dask's Actor handles sit in reference cycles of
their own method-call closures, and each keeps its actor's task wanted).
Data: a synthetic softmax problem (``--rows`` x ``--features``,
``--classes``) generated on the workers; ``--fashion-mnist`` uses the real
data instead (skipped, with the reason, when absent).

``--small``: a smoke run (200 steps, 1,000 updates) in well under 30 s.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout
from benchmarks.runner import figure  # noqa: E402 - the runner's figure records

MEMORY_LIMIT = 1.1        # end / after the first 100 steps
REFERENCE_STEP = 100


def _scheduler_tasks(dask_scheduler=None):
    return len(dask_scheduler.tasks)


def _connections(proc):
    """Open inet sockets (TCP and UDP, any state) of ``proc``."""
    connections = getattr(proc, "net_connections", None) or proc.connections
    return connections(kind="inet")


def _pooled(dask_worker=None, dask_scheduler=None):
    """Connections open in this Dask server's ConnectionPool (reused between calls)
    and, on a worker, in the pool of its worker client (``get_client()``)."""
    server = dask_worker or dask_scheduler
    client = getattr(server, "_client", None)
    return {"open in Dask's connection pool": server.rpc.open,
            "worker client": int(client is not None),
            "open in the worker client's pool": client.rpc.open if client is not None else 0}


def _thread_names():
    import threading

    return [t.name for t in threading.enumerate()]


class Sampler:
    """Samples of (driver, each worker) RSS, threads, sockets and the scheduler's tasks."""

    def __init__(self, client):
        import psutil

        self.client = client
        self.driver = psutil.Process()
        self.pids = dict(sorted(client.run(os.getpid).items()))   # worker address -> pid
        self.workers = [psutil.Process(pid) for pid in self.pids.values()]
        self.samples = []
        self.t0 = time.perf_counter()

    def measure(self):
        procs = {"driver": self.driver, **{f"worker{i}": p for i, p in enumerate(self.workers)}}
        out = {}
        for name, p in procs.items():
            out[f"{name}_rss"] = p.memory_info().rss / 2**20
            out[f"{name}_threads"] = p.num_threads()
            out[f"{name}_sockets"] = len(_connections(p))
        out["scheduler_tasks"] = self.client.run_on_scheduler(_scheduler_tasks)
        return out

    def inventory(self):
        """Per process: Counter of thread names (Python threads) and of sockets
        as 'LISTEN' or 'to <peer>' (peers named scheduler / workerN / a port)."""
        from collections import Counter

        names = {"driver": _thread_names(),
                 **{f"worker{i}": v for i, v in
                    enumerate(dict(sorted(self.client.run(_thread_names).items())).values())}}
        ports = {int(self.client.scheduler.address.rsplit(":", 1)[1]): "scheduler",
                 **{int(a.rsplit(":", 1)[1]): f"worker{i}" for i, a in enumerate(self.pids)}}
        procs = {"driver": self.driver, **{f"worker{i}": p for i, p in enumerate(self.workers)}}
        out = {}
        for name, p in procs.items():
            socks = Counter()
            for c in _connections(p):
                if not c.raddr:
                    socks[f"{c.status} on {ports.get(c.laddr.port, 'a port')}"] += 1
                elif c.laddr.port in ports and c.raddr.port not in ports:
                    socks[f"{ports[c.laddr.port]} <- a client"] += 1
                else:
                    socks[f"to {ports.get(c.raddr.port, c.raddr.port)}"] += 1
            out[name] = (Counter(_strip_ids(n) for n in names[name]), socks)
        # Dask's connection pools keep connections for reuse: the client's and the
        # scheduler's (both in the driver process) and each worker's
        pools = [Counter(self.client.run_on_scheduler(_pooled))
                 + Counter({"open in the client's pool": self.client.rpc.open}),
                 *map(Counter, dict(sorted(self.client.run(_pooled).items())).values())]
        for name, counts in zip(out, pools):
            out[name] += (counts,)
        return out

    def sample(self, label, phase, step):
        s = {"label": label, "phase": phase, "step": step,
             "t": time.perf_counter() - self.t0, **self.measure()}
        self.samples.append(s)
        return s

    def callback(self, phase, every, offset):
        """A ``dml.fit`` callback sampling every ``every`` steps (``offset``: the
        phase's steps in earlier fits); ``sync_every`` lets replicas run between."""
        def sample_every(step, record, params):
            total = offset + step
            if total % every == 0 or total == REFERENCE_STEP:
                self.sample(f"{phase} step {total}", phase, total)
            return False

        sample_every.sync_every = math.gcd(every, REFERENCE_STEP)
        return sample_every

    def settled(self, start, timeout, keys=None, collect=True):
        """Measure until the counts ``keys`` (default: threads, sockets and tasks)
        are back to ``start``, or for ``timeout`` seconds; ``collect``: run
        ``gc.collect()`` in this process before each measurement."""
        deadline = time.perf_counter() + timeout
        keys = keys or [k for k in start
                        if k.endswith(("_threads", "_sockets")) or k == "scheduler_tasks"]
        while True:
            if collect:
                gc.collect()
            now = self.measure()
            if all(now[k] <= start[k] for k in keys) or time.perf_counter() > deadline:
                return now
            time.sleep(0.5)


def _strip_ids(name):
    """A thread name without the pids and counters Dask puts in it."""
    import re

    return re.sub(r"(^\d+-)|(-\d+)+$|_\d+$", "", name)


def _difference(before, after):
    """'+2 x name, -1 x other' between two Counters ('' when equal)."""
    parts = [f"{n:+d} x {k}" for k in sorted(set(before) | set(after))
             for n in [after[k] - before[k]] if n]
    return ", ".join(parts)


def _data(dml, args, client):
    if args.fashion_mnist:
        from benchmarks.runner import FASHION_MNIST_MISSING, fashion_mnist_available

        if fashion_mnist_available():
            X, y = dml.datasets.fashion_mnist("train")
            n = min(args.rows, len(y))
            return (dml.partition(X[:n], y[:n], n_partitions=args.partitions, seed=0,
                                  client=client), X.shape[1], 10, "Fashion-MNIST")
        print(f"Fashion-MNIST skipped ({FASHION_MNIST_MISSING}); synthetic data instead")
    X, y = dml.datasets.make_classification(args.rows, args.features, args.classes, seed=0,
                                            chunks=-(-args.rows // args.partitions),
                                            dtype=np.float32)
    data = dml.partition(X, y, n_partitions=args.partitions, seed=0, client=client)
    return data, args.features, args.classes, "synthetic"


def _fits(total, n_fits):
    """``total`` steps cut into ``n_fits`` nearly equal runs."""
    n_fits = max(1, min(n_fits, total))
    return [total // n_fits + (i < total % n_fits) for i in range(n_fits)]


def _phase(dml, sampler, model, data, strategy, optimizer, steps, fits, every, phase, client,
           params):
    t = time.perf_counter()
    done = 0
    for n in _fits(steps, fits):
        result = dml.fit(model, data, strategy, optimizer, steps=n,
                         init_params=params, client=client, progress=False,
                         callbacks=[sampler.callback(phase, every, done)])
        params, loss = result.params, float(result.history.loss.values[-1])
        done += n
        del result
    return params, loss, time.perf_counter() - t


def _slope(samples, phase, key, first=0):
    """Least-squares growth of ``key`` over ``phase``'s samples from step ``first`` on,
    per 1,000 steps (NaN with fewer than 3 samples)."""
    points = [(s["step"], s[key]) for s in samples if s["phase"] == phase and s["step"] >= first]
    if len(points) < 3:
        return float("nan")
    x, y = np.array(points, dtype=float).T
    return float(np.polyfit(x, y, 1)[0] * 1000)


def _check(name, ok, text):
    print(f"  {name:34s} {text}: {'PASS' if ok else 'FAIL'}")
    return ok


def run(argv=None):
    """Run and print as main() does; return the figures (and notes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="smoke-sized run")
    parser.add_argument("--steps", type=int, default=2000, help="SyncSGD steps")
    parser.add_argument("--updates", type=int, default=20000, help="parameter-server updates")
    parser.add_argument("--fits", type=int, default=4, help="fits per phase")
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--rows", type=int, default=64 * 256)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sample-every", type=int, default=None,
                        help="steps between samples (default: 50 steps, 500 updates)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="steps of the warm-up fit of each strategy before the start counts")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds the end counts may take to come back")
    parser.add_argument("--fashion-mnist", action="store_true",
                        help="Fashion-MNIST rows instead of synthetic ones (when installed)")
    parser.add_argument("--json", default=None, help="write the figures and samples here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    args = parser.parse_args(argv)
    if args.small:
        args.steps, args.updates, args.fits = min(args.steps, 200), min(args.updates, 1000), 2
        args.rows = min(args.rows, args.partitions * 128)
    if args.steps <= REFERENCE_STEP:
        parser.error(f"--steps must be > {REFERENCE_STEP} (memory is compared with step "
                     f"{REFERENCE_STEP})")
    sync_every = args.sample_every or (25 if args.small else 50)
    ps_every = args.sample_every or (100 if args.small else 500)

    import dmlcore as dml
    from distributed import Client
    from dmlcore.cluster import local_cluster

    wall0 = time.perf_counter()
    with local_cluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as client:
        data, d, k, source = _data(dml, args, client)
        model = dml.models.Softmax(d, k)
        sampler = Sampler(client)
        time.sleep(1.0)                          # let the partitioning's tasks be forgotten
        cold = sampler.sample("cold start", "start", 0)
        cold_inventory = sampler.inventory()
        print(f"soak: {source} {data.n_rows} x {d} float32, {k} classes, {data.n_partitions} "
              f"partitions on 2 workers x 1 thread; {args.steps} SyncSGD steps (batch "
              f"{args.batch_size}) then {args.updates} async parameter-server updates, "
              f"{args.fits} fits each", flush=True)
        # what a session pays once (Dask's actor thread on each worker, pooled
        # connections): one short fit of each strategy before the start counts
        for strategy in (dml.SyncSGD(batch_size=args.batch_size),
                         dml.ParameterServer("async", batch_size=args.batch_size)):
            dml.fit(model, data, strategy, dml.optim.SGD(lr=0.05), steps=args.warmup,
                    client=client, progress=False)
        sampler.settled(cold, args.settle, keys=["scheduler_tasks"])
        start = sampler.sample("start", "start", 0)
        start_inventory = sampler.inventory()
        params, sync_loss, sync_s = _phase(
            dml, sampler, model, data, dml.SyncSGD(batch_size=args.batch_size),
            dml.optim.SGD(lr=0.05, momentum=0.9), args.steps, args.fits, sync_every, "sync",
            client, None)
        after_sync = sampler.sample("after sync", "sync", args.steps)
        print(f"SyncSGD: {args.steps} steps in {sync_s:.1f} s ({sync_s / args.steps * 1e3:.2f} "
              f"ms/step), final loss {sync_loss:.4f}", flush=True)
        params, ps_loss, ps_s = _phase(
            dml, sampler, model, data,
            dml.ParameterServer("async", batch_size=args.batch_size),
            dml.optim.SGD(lr=0.01), args.updates,
            args.fits, ps_every, "ps", client, params)
        print(f"parameter server: {args.updates} updates in {ps_s:.1f} s "
              f"({args.updates / ps_s:.0f} updates/s), final loss {ps_loss:.4f}", flush=True)
        # Dask's Actor handles sit in reference cycles (their method calls' closures),
        # and each handle's Future keeps its actor's task: first without a collection
        sampler.settled(start, min(args.settle, 5.0), collect=False)
        end_no_gc = sampler.sample("end, no gc", "end", args.steps + args.updates)
        sampler.settled(start, args.settle)
        end = sampler.sample("end", "end", args.steps + args.updates)
        end_inventory = sampler.inventory()
        pids = sampler.pids
    wall = time.perf_counter() - wall0
    ref = next(s for s in sampler.samples if s["phase"] == "sync"
               and s["step"] == REFERENCE_STEP)
    procs = ["driver"] + [f"worker{i}" for i in range(len(pids))]
    print("\nthreads and sockets that differ (Python thread names; sockets by peer; Dask's "
          "connection pools, which keep connections for reuse):")
    for p in procs:
        for i, what in enumerate(("threads", "sockets", "pooled")):
            warm = _difference(cold_inventory[p][i], start_inventory[p][i]) or "same"
            soaked = _difference(start_inventory[p][i], end_inventory[p][i]) or "same"
            print(f"  {p} {what}: cold start -> start [{warm}]; start -> end [{soaked}]")
    return _report(args, sampler.samples, cold, start, ref, after_sync, end_no_gc, end, procs,
                   pids, sync_s, ps_s, sync_loss, ps_loss, wall)


def _report(args, samples, cold, start, ref, after_sync, end_no_gc, end, procs, pids, sync_s,
            ps_s, sync_loss, ps_loss, wall):
    print("\ntimeline (RSS MB / threads / sockets per process; scheduler tasks):")
    print(f"  {'sample':18s} {'s':>7s} " + " ".join(f"{p:>18s}" for p in procs) + "  tasks")
    stepped = [s for s in samples if " step " in s["label"]]
    every = max(1, len(stepped) // 36)
    kept = {id(s) for s in stepped[::every]}
    shown = [s for s in samples if " step " not in s["label"] or id(s) in kept]
    for s in shown:
        print(f"  {s['label']:18s} {s['t']:7.1f} " + " ".join(
            f"{s[p + '_rss']:8.1f}/{s[p + '_threads']:3d}/{s[p + '_sockets']:4d}" for p in procs)
            + f"  {s['scheduler_tasks']:5d}")
    print("  (workers: " + ", ".join(f"worker{i} = {a} pid {pid}"
                                     for i, (a, pid) in enumerate(pids.items())) + ")")

    figures = [figure("SyncSGD steps", args.steps, "steps"),
               figure("parameter-server updates", args.updates, "updates"),
               figure("partitions", args.partitions, "partitions"),
               figure("SyncSGD phase wall time", sync_s, "s"),
               figure("SyncSGD step", sync_s / args.steps * 1e3, "ms"),
               figure("parameter-server phase wall time", ps_s, "s"),
               figure("parameter-server updates/s", args.updates / ps_s, "updates/s"),
               figure("soak wall time", wall, "s"),
               figure("SyncSGD final loss", sync_loss, "loss"),
               figure("parameter-server final loss", ps_loss, "loss")]
    print(f"\nchecks (cold start: before any fit; start: after the warm-up fits; reference: "
          f"after {REFERENCE_STEP} SyncSGD steps; end: after the last fit, settled, after "
          f"gc.collect()):")
    ok = True
    for p in procs:
        peak = max(s[p + "_rss"] for s in samples)
        r = end[p + "_rss"] / ref[p + "_rss"]
        figures += [figure(f"{p} RSS at cold start", cold[p + "_rss"], "MB"),
                    figure(f"{p} RSS at start", start[p + "_rss"], "MB"),
                    figure(f"{p} RSS after {REFERENCE_STEP} steps", ref[p + "_rss"], "MB"),
                    figure(f"{p} RSS after SyncSGD", after_sync[p + "_rss"], "MB"),
                    figure(f"{p} RSS at end", end[p + "_rss"], "MB"),
                    figure(f"{p} RSS peak", peak, "MB"),
                    figure(f"{p} RSS end / after {REFERENCE_STEP} steps", r, "x",
                           peer=f"after {REFERENCE_STEP} steps")]
        slopes = (_slope(samples, "sync", p + "_rss", REFERENCE_STEP),
                  _slope(samples, "ps", p + "_rss"))
        figures += [figure(f"{p} RSS growth, SyncSGD", slopes[0], "MB per 1000 steps"),
                    figure(f"{p} RSS growth, parameter server", slopes[1],
                           "MB per 1000 updates")]
        ok &= _check(f"{p} RSS", r <= MEMORY_LIMIT,
                     f"cold start {cold[p + '_rss']:.1f} MB, start {start[p + '_rss']:.1f} MB, "
                     f"after {REFERENCE_STEP} steps {ref[p + '_rss']:.1f} MB, after SyncSGD "
                     f"{after_sync[p + '_rss']:.1f} MB, "
                     f"end {end[p + '_rss']:.1f} MB, peak {peak:.1f} MB, end / after "
                     f"{REFERENCE_STEP} steps {r:.3f}x (limit {MEMORY_LIMIT}x); growth "
                     f"{slopes[0]:+.3f} MB/1000 steps, {slopes[1]:+.3f} MB/1000 updates")
    for what in ("threads", "sockets"):
        for p in procs:
            key = f"{p}_{what}"
            peak = max(s[key] for s in samples)
            figures += [figure(f"{p} {what} at cold start", cold[key], what),
                        figure(f"{p} {what} at start", start[key], what),
                        figure(f"{p} {what} peak", peak, what),
                        figure(f"{p} {what} after SyncSGD", after_sync[key], what),
                        figure(f"{p} {what} at end", end[key], what)]
            ok &= _check(f"{p} {what}", end[key] <= start[key],
                         f"cold start {cold[key]}, start {start[key]}, peak {peak}, after "
                         f"SyncSGD {after_sync[key]}, end {end[key]} ({end[key] - start[key]:+d})")
    key = "scheduler_tasks"
    peak = max(s[key] for s in samples)
    figures += [figure("scheduler tasks at cold start", cold[key], "tasks"),
                figure("scheduler tasks at start", start[key], "tasks"),
                figure("scheduler tasks peak", peak, "tasks"),
                figure("scheduler tasks after SyncSGD", after_sync[key], "tasks"),
                figure("scheduler tasks at end, no gc", end_no_gc[key], "tasks"),
                figure("scheduler tasks at end", end[key], "tasks")]
    ok &= _check("scheduler tasks, no gc", end_no_gc[key] <= start[key],
                 f"start {start[key]}, end before any gc.collect() {end_no_gc[key]} "
                 f"({end_no_gc[key] - start[key]:+d})")
    ok &= _check("scheduler tasks", end[key] <= start[key],
                 f"cold start {cold[key]}, start {start[key]}, peak {peak}, after SyncSGD "
                 f"{after_sync[key]}, end "
                 f"{end[key]} ({end[key] - start[key]:+d})")
    print(f"\nsoak wall time {wall:.1f} s; all checks: {'PASS' if ok else 'FAIL'}", flush=True)
    notes = [] if ok else ["a soak check failed (see the PASS/FAIL lines)"]
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "notes": notes, "passed": ok,
                                               "samples": samples}, indent=1))
    return {"figures": figures, "notes": notes, "passed": ok}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    result = run(argv)
    return 1 if "--strict" in argv and not result["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
