"""Benchmark the compiled kernels against plain NumPy, printing ratios.

    python benchmarks/bench_kernels.py                 # 2,000,000 x 100 float64 (1.6 GB)
    python benchmarks/bench_kernels.py --rows 20000    # smoke size

Everything runs on ONE thread (threadpoolctl limits BLAS), as a kernel does on
a Dask worker.  Each figure is the median of --repeat runs, interleaved
round-robin across the cases.

Loss section (dmlcore._ext.loss):
  stream      np.add.reduce(X, axis=0): the time to read X once from memory
  numpy       the two-pass NumPy gradient: z = X @ w + b, loss and residual,
              then X.T @ r (softmax: X @ W, log-sum-exp, X.T @ R)
  kernel      the fused one-pass kernel
  weighted    the same kernel with ``sample_weight`` (goal: <= 1.1x unweighted)
Printed ratios: kernel / stream (lower is better, 1.0 is the memory bound),
numpy / kernel (speed-up) and float64 / float32 for the logistic kernel.

If benchmarks/bench_mlp_optim.py exists, its ``main(argv)`` runs afterwards
with ``--clock`` passed on, and ``--small`` when --rows is below 1,000,000.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import expit, logsumexp
from threadpoolctl import threadpool_limits

from dmlcore._ext import loss as _loss

CLOCK = time.perf_counter
STREAM = "np.add.reduce (one read of X)"
NUMPY = "NumPy two-pass gradient"


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout
from benchmarks.runner import figure  # noqa: E402 - the runner's figure records


def interleaved_medians(cases, repeat):
    """Median wall time of each case; the repeats are interleaved (round-robin)
    so that a change in machine load affects every case alike."""
    times = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            t0 = CLOCK()
            fn()
            times[name].append(CLOCK() - t0)
    return {name: float(np.median(v)) for name, v in times.items()}


def numpy_logistic(X, y, coef):
    w, b = coef[:-1], coef[-1]
    z = X @ w + b
    loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
    r = expit(z) - y
    return loss, np.concatenate([X.T @ r, [r.sum()]])


def numpy_squared(X, y, coef):
    r = X @ coef[:-1] + coef[-1] - y
    return 0.5 * float(r @ r), np.concatenate([X.T @ r, [r.sum()]])


def numpy_softmax(X, y, coef, k):
    p = X.shape[1]
    Z = X @ coef[:p * k].reshape(p, k) + coef[p * k:]
    lse = logsumexp(Z, axis=1)
    rows = np.arange(X.shape[0])
    loss = float(np.sum(lse - Z[rows, y]))
    Z -= lse[:, None]
    np.exp(Z, out=Z)
    Z[rows, y] -= 1.0
    return loss, np.concatenate([(X.T @ Z).ravel(), Z.sum(axis=0)])


def bench_loss(args):
    n, p, k, rep = args.rows, args.cols, args.classes, args.repeat
    rng = np.random.default_rng(0)
    print(f"== loss kernels: {n} x {p}, float64 {n * p * 8 / 1e9:.2f} GB, "
          f"1 thread, median of {rep} ({args.clock} clock); kernel path: "
          f"{_loss.simd_info()['active']}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    X = rng.standard_normal((n, p))
    X32 = X.astype(np.float32)
    yb = (rng.random(n) < 0.5).astype(np.float64)
    yb32 = yb.astype(np.float32)
    yr = rng.standard_normal(n)
    yk = rng.integers(0, k, n)
    coef = rng.standard_normal(p + 1) * 0.1
    coef32 = coef.astype(np.float32)
    coefk = rng.standard_normal(p * k + k) * 0.1
    g = np.empty(p + 1)
    g32 = np.empty(p + 1, np.float32)
    gk = np.empty(p * k + k)
    sw = rng.uniform(0.0, 2.0, n)

    # correctness guard: the kernel and NumPy agree on the benchmark data
    l_ref, g_ref = numpy_logistic(X, yb, coef)
    l_k = _loss.loss_grad_logistic(X, yb, coef, g)
    assert np.isclose(l_k, l_ref, rtol=1e-9) and np.allclose(g, g_ref, rtol=1e-8, atol=1e-6)

    cases = {
        "stream": lambda: np.add.reduce(X, axis=0),
        "stream32": lambda: np.add.reduce(X32, axis=0),
        "logistic": lambda: _loss.loss_grad_logistic(X, yb, coef, g),
        "logistic32": lambda: _loss.loss_grad_logistic(X32, yb32, coef32, g32),
        "numpy_logistic": lambda: numpy_logistic(X, yb, coef),
        "squared": lambda: _loss.loss_grad_squared(X, yr, coef, g),
        "numpy_squared": lambda: numpy_squared(X, yr, coef),
        "softmax": lambda: _loss.loss_grad_softmax(X, yk, coefk, gk, k),
        "numpy_softmax": lambda: numpy_softmax(X, yk, coefk, k),
        "logistic_w": lambda: _loss.loss_grad_logistic(X, yb, coef, g, sample_weight=sw),
        "squared_w": lambda: _loss.loss_grad_squared(X, yr, coef, g, sample_weight=sw),
        "softmax_w": lambda: _loss.loss_grad_softmax(X, yk, coefk, gk, k, sample_weight=sw),
    }
    t = interleaved_medians(cases, rep)
    del X32

    s = t["stream"]
    print(f"stream (np.add.reduce) {s * 1e3:9.1f} ms   {n * p * 8 / s / 1e9:.1f} GB/s")
    rows = [
        ("logistic f64 / stream", t["logistic"] / s, "target <= 1.5 (stretch 1.3)", STREAM),
        ("numpy / logistic f64", t["numpy_logistic"] / t["logistic"], "target >= 1.6", NUMPY),
        ("logistic f64 / f32", t["logistic"] / t["logistic32"], "target >= 1.7", "float32"),
        ("logistic f32 / stream f32", t["logistic32"] / t["stream32"], "", STREAM),
        ("squared f64 / stream", t["squared"] / s, "", STREAM),
        ("numpy / squared f64", t["numpy_squared"] / t["squared"], "", NUMPY),
        (f"softmax K={k} f64 / stream", t["softmax"] / s, "", STREAM),
        (f"numpy / softmax K={k} f64", t["numpy_softmax"] / t["softmax"], "target >= 2", NUMPY),
        ("weighted / unweighted logistic", t["logistic_w"] / t["logistic"], "target <= 1.1",
         "unweighted"),
        ("weighted / unweighted squared", t["squared_w"] / t["squared"], "target <= 1.1",
         "unweighted"),
        ("weighted / unweighted softmax", t["softmax_w"] / t["softmax"], "target <= 1.1",
         "unweighted"),
    ]
    for name, ratio, note, _ in rows:
        print(f"  {name:28s} {ratio:6.2f}   {note}")
    print("  times (ms): " + ", ".join(f"{key} {v * 1e3:.1f}" for key, v in t.items()))
    figures = [figure("rows", n, "rows"), figure("columns", p, "columns"),
               figure("stream bandwidth", n * p * 8 / s / 1e9, "GB/s")]
    figures += [figure(f"{key} time", v * 1e3, "ms") for key, v in t.items()]
    figures += [figure(name, ratio, "x", peer=peer) for name, ratio, _, peer in rows]
    return figures


def run(argv=None):
    """Run as main() does; return the loss section's figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--cols", type=int, default=100)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="wall-clock time (default) or the thread's CPU time "
                             "(steadier on a loaded machine)")
    parser.add_argument("--loss-only", action="store_true",
                        help="skip benchmarks/bench_mlp_optim.py")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.thread_time
    with threadpool_limits(1):
        figures = bench_loss(args)
    other = Path(__file__).with_name("bench_mlp_optim.py")
    if other.exists() and not args.loss_only:
        spec = importlib.util.spec_from_file_location("bench_mlp_optim", other)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        forwarded = ["--clock", args.clock]
        if args.rows < 1_000_000:                   # a smoke run: keep the MLP part small too
            forwarded.append("--small")
        module.main(forwarded)
    return figures


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    sys.exit(main())
