"""Cost of one synchronous step: dmlcore SyncSGD vs naive Dask, on LocalCluster(2 x 1 thread).

1. Overhead: 16 tiny partitions (compute negligible); time per step of
   dmlcore (actor transport; task transport) and of a naive Dask step
   (one ``client.submit`` per partition with a NumPy gradient, gather, sum).
2. Full gradient on ``rows x cols`` float64 (default 2,000,000 x 100 = 1.6 GB,
   16 partitions): dmlcore's step time against the per-worker kernel time
   (one worker's half of the rows through ``Logistic.loss_grad`` on one
   thread in this process), and the naive Dask + NumPy step.
3. ``local_steps``: synchronisations amortised over k local steps.

``--rows 20000`` for a smoke run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout
from benchmarks.runner import figure  # noqa: E402 - the runner's figure records


def _numpy_grad(w, X, y):
    z = X @ w[:-1] + w[-1]
    r = 1 / (1 + np.exp(-z)) - y
    return np.concatenate([X.T @ r, [r.sum()]]), float((np.logaddexp(0, z) - y * z).sum())


def naive_dask_step(client, parts, w):
    futures = [client.submit(_numpy_grad, w, X, y, pure=False) for X, y, _ in parts]
    grads = client.gather(futures)
    return sum(g for g, _ in grads)


def _kernel_time(model, params, *arrays):
    """Seconds of one pass of ``model.loss_grad`` over the given (X, y, w) partitions."""
    grad = np.empty_like(params)
    t = time.perf_counter()
    for X, y in zip(arrays[::3], arrays[1::3]):
        model.loss_grad(params, X, y, grad)
    return time.perf_counter() - t


def concurrent_kernel_time(client, model, data, params, repeat=5):
    """Slowest worker's kernel time over its own partitions, all workers at once.

    This is the compute a step cannot avoid on this machine: both workers
    stream their partitions at the same time and share the memory bandwidth.
    """
    futures, workers = data.partition_futures(), data.workers()
    by_worker = {}
    for pid, w in enumerate(workers):
        by_worker.setdefault(w, []).extend(futures[pid])
    best = []
    for _ in range(repeat):
        runs = [client.submit(_kernel_time, model, params, *parts, workers=[w], pure=False)
                for w, parts in by_worker.items()]
        best.append(max(client.gather(runs)))
    return min(best)


def time_steps(fn, n_steps):
    fn()                                    # warm-up
    t = time.perf_counter()
    for _ in range(n_steps):
        fn()
    return (time.perf_counter() - t) / n_steps


def time_fit(dml, model, data, strategy, steps, client):
    """Seconds per step of dml.fit (warm-up run first, then a timed run)."""
    opt = dml.optim.SGD(lr=0.01)
    dml.fit(model, data, strategy, opt, steps=2, client=client, progress=False)
    t = time.perf_counter()
    result = dml.fit(model, data, strategy, opt, steps=steps, client=client, progress=False)
    total = time.perf_counter() - t
    h = result.history
    per_step = float(np.median(np.diff(h.wall_time.values))) if steps > 2 else total / steps
    return per_step, total / steps


def run(argv=None):
    """Run and print as main() does; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--cols", type=int, default=100)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)

    from dask.distributed import Client
    from threadpoolctl import threadpool_limits

    import dmlcore as dml
    from dmlcore.cluster import local_cluster

    out = {}
    figures = []
    with local_cluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        # 1. overhead with negligible compute
        rng = np.random.default_rng(0)
        Xs = rng.normal(size=(1600, 10))
        ys = (rng.random(1600) < 0.5).astype(np.float64)
        small = dml.partition(Xs, ys, n_partitions=16, seed=0, client=client)
        model = dml.models.Logistic(10)
        print("1. step overhead, 16 partitions of 100 x 10 on 2 workers")
        for name, strategy in (("dmlcore SyncSGD (actors)", dml.SyncSGD(batch_size=None)),
                               ("dmlcore SyncSGD (tasks, fan_in=4)",
                                dml.SyncSGD(batch_size=None, transport="tasks"))):
            median, mean = time_fit(dml, model, small, strategy, args.steps, client)
            out[name] = median
            figures.append(figure(f"{name}: step", median * 1e3, "ms"))
            print(f"   {name:40s} {median * 1e3:7.2f} ms/step (median; mean {mean * 1e3:.2f})")
        data_parts = small.partition_futures()
        w = np.zeros(11)
        naive = time_steps(lambda: naive_dask_step(client, data_parts, w), min(args.steps, 100))
        out["naive"] = naive
        print(f"   {'naive Dask (submit + gather + sum)':40s} {naive * 1e3:7.2f} ms/step")
        print(f"   ratio naive / dmlcore: {naive / out['dmlcore SyncSGD (actors)']:.1f}x")
        figures += [figure("naive Dask step", naive * 1e3, "ms"),
                    figure("naive Dask / dmlcore step", naive / out["dmlcore SyncSGD (actors)"],
                         "x", peer="naive Dask (submit + gather + sum)")]

        # 2. full gradient on the large data
        n, d = args.rows, args.cols
        X, y = dml.datasets.make_classification(n, d, chunks=-(-n // 16), seed=0)
        big = dml.partition(X, y, n_partitions=16, seed=0, client=client)
        model = dml.models.Logistic(d)
        half = np.asarray(X[: n // 2].compute())
        yhalf = np.asarray(y[: n // 2].compute()).astype(np.float64)
        params, grad = np.zeros(d + 1), np.empty(d + 1)
        with threadpool_limits(1):
            kernel = min(_timed(lambda: model.loss_grad(params, half, yhalf, grad))
                         for _ in range(5))
        del half, yhalf
        together = concurrent_kernel_time(client, model, big, params)
        steps = max(5, min(args.steps // 10, 20))
        median, _ = time_fit(dml, model, big, dml.SyncSGD(batch_size=None), steps, client)
        big_parts = big.partition_futures()
        wbig = np.zeros(d + 1)
        naive_big = time_steps(lambda: naive_dask_step(client, big_parts, wbig), 5)
        print(f"\n2. full-gradient step, {n} x {d} float64 ({big.nbytes / 1e9:.2f} GB), "
              "16 partitions, 2 workers")
        print(f"   per-worker kernel time (n/2 rows, 1 thread): {kernel * 1e3:8.1f} ms")
        print(f"   kernel time, both workers at once (slowest): {together * 1e3:8.1f} ms "
              f"= {together / kernel:.2f} x (shared memory bandwidth)")
        print(f"   dmlcore SyncSGD step:                        {median * 1e3:8.1f} ms "
              f"= {median / kernel:.2f} x kernel, {median / together:.2f} x concurrent kernel")
        print(f"   naive Dask + NumPy step:                     {naive_big * 1e3:8.1f} ms "
              f"= {naive_big / kernel:.2f} x kernel; dmlcore is {naive_big / median:.1f}x faster")
        figures += [figure("rows", n, "rows"), figure("columns", d, "columns"),
                    figure("data size", big.nbytes / 1e9, "GB"),
                    figure("per-worker kernel time", kernel * 1e3, "ms"),
                    figure("kernel time, both workers at once", together * 1e3, "ms"),
                    figure("full-gradient step", median * 1e3, "ms"),
                    figure("full-gradient step / kernel", median / kernel, "x",
                         peer="per-worker kernel time"),
                    figure("full-gradient step / concurrent kernel", median / together, "x",
                         peer="kernel time, both workers at once"),
                    figure("naive Dask + NumPy full-gradient step", naive_big * 1e3, "ms"),
                    figure("naive Dask + NumPy / dmlcore full-gradient step", naive_big / median,
                         "x", peer="naive Dask + NumPy")]

        # 3. local steps
        print("\n3. local_steps: mini-batches of 32 rows per partition, 16 partitions")
        base = None
        for k in (1, 4, 16):
            per_sync, _ = time_fit(dml, model, big, dml.SyncSGD(batch_size=32, local_steps=k),
                                   max(10, args.steps // 4), client)
            per_local = per_sync / k
            base = base or per_local
            print(f"   local_steps={k:3d}: {per_sync * 1e3:7.2f} ms per synchronisation, "
                  f"{per_local * 1e3:6.3f} ms per local step ({base / per_local:.1f}x throughput)")
            figures += [figure(f"local_steps={k}: per synchronisation", per_sync * 1e3, "ms"),
                        figure(f"local_steps={k}: per local step", per_local * 1e3, "ms")]
            if k > 1:
                figures.append(figure(f"local_steps={k}: throughput / local_steps=1",
                                    base / per_local, "x", peer="local_steps=1"))
    return figures


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
