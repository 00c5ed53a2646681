"""MLP forward+backward and optimizer steps: dmlcore's kernels vs NumPy and PyTorch.

One thread everywhere (threadpoolctl for the BLAS libraries, torch.set_num_threads(1)),
as on a Dask worker where the cluster parallelises across partitions.

    python benchmarks/bench_mlp_optim.py            # full run
    python benchmarks/bench_mlp_optim.py --small    # smoke run (seconds)

Sections:
1. MLP 784-256-10 (relu, softmax cross-entropy) loss + gradient on batches of
   64 and 256 rows, float32 and float64: dmlcore vs the same computation in
   NumPy (matmul on NumPy's own OpenBLAS; dmlcore calls SciPy's OpenBLAS build);
   GFLOP/s; PyTorch fwd+bwd, and a full SGD-momentum step for scale.
2. Optimizer step, float32 SGD with momentum 0.9 on the MLP's ~200k
   parameters, at step 100 and after 5,000 steps. Half of the gradient entries
   are 0 (as for the weights of always-zero input pixels), so their momentum
   decays geometrically into the subnormal range after ~800 steps: a kernel
   without flush-to-zero slows down there.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmlcore._ext import optim as ext_optim  # noqa: E402
from dmlcore.models.mlp import MLP  # noqa: E402

try:
    import torch
except ImportError:      # PyTorch is optional (extra "bench")
    torch = None


# Every kernel here runs on the calling thread (BLAS and torch limited to one
# thread), so its cost is the CPU time of that thread. That is the clock used
# (``--clock wall`` for wall time): on a machine shared with other jobs, wall
# time also counts the waits for a free core.
CLOCK = time.thread_time


def per_call_ms(fns, number, repeat):
    """{name: fn} -> {name: ms per call}: the best of ``repeat`` timings of
    ``number`` calls, the candidates interleaved so that a busy machine slows
    them alike (the best is the least disturbed timing)."""
    for fn in fns.values():
        fn()
    best = {name: np.inf for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = CLOCK()
            for _ in range(number):
                fn()
            best[name] = min(best[name], (CLOCK() - t0) / number)
    return {name: 1e3 * t for name, t in best.items()}


def mlp_flops(sizes, n):
    """Multiply-adds x2 of forward, weight gradients and delta propagation
    (no delta into X)."""
    fwd = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    prop = sum(a * b for a, b in zip(sizes[1:-1], sizes[2:]))
    return 2.0 * n * (2 * fwd + prop)


class NumpyMLP:
    """The same two-layer computation written in NumPy, with preallocated
    buffers and the gradient written into views of one flat vector."""

    def __init__(self, model, n, dtype):
        self.model = model
        self.z1 = np.empty((n, model.sizes[1]), dtype)
        self.z2 = np.empty((n, model.sizes[2]), dtype)
        self.d1 = np.empty((n, model.sizes[1]), dtype)

    def loss_grad(self, params, X, y, grad):
        v, g = self.model.views(params), self.model.views(grad)
        W1, b1, W2, b2 = v["layer0"]["W"], v["layer0"]["b"], v["layer1"]["W"], v["layer1"]["b"]
        a1 = np.matmul(X, W1, out=self.z1)
        a1 += b1
        np.maximum(a1, 0, out=a1)
        z = np.matmul(a1, W2, out=self.z2)
        z += b2
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        s = z.sum(axis=1)
        rows = np.arange(X.shape[0])
        loss = float(np.sum(np.log(s)) - np.sum(np.log(z[rows, y])))
        z /= s[:, None]
        z[rows, y] -= 1
        np.matmul(a1.T, z, out=g["layer1"]["W"])
        z.sum(axis=0, out=g["layer1"]["b"])
        d1 = np.matmul(z, W2.T, out=self.d1)
        d1 *= a1 > 0
        np.matmul(X.T, d1, out=g["layer0"]["W"])
        d1.sum(axis=0, out=g["layer0"]["b"])
        return loss


def torch_mlp(model, params):
    net = torch.nn.Sequential(torch.nn.Linear(model.sizes[0], model.sizes[1]),
                              torch.nn.ReLU(),
                              torch.nn.Linear(model.sizes[1], model.sizes[2]))
    v = model.views(params.astype(np.float32))
    with torch.no_grad():
        for i, name in ((0, "layer0"), (2, "layer1")):
            net[i].weight.copy_(torch.from_numpy(v[name]["W"].T.copy()))
            net[i].bias.copy_(torch.from_numpy(v[name]["b"].copy()))
    return net


def bench_mlp(args):
    sizes = [784, 256, 10]
    model = MLP(sizes)
    rng = np.random.default_rng(0)
    print(f"\n== MLP {'-'.join(map(str, sizes))} relu/softmax: loss + gradient (SUM over rows), 1 thread")
    print(f"{'dtype':8s} {'rows':>5s} {'dmlcore ms':>11s} {'GFLOP/s':>8s} {'numpy ms':>9s} "
          f"{'GFLOP/s':>8s} {'numpy/dml':>9s} {'torch ms':>9s} {'torch/dml':>9s}")
    number, repeat = (2, 2) if args.small else (20, 15)
    results = {}
    for dtype in (np.float32, np.float64):
        params = model.init(0, dtype=dtype)
        for n in (64, 256):
            X = rng.random((n, sizes[0])).astype(dtype)
            y = rng.integers(0, sizes[-1], n)
            grad, grad_np = np.empty(model.n_params, dtype), np.empty(model.n_params, dtype)
            npm = NumpyMLP(model, n, dtype)
            l_ext = model.loss_grad(params, X, y, grad)
            l_np = npm.loss_grad(params, X, y, grad_np)
            rtol = 1e-4 if dtype == np.float32 else 1e-10
            assert abs(l_ext - l_np) <= rtol * abs(l_np), (l_ext, l_np)
            assert np.allclose(grad, grad_np, rtol=rtol * 10, atol=rtol), "numpy and dmlcore disagree"
            fns = {"dml": lambda: model.loss_grad(params, X, y, grad),
                   "numpy": lambda: npm.loss_grad(params, X, y, grad_np)}
            flops = mlp_flops(sizes, n)
            if torch is not None and dtype == np.float32:
                net = torch_mlp(model, params)
                Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
                lossf = torch.nn.CrossEntropyLoss(reduction="sum")

                def torch_fwd_bwd():
                    net.zero_grad(set_to_none=False)
                    lossf(net(Xt), yt).backward()
                fns["torch"] = torch_fwd_bwd
                l_torch = float(lossf(net(Xt), yt).detach())
                assert abs(l_torch - l_ext) <= 1e-4 * abs(l_ext), (l_torch, l_ext)
                torch_fwd_bwd()
                assert np.allclose(net[0].weight.grad.numpy().T, model.views(grad)["layer0"]["W"],
                                   rtol=1e-3, atol=1e-3), "torch and dmlcore disagree"
            t = per_call_ms(fns, number, repeat)
            t_ext, t_np, t_torch = t["dml"], t["numpy"], t.get("torch", float("nan"))
            results[(np.dtype(dtype).name, n)] = (t_ext, t_np, t_torch)
            print(f"{np.dtype(dtype).name:8s} {n:5d} {t_ext:11.3f} {flops / t_ext / 1e6:8.1f} "
                  f"{t_np:9.3f} {flops / t_np / 1e6:8.1f} {t_np / t_ext:9.2f} "
                  f"{t_torch:9.3f} {t_torch / t_ext:9.2f}")

    # a full training step: loss + gradient, then SGD with momentum, float32
    print("\n== full SGD-momentum step (loss+grad+update), float32")
    params = model.init(0, dtype=np.float32)
    vel = np.zeros_like(params)
    mask = model.weight_mask()
    for n in (64, 256):
        X = rng.random((n, sizes[0])).astype(np.float32)
        y = rng.integers(0, sizes[-1], n)
        grad = np.empty_like(params)

        def dml_step():
            model.loss_grad(params, X, y, grad)
            ext_optim.sgd_update(params, grad, vel, 1e-4 / n, 0.9, False, 1e-4, mask)
        fns = {"dml": dml_step}
        if torch is not None:
            net = torch_mlp(model, params)
            opt = torch.optim.SGD(net.parameters(), lr=1e-4 / n, momentum=0.9, weight_decay=1e-4)
            Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
            lossf = torch.nn.CrossEntropyLoss(reduction="sum")

            def torch_step():
                opt.zero_grad(set_to_none=False)
                lossf(net(Xt), yt).backward()
                opt.step()
            fns["torch"] = torch_step
        t = per_call_ms(fns, number, repeat)
        line = f"rows {n:4d}: dmlcore {t['dml']:.3f} ms"
        if "torch" in t:
            line += f", torch {t['torch']:.3f} ms, torch/dml {t['torch'] / t['dml']:.2f}"
        print(line)
        results[("step", n)] = (t["dml"], t.get("torch"))
    return results


def bench_optim(args):
    n = MLP([784, 256, 10]).n_params
    steps, window = (300, 50) if args.small else (5000, 100)
    print(f"\n== optimizer step: float32 SGD momentum=0.9, {n} params, half the gradient "
          f"entries 0 (their momentum decays into subnormals after ~800 steps)")
    rng = np.random.default_rng(1)
    g0 = (rng.normal(size=n) * 1e-3).astype(np.float32)
    g0[: n // 2] = 0          # dead inputs: always-zero gradient entries
    v0 = (rng.normal(size=n) * 1e-3).astype(np.float32)
    p0 = rng.normal(size=n).astype(np.float32)
    lr, mu = np.float32(1e-3), np.float32(0.9)

    def run(step_fn, state):
        """Times of the steps [100, 100+window) and [steps-window, steps)."""
        times = np.empty(steps)
        for t in range(steps):
            t0 = CLOCK()
            step_fn(state)
            times[t] = CLOCK() - t0
        # the 10th percentile of each window: robust to a busy machine's
        # preemptions, while a subnormal slowdown hits every step
        return (1e3 * float(np.percentile(times[100:100 + window], 10)),
                1e3 * float(np.percentile(times[steps - window:], 10)))

    def ext_step(s):
        ext_optim.sgd_update(s["p"], g0, s["v"], lr, mu)

    def numpy_step(s):
        v = s["v"]
        v *= mu
        v += g0
        s["p"] -= lr * v

    rows = []
    state = {"p": p0.copy(), "v": v0.copy()}
    early, late = run(ext_step, state)
    sub = int(np.count_nonzero((state["v"] != 0) & (np.abs(state["v"]) < np.finfo(np.float32).tiny)))
    rows.append(("dmlcore (FTZ/DAZ in kernel)", early, late, sub))
    state = {"p": p0.copy(), "v": v0.copy()}
    early, late = run(numpy_step, state)
    sub = int(np.count_nonzero((state["v"] != 0) & (np.abs(state["v"]) < np.finfo(np.float32).tiny)))
    rows.append(("numpy (in place)", early, late, sub))
    if torch is not None:
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            try:
                p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
                opt = torch.optim.SGD([p], lr=float(lr), momentum=float(mu))
                p.grad = torch.from_numpy(g0.copy())
                opt.step()
                with torch.no_grad():
                    opt.state[p]["momentum_buffer"].copy_(torch.from_numpy(v0))
                early, late = run(lambda s: opt.step(), None)
                buf = opt.state[p]["momentum_buffer"].numpy()
                sub = int(np.count_nonzero((buf != 0) & (np.abs(buf) < np.finfo(np.float32).tiny)))
            finally:
                torch.set_flush_denormal(False)
            rows.append((f"torch SGD (flush_denormal={flush})", early, late, sub))
    print(f"{'implementation':36s} {'step 100 ms':>11s} {f'step {steps} ms':>13s} "
          f"{'late/early':>10s} {'subnormals':>10s} {'vs dmlcore':>10s}")
    ref_late = rows[0][2]
    for name, early, late, sub in rows:
        print(f"{name:36s} {early:11.4f} {late:13.4f} {late / early:10.2f} {sub:10d} "
              f"{late / ref_late:10.2f}")
    return rows


def figures(out):
    """main()'s results as the runner's figures (name, value, unit; ratios name the peer)."""
    torch_name = f"PyTorch {torch.__version__} (1 thread)" if torch is not None else None
    figs = []

    def fig(name, value, unit, peer=None):
        figs.append({"name": name, "value": float(value), "unit": unit,
                     **({"peer": peer} if peer else {})})

    for key, value in out["mlp"].items():
        if key[0] == "step":
            n, (t_dml, t_torch) = key[1], value
            fig(f"SGD-momentum step, {n} rows float32: dmlcore", t_dml, "ms")
            if t_torch is not None:
                fig(f"SGD-momentum step, {n} rows float32: torch", t_torch, "ms")
                fig(f"SGD-momentum step, {n} rows float32: torch / dmlcore", t_torch / t_dml,
                    "x", torch_name)
            continue
        (dtype, n), (t_ext, t_np, t_torch) = key, value
        fig(f"MLP fwd+bwd {dtype} {n} rows: dmlcore", t_ext, "ms")
        fig(f"MLP fwd+bwd {dtype} {n} rows: dmlcore GFLOP/s",
            mlp_flops([784, 256, 10], n) / t_ext / 1e6, "GFLOP/s")
        fig(f"MLP fwd+bwd {dtype} {n} rows: numpy", t_np, "ms")
        fig(f"MLP fwd+bwd {dtype} {n} rows: numpy / dmlcore", t_np / t_ext, "x", "NumPy")
        if np.isfinite(t_torch):
            fig(f"MLP fwd+bwd {dtype} {n} rows: torch", t_torch, "ms")
            fig(f"MLP fwd+bwd {dtype} {n} rows: torch / dmlcore", t_torch / t_ext, "x",
                torch_name)
    ref_late = out["optim"][0][2]
    for name, early, late, sub in out["optim"]:
        fig(f"optimizer step, early: {name}", early, "ms")
        fig(f"optimizer step, late: {name}", late, "ms")
        fig(f"optimizer step, subnormals: {name}", sub, "entries")
        if name != out["optim"][0][0]:
            fig(f"optimizer step, late: {name} / dmlcore", late / ref_late, "x", name)
    fig("optimizer steps", out["steps"], "steps")
    return figs


def run(argv=None):
    return figures(main(argv))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="smoke run: few repeats")
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread",
                        help="thread CPU time (default) or wall-clock time")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "thread" else time.perf_counter
    if torch is not None:
        torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        from threadpoolctl import threadpool_info
        blas = ", ".join(f"{i['prefix']} {i['version']} ({i['architecture']}, {i['num_threads']} thr)"
                         for i in threadpool_info() if i["user_api"] == "blas")
        print(f"BLAS: {blas}; torch: {torch.__version__ if torch is not None else 'not installed'}; "
              f"flush-to-zero: {ext_optim.FLUSH_TO_ZERO}; clock: {args.clock} "
              f"({'CPU time of the calling thread' if args.clock == 'thread' else 'wall'}); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        # NumPy's matmul runs on NumPy's own OpenBLAS, whose packing buffer has the
        # same non-resident-page slowdown that dmlcore's kernels avoid (see
        # src_ext/mlp.pyx): one 512^3 product in each dtype gives the NumPy peer
        # the same fast state (without it, NumPy float32 ran ~2.7x slower here).
        for dtype in (np.float32, np.float64):
            square = np.ones((512, 512), dtype)
            square @ square
        mlp = bench_mlp(args)
        opt = bench_optim(args)
    return {"mlp": mlp, "optim": opt, "steps": 300 if args.small else 5000}


if __name__ == "__main__":
    main()
