"""Binary logistic regression to the optimum: dmlcore L-BFGS vs dask-ml vs scikit-learn.

Data: ``rows x cols`` float64 generated on the workers, ``chunks`` row chunks
persisted on ``LocalCluster(n_workers=2, threads_per_worker=1)``; every solver
gets the same persisted arrays (scikit-learn gets them as one NumPy array).
All solutions are scored with ONE objective, scikit-learn's divided by C·n:

    f(w, b) = mean log-loss + ||w||^2 / (2 C n)       (intercept not penalised)

Printed: time and objective of each solver, and dmlcore's time ratios.
Run: ``python benchmarks/bench_convex.py`` (full: 2,000,000 x 100, 16 chunks);
``--rows 20000 --cols 10`` for a smoke run.
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
    z = X @ coef + intercept
    loss = np.logaddexp(0.0, z) - y * z
    return float(loss.mean() + coef @ coef / (2 * C * len(y)))


def run(argv=None):
    """Run and print as main() does; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--cols", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--C", type=float, default=1.0)
    parser.add_argument("--skip-admm", action="store_true", default=True)
    parser.add_argument("--peers", default="dask-ml,sklearn",
                        help="comma-separated peers to run (dask-ml, sklearn)")
    args = parser.parse_args(argv)

    from dask.distributed import Client

    import dmlcore as dml
    from dmlcore.cluster import local_cluster

    peers = set(filter(None, args.peers.split(",")))
    n, d, C = args.rows, args.cols, args.C
    with local_cluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        X, y = dml.datasets.make_classification(n, d, chunks=-(-n // args.chunks), seed=0)
        data = dml.partition(X, y, n_partitions=args.chunks, scheme="iid", seed=0, client=client)
        Xp, yp = data.X, data.y.astype(np.float64)
        Xp, yp = client.persist([Xp, yp])
        print(f"data: {n} x {d} float64 ({data.nbytes / 1e9:.2f} GB), {args.chunks} partitions "
              f"on {len(client.scheduler_info()['workers'])} workers")
        X_np, y_np = client.compute([Xp, yp], sync=True)
        # an array gathered from the cluster can start at any byte of the received frame,
        # and on one that is not 8-byte aligned NumPy's matmul skips BLAS: 16-23 s for
        # scikit-learn's fit against 2.1 s on an aligned copy. Its peers get an aligned one.
        X_np, y_np = (np.require(a, requirements="CA") for a in (X_np, y_np))
        results = {}

        model = dml.models.Logistic(d)
        t = time.perf_counter()
        fit = dml.fit(model, data, dml.SyncSGD(batch_size=None),
                      dml.optim.LBFGS(max_iter=500, tol=1e-8, weight_decay=1 / (C * n)),
                      steps=500, client=client, progress=False)
        elapsed = time.perf_counter() - t
        w = model.views(fit.params)["linear"]
        results["dmlcore lbfgs"] = (elapsed, objective(w["W"], w["b"][0], X_np, y_np, C),
                                    fit.history.sizes["step"])

        if "sklearn" in peers:
            from sklearn.linear_model import LogisticRegression as SkLR

            t = time.perf_counter()
            sk = SkLR(C=C, tol=1e-8, max_iter=1000).fit(X_np, y_np)
            elapsed = time.perf_counter() - t
            results["scikit-learn lbfgs (1 process)"] = (
                elapsed, objective(sk.coef_.ravel(), sk.intercept_[0], X_np, y_np, C),
                int(sk.n_iter_[0]))

        if "dask-ml" in peers:
            from dask_ml.linear_model import LogisticRegression as DaskLR

            for solver in ("lbfgs", "gradient_descent"):
                t = time.perf_counter()
                est = DaskLR(C=C, solver=solver, max_iter=100).fit(Xp, yp)
                elapsed = time.perf_counter() - t
                results[f"dask-ml {solver}"] = (
                    elapsed, objective(np.asarray(est.coef_).ravel(), float(est.intercept_),
                                       X_np, y_np, C), None)

    best = min(v[1] for v in results.values())
    ours_t, ours_f, _ = results["dmlcore lbfgs"]
    print(f"\n{'solver':34s} {'time [s]':>9s} {'objective':>14s} {'gap to best':>12s} "
          f"{'its':>5s}  time / dmlcore")
    for name, (elapsed, f, its) in results.items():
        print(f"{name:34s} {elapsed:9.2f} {f:14.10f} {f - best:12.3e} "
              f"{'' if its is None else its:>5}  {elapsed / ours_t:8.2f}x")
    for name in ("dask-ml lbfgs", "scikit-learn lbfgs (1 process)"):
        if name in results:
            peer_t, peer_f, _ = results[name]
            verdict = "lower or equal" if ours_f <= peer_f + 1e-12 else "HIGHER"
            print(f"dmlcore vs {name}: {peer_t / ours_t:.3g}x faster, objective {verdict} "
                  f"({ours_f - peer_f:+.2e})")
    figures = [figure("rows", n, "rows"), figure("columns", d, "columns"),
               figure("partitions", args.chunks, "partitions")]
    for name, (elapsed, f, its) in results.items():
        figures += [figure(f"{name}: time", elapsed, "s"), figure(f"{name}: objective", f, "objective")]
        if its is not None:
            figures.append(figure(f"{name}: iterations", its, "iterations"))
        if name != "dmlcore lbfgs":
            figures.append(figure(f"{name} time / dmlcore lbfgs time", elapsed / ours_t, "x",
                                peer=name))
            figures.append(figure(f"{name}: objective - dmlcore's", f - ours_f, "objective"))
    return figures


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
