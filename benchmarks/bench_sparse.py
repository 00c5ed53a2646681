"""The CSR loss+gradient kernels against scipy.sparse + NumPy, one thread.

Data: ``--rows`` x ``--cols`` CSR float64 with ``--nnz`` stored entries per
row at random columns (int32 indices), built directly (no densifying);
labels 0/1 (10 classes for softmax). Each figure is the median of
``--repeat`` runs, interleaved round-robin across the cases.

  stream   one read of the CSR arrays (``data.sum()`` + ``indices.sum()``)
  scatter  ``np.bincount(indices, weights=data)``: one gather-free pass that
           writes the touched gradient entries (the kernel's scatter alone)
  scipy    z = X @ w + b, log-loss and residual in NumPy, then X.T @ r
  kernel   ``loss_grad_csr``: one pass, z and the scatter per row
Printed: kernel / stream (goal <= 1.5 counting the touched gradient rows,
i.e. against stream + scatter), scipy / kernel (goal >= 3).

``--fit``: an L2 logistic fit (C=1), labels from a sparse truth: scikit-learn's
lbfgs here, dmlcore's ``LogisticRegression`` on 2 workers (partitioning included),
``dml.fit`` with L-BFGS on data partitioned beforehand (timed to scikit-learn's
objective, to 1e-9 relative), dask-ml's lbfgs on the same CSR chunks (or how it fails); objectives C sum loss +
||w||^2 / 2 over C n. ``--l1``: an L1 fit (``--l1-C``: 0.15 gives ~1% non-zero at
200,000 x 200,000, 0.015 at 2,000,000 x 200,000), scikit-learn's saga (``--saga-tol``)
here against dmlcore's OWL-QN on 2 workers: the time dmlcore takes to reach
saga's final objective, against saga's.

    python benchmarks/bench_sparse.py --fit --fit-rows 2000000 --l1 --l1-C 0.015 --saga-tol 1e-3
                                                         # 2,000,000 x 200,000, 40 per row
    python benchmarks/bench_sparse.py --rows 200000 --l1 --fit-rows 200000   # README's L1 row
    python benchmarks/bench_sparse.py --rows 20000 --cols 2000 --repeat 2   # smoke
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.special import expit
from threadpoolctl import threadpool_limits

from dmlcore._ext import loss as _loss


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout
from benchmarks.runner import figure  # noqa: E402 - the runner's figure records


def make_csr(n, p, per_row, seed=0):
    rng = np.random.default_rng(seed)
    indptr = np.arange(0, n * per_row + 1, per_row, dtype=np.int32 if n * per_row < 2**31
                       else np.int64)
    indices = rng.integers(0, p, n * per_row).astype(indptr.dtype)
    data = rng.random(n * per_row)
    X = sp.csr_matrix((data, indices, indptr), shape=(n, p))
    X.sort_indices()
    return X


def scipy_logistic(X, y, coef):
    z = X @ coef[:-1] + coef[-1]
    loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
    r = expit(z) - y
    return loss, np.concatenate([X.T @ r, [r.sum()]])


def scipy_softmax(X, y, coef, k):
    p = X.shape[1]
    Z = X @ coef[:p * k].reshape(p, k) + coef[p * k:]
    Z -= Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    s = E.sum(axis=1)
    rows = np.arange(X.shape[0])
    loss = float(np.sum(np.log(s) - Z[rows, y]))
    R = E / s[:, None]
    R[rows, y] -= 1
    return loss, np.concatenate([(X.T @ R).ravel(), R.sum(axis=0)])


def medians(cases, repeat):
    times = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(v)) for name, v in times.items()}


def run(argv=None):
    """Run and print as main() does; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--cols", type=int, default=200_000)
    parser.add_argument("--nnz", type=int, default=40, help="stored entries per row")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--fit", action="store_true", help="also time full fits (see above)")
    parser.add_argument("--fit-rows", type=int, default=500_000)
    parser.add_argument("--l1", action="store_true",
                        help="also time an L1 fit against scikit-learn's saga (see above)")
    parser.add_argument("--l1-rows", type=int, default=None,
                        help="rows of the L1 fit (default: --fit-rows)")
    parser.add_argument("--l1-C", type=float, default=0.15,
                        help="C of the L1 fit (its share of non-zero coefficients is printed)")
    parser.add_argument("--saga-tol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    n, p, k = args.rows, args.cols, args.classes
    X = make_csr(n, p, args.nnz)
    rng = np.random.default_rng(1)
    y = (rng.random(n) < 0.5).astype(np.float64)
    yk = rng.integers(0, k, n)
    coef = rng.normal(size=p + 1) * 0.1
    coefk = rng.normal(size=p * k + k) * 0.1
    g, gk = np.empty(p + 1), np.empty(p * k + k)
    mb = (X.data.nbytes + X.indices.nbytes) / 1e6
    print(f"== CSR {n} x {p}, {args.nnz} per row ({X.nnz} stored, {mb:.0f} MB data+indices), "
          f"float64, 1 thread, median of {args.repeat}")
    with threadpool_limits(1):
        l_ref, g_ref = scipy_logistic(X, y, coef)           # the kernel agrees with scipy
        l_k = _loss.loss_grad_csr("logistic", X, y, coef, g)
        assert np.isclose(l_k, l_ref, rtol=1e-9) and np.allclose(g, g_ref, rtol=1e-7, atol=1e-9)
        cases = {
            "stream": lambda: (X.data.sum(), X.indices.sum()),
            "scatter": lambda: np.bincount(X.indices, weights=X.data, minlength=p),
            "kernel": lambda: _loss.loss_grad_csr("logistic", X, y, coef, g),
            "scipy": lambda: scipy_logistic(X, y, coef),
            "kernel_w": lambda: _loss.loss_grad_csr("logistic", X, y, coef, g,
                                                    sample_weight=y + 0.5),
            "softmax": lambda: _loss.loss_grad_csr("softmax", X, yk, coefk, gk, n_classes=k),
            "scipy_softmax": lambda: scipy_softmax(X, yk, coefk, k),
        }
        t = medians(cases, args.repeat)
    bound = t["stream"] + t["scatter"]
    print(f"  stream {t['stream'] * 1e3:.1f} ms, scatter {t['scatter'] * 1e3:.1f} ms")
    rows = [
        ("logistic kernel / (stream + scatter)", t["kernel"] / bound, "goal <= 1.5"),
        ("logistic kernel / stream", t["kernel"] / t["stream"], ""),
        ("scipy / logistic kernel", t["scipy"] / t["kernel"], "goal >= 3"),
        ("weighted / unweighted logistic", t["kernel_w"] / t["kernel"], "goal <= 1.1"),
        (f"scipy / softmax kernel (K={k})", t["scipy_softmax"] / t["softmax"], ""),
    ]
    for name, ratio, note in rows:
        print(f"  {name:38s} {ratio:6.2f}   {note}")
    print("  times (ms): " + ", ".join(f"{key} {v * 1e3:.1f}" for key, v in t.items()))
    peers = {"stream + scatter": "stream + scatter", "stream": "one read of the CSR arrays",
             "scipy": "scipy.sparse + NumPy", "unweighted": "unweighted kernel"}
    figures = [figure("rows", n, "rows"), figure("columns", p, "columns"),
               figure("stored per row", args.nnz, "entries")]
    figures += [figure(f"{key} time", v * 1e3, "ms") for key, v in t.items()]
    figures += [figure(name, ratio, "x", peer=next(v for k, v in peers.items() if k in name))
                for name, ratio, _ in rows]
    if args.fit:
        figures += fit_comparison(min(args.fit_rows, n), p, args.nnz)
    if args.l1:
        l1_rows = args.fit_rows if args.l1_rows is None else args.l1_rows
        figures += l1_comparison(min(l1_rows, n), p, args.nnz, args.l1_C, args.saga_tol)
    return figures


def objective(coef, intercept, X, y, C=1.0):
    """scikit-learn's L2 objective divided by C n (intercept not penalised)."""
    z = X @ coef + intercept
    return float(np.mean(np.logaddexp(0.0, z) - y * z) + coef @ coef / (2 * C * X.shape[0]))


def fit_problem(n, p, per_row):
    """The fits' CSR X and 0/1 labels drawn from a truth with 5% non-zero weights."""
    X = make_csr(n, p, per_row, seed=2)
    rng = np.random.default_rng(3)
    truth = rng.normal(size=p) * (rng.random(p) < 0.05)
    y = (X @ truth + rng.normal(scale=0.5, size=n) > np.median(X @ truth)).astype(np.int64)
    return X, y


def fit_comparison(n, p, per_row):
    import warnings

    import sklearn.linear_model as sk
    from dask.distributed import Client

    import dmlcore as dml
    from dmlcore.cluster import local_cluster

    X, y = fit_problem(n, p, per_row)
    print(f"\n== full fit, L2 logistic (C=1): {n} x {p} CSR, {per_row} per row")
    results = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sk.LogisticRegression(C=1.0, tol=1e-6, max_iter=1000).fit(X, y)
    results["scikit-learn lbfgs (1 process)"] = (time.perf_counter() - t0, objective(
        ref.coef_.ravel(), ref.intercept_[0], X, y), int(ref.n_iter_[0]))
    with local_cluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        t0 = time.perf_counter()
        ours = dml.LogisticRegression(C=1.0, tol=1e-6, max_iter=1000, client=client).fit(X, y)
        results["dmlcore (2 workers)"] = (time.perf_counter() - t0, objective(
            ours.coef_.ravel(), ours.intercept_[0], X, y), int(ours.n_iter_[0]))
        results["dmlcore, data partitioned before (2 workers)"] = _fit_partitioned(
            dml, client, X, y, base_objective=results["scikit-learn lbfgs (1 process)"][1])
        try:
            import dask.array as da
            from dask_ml.linear_model import LogisticRegression as DaskLR

            Xd = da.from_array(X, chunks=(-(-n // 16), p), asarray=False)
            t0 = time.perf_counter()
            peer = DaskLR(C=1.0, solver="lbfgs", max_iter=100).fit(Xd, da.from_array(y, -(-n // 16)))
            results["dask-ml lbfgs (2 workers)"] = (time.perf_counter() - t0, objective(
                np.asarray(peer.coef_).ravel(), float(np.ravel(peer.intercept_)[0]), X, y), -1)
        except Exception as exc:  # noqa: BLE001 — the peer's failure is a result
            print(f"  dask-ml lbfgs on CSR chunks failed: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200]}")
    base = results["scikit-learn lbfgs (1 process)"]
    figures = [figure("fit: rows", n, "rows")]
    for name, (seconds, f, iters) in results.items():
        print(f"  {name:32s} {seconds:8.2f} s  objective {f:.10f} ({f - base[1]:+.1e})  "
              f"iterations {iters}  sklearn time / this {base[0] / seconds:.3g}x")
        figures += [figure(f"fit: {name}: time", seconds, "s"),
                    figure(f"fit: {name}: objective", f, "objective"),
                    figure(f"fit: {name}: objective - scikit-learn's", f - base[1], "objective")]
        if iters >= 0:
            figures.append(figure(f"fit: {name}: iterations", iters, "iterations"))
        if name != "scikit-learn lbfgs (1 process)":
            figures.append(figure(f"fit: scikit-learn time / {name}", base[0] / seconds, "x",
                                peer="scikit-learn lbfgs (1 process)"))
    return figures


def _fit_partitioned(dml, client, X, y, base_objective):
    """dml.fit with L-BFGS on data partitioned beforehand (partitioning not
    timed): (seconds to reach ``base_objective``, or of the whole fit if it
    never does; final objective; iterations). The parameters of each
    iteration are kept and scored after the fit, so scoring costs no fit time."""
    n = X.shape[0]
    data = dml.partition(X, y.astype(np.float64), client=client)
    t0 = time.perf_counter()
    fit, trace = _traced_fit(dml, client, data,
                             dml.optim.LBFGS(max_iter=1000, tol=1e-6, weight_decay=1.0 / n),
                             1000, t0, lambda rec, params: params.copy())
    total = time.perf_counter() - t0
    scores = [objective(w[:-1], w[-1], X, y) for _, w in trace]
    # "reached": within 1e-9 relative (both solvers stop at a gradient tolerance)
    reached = next((i for i, f in enumerate(scores)
                    if f - base_objective <= 1e-9 * abs(base_objective)), None)
    print(f"  dmlcore on partitioned data: "
          + (f"scikit-learn's objective at iteration {reached + 1} of {fit.steps}"
             if reached is not None else f"not at scikit-learn's objective in {fit.steps}"))
    return (total if reached is None else trace[reached][0]), scores[-1], fit.steps


def _traced_fit(dml, client, data, solver, steps, t0, keep):
    """``dml.fit`` of a Logistic model from zero with the batch ``solver``:
    ``(fit, [(seconds since t0, keep(record, params)) per iteration])``."""
    model = dml.models.Logistic(data.n_features)
    trace = []
    fit = dml.fit(model, data, dml.SyncSGD(batch_size=None), solver, steps=steps, client=client,
                  init_params=np.zeros(model.n_params), progress=False,
                  callbacks=[lambda step, rec, params: trace.append(
                      (time.perf_counter() - t0, keep(rec, params)))])
    return fit, trace


def l1_objective(coef, intercept, X, y, C):
    """scikit-learn's L1 objective C sum loss + ||w||_1, divided by C n."""
    z = X @ coef + intercept
    return float(np.mean(np.logaddexp(0.0, z) - y * z) + np.abs(coef).sum() / (C * X.shape[0]))


def l1_comparison(n, p, per_row, C, saga_tol):
    """Time for dmlcore's OWL-QN (2 workers) to reach the objective scikit-learn's
    saga ends at, against saga's own time; both from zero, partitioning included."""
    import warnings

    import sklearn.linear_model as sk
    from dask.distributed import Client

    import dmlcore as dml
    from dmlcore.cluster import local_cluster

    X, y = fit_problem(n, p, per_row)
    print(f"\n== L1 logistic (C={C}): {n} x {p} CSR, {per_row} per row")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sk.LogisticRegression(C=C, l1_ratio=1.0, solver="saga", tol=saga_tol,
                                    max_iter=1000).fit(X, y)
    saga_s = time.perf_counter() - t0
    f_saga = l1_objective(ref.coef_.ravel(), ref.intercept_[0], X, y, C)
    print(f"  scikit-learn saga (tol {saga_tol:g}): {saga_s:.2f} s, {int(ref.n_iter_[0])} "
          f"epochs, objective {f_saga:.10f}, non-zero {np.mean(ref.coef_ != 0):.2%}")
    l1 = 1.0 / (C * n)
    with local_cluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        t0 = time.perf_counter()
        data = dml.partition(X, y.astype(np.float64), n_partitions=16, client=client)
        fit, trace = _traced_fit(   # the objective after each iteration
            dml, client, data, dml.optim.OWLQN(l1=l1, max_iter=500, tol=1e-8), 500, t0,
            lambda rec, params: rec["loss"] + l1 * np.abs(params[:-1]).sum())
        total = time.perf_counter() - t0
    reached = next((t for t, f in trace if f <= f_saga), None)
    coef = fit.params[:-1]
    f_ours = l1_objective(coef, fit.params[-1], X, y, C)
    print(f"  dmlcore OWL-QN (2 workers, partitioning included): {total:.2f} s, "
          f"{fit.steps} iterations, objective {f_ours:.10f} ({f_ours - f_saga:+.1e}), "
          f"non-zero {np.mean(coef != 0):.2%}")
    figures = [figure("l1: rows", n, "rows"), figure("l1: C", C, "C"),
               figure("l1: saga tol", saga_tol, "tol"),
               figure("l1: saga time", saga_s, "s"), figure("l1: saga epochs", ref.n_iter_[0], "epochs"),
               figure("l1: saga objective", f_saga, "objective"),
               figure("l1: saga non-zero share", np.mean(ref.coef_ != 0), "share"),
               figure("l1: dmlcore total time", total, "s"),
               figure("l1: dmlcore iterations", fit.steps, "iterations"),
               figure("l1: dmlcore objective - saga's", f_ours - f_saga, "objective"),
               figure("l1: dmlcore non-zero share", np.mean(coef != 0), "share")]
    if reached is None:
        print("  dmlcore did not reach saga's objective")
    else:
        print(f"  time to saga's objective: dmlcore {reached:.2f} s vs saga {saga_s:.2f} s: "
              f"{saga_s / reached:.3g}x faster")
        figures += [figure("l1: dmlcore time to saga's objective", reached, "s"),
                    figure("l1: saga time / dmlcore time to saga's objective", saga_s / reached,
                         "x", peer="scikit-learn saga")]
    return figures


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
