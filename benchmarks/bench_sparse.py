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

    python benchmarks/bench_sparse.py                    # 2,000,000 x 200,000, 40 per row
    python benchmarks/bench_sparse.py --rows 20000 --cols 2000 --repeat 2   # smoke
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
from scipy.special import expit
from threadpoolctl import threadpool_limits

from dmlcore._ext import loss as _loss


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--cols", type=int, default=200_000)
    parser.add_argument("--nnz", type=int, default=40, help="stored entries per row")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
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
    return t


if __name__ == "__main__":
    main()
