"""The estimator a dask-ml user writes: ``dml.LogisticRegression`` vs dask-ml's, same arrays.

Data: ``rows x cols`` float64 generated on the workers, ``chunks`` equal row
chunks persisted on ``LocalCluster(n_workers=2, threads_per_worker=1)`` (as a
user's ``X.persist()`` leaves them). Timed end to end, partitioning included:

  * ``dml.LogisticRegression(C, tol=1e-8).fit(X, y)``: balanced persisted
    chunks are used where they lie (``data.partition_in_place``);
  * the same with ``n_partitions=chunks``: every row moved into iid
    partitions first (the estimator's behaviour before in-place chunks);
  * dask-ml's ``LogisticRegression(C, solver="lbfgs").fit(X, y)``;
  * ``--weighted``: the in-place fit again with ``sample_weight`` all 1 (the
    same L-BFGS path and optimum, so the time difference is what carrying and
    applying weights costs: goal <= 1.1x).

All solutions are scored with one objective, scikit-learn's divided by C·n
(mean log-loss + ||w||^2 / (2 C n), intercept not penalised), evaluated on the
cluster. Printed: time and objective of each, and the ratio to dask-ml.
Run: ``python benchmarks/bench_estimator.py`` (2,000,000 x 100, 16 chunks);
``--rows 20000 --cols 10 --chunks 4`` for a smoke run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout
from benchmarks.runner import figure  # noqa: E402 - the runner's figure records


def objective(coef, intercept, X, y, C):
    """The objective on dask arrays (computed on the cluster)."""
    z = X @ np.asarray(coef, dtype=np.float64) + float(intercept)
    loss = np.logaddexp(0.0, z) - y * z
    return float(loss.mean().compute() + coef @ coef / (2 * C * X.shape[0]))


def run(argv=None):
    """Run and print as main() does; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--cols", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--C", type=float, default=1.0)
    parser.add_argument("--skip-iid", action="store_true",
                        help="do not time the fit that moves every row first")
    parser.add_argument("--skip-dask-ml", action="store_true")
    parser.add_argument("--weighted", action="store_true",
                        help="also time weighted fits (sample_weight)")
    args = parser.parse_args(argv)

    from dask.distributed import Client, wait

    import dmlcore as dml
    from dmlcore.cluster import local_cluster

    n, d, C = args.rows, args.cols, args.C
    with local_cluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        X, y = dml.datasets.make_classification(n, d, chunks=-(-n // args.chunks), seed=0)
        X, y = client.persist([X, y.astype(np.float64)])
        wait([X, y], timeout=600)
        print(f"data: {n} x {d} float64 ({X.nbytes / 1e9:.2f} GB), {X.numblocks[0]} persisted "
              f"chunks on {len(client.scheduler_info()['workers'])} workers", flush=True)
        results = {}

        def run(name, make, **fit_kwargs):
            t = time.perf_counter()
            est = make().fit(X, y, **fit_kwargs)
            elapsed = time.perf_counter() - t
            coef = np.asarray(est.coef_, dtype=np.float64).ravel()
            intercept = float(np.asarray(est.intercept_).ravel()[0])
            results[name] = (elapsed, objective(coef, intercept, X, y, C))
            iters = np.ravel(getattr(est, "n_iter_", [0]))[0]
            print(f"  {name}: {elapsed:.2f} s ({iters} iterations)", flush=True)
            return est

        ours = run("dmlcore, chunks in place",
                   lambda: dml.LogisticRegression(C=C, tol=1e-8, max_iter=500, client=client))
        parts = ours.history_.attrs["n_partitions"]
        if args.weighted:       # warm now: the unweighted fit again, then the weighted one
            ones = client.persist(y * 0 + 1)
            for name, kwargs in (("dmlcore, in place (warm)", {}),
                                 ("dmlcore, sample_weight=1", {"sample_weight": ones})):
                run(name, lambda: dml.LogisticRegression(C=C, tol=1e-8, max_iter=500,
                                                         client=client), **kwargs)
        if not args.skip_iid:
            run("dmlcore, iid repartition",
                lambda: dml.LogisticRegression(C=C, tol=1e-8, max_iter=500, client=client,
                                               n_partitions=X.numblocks[0]))
        if not args.skip_dask_ml:
            from dask_ml.linear_model import LogisticRegression as DaskLR

            run("dask-ml lbfgs", lambda: DaskLR(C=C, solver="lbfgs", max_iter=100))

    ours_t = results["dmlcore, chunks in place"][0]
    if "dmlcore, sample_weight=1" in results:
        print(f"weighted (all 1) / unweighted fit time, both warm: "
              f"{results['dmlcore, sample_weight=1'][0] / results['dmlcore, in place (warm)'][0]:.2f}"
              " (goal <= 1.1)")
    print(f"\ndmlcore partitions: {parts} (one per chunk when in place)")
    print(f"{'fit':28s} {'time [s]':>9s} {'objective':>14s}  time / dmlcore in place")
    for name, (elapsed, f) in results.items():
        print(f"{name:28s} {elapsed:9.2f} {f:14.10f}  {elapsed / ours_t:8.2f}x")
    if "dask-ml lbfgs" in results:
        peer_t, peer_f = results["dask-ml lbfgs"]
        print(f"dmlcore LogisticRegression vs dask-ml lbfgs: {peer_t / ours_t:.3g}x faster "
              f"(partitioning included), objective difference "
              f"{results['dmlcore, chunks in place'][1] - peer_f:+.2e}")
    figures = [figure("rows", n, "rows"), figure("columns", d, "columns"),
               figure("partitions", parts, "partitions")]
    for name, (elapsed, f) in results.items():
        figures += [figure(f"{name}: time", elapsed, "s"), figure(f"{name}: objective", f, "objective")]
        if name != "dmlcore, chunks in place":
            figures.append(figure(f"{name} time / dmlcore in place", elapsed / ours_t, "x",
                                peer=name))
    if "dmlcore, sample_weight=1" in results:
        figures.append(figure("weighted (all 1) / unweighted fit time, both warm",
                            results["dmlcore, sample_weight=1"][0]
                            / results["dmlcore, in place (warm)"][0], "x",
                            peer="dmlcore, in place (warm)"))
    return figures


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
