"""The Fashion-MNIST MLP (784-256-10, relu) with one recipe: dmlcore SyncSGD vs PyTorch and DDP.

Recipe for all: SGD lr 0.1, momentum 0.9, 128 rows per step (mean gradient),
``--epochs`` epochs from the same initial weights (dmlcore's ``MLP.init(0)``),
test accuracy evaluated at the end of every epoch (the clock runs through
the evaluations, for every peer alike).
  * PyTorch in this process, ``torch.set_num_threads(--threads)`` (2);
  * PyTorch ``DistributedDataParallel`` over gloo, n processes of 1 thread,
    128/n rows each per step (each process its own shard of every epoch);
  * dmlcore ``SyncSGD(batch_size=128/n)`` on ``LocalCluster(n_workers=n,
    threads_per_worker=1)``, n iid partitions (partitioning outside the clock).
n runs over ``--workers`` (default 2; DDP for n >= 2). Printed: seconds per
epoch (median step time x steps per epoch), the time to ``--target`` test
accuracy (0.88) and the final accuracy of each, and the ratios.

    python benchmarks/bench_torch.py                 # full data, 10 epochs
    python benchmarks/bench_torch.py --small         # 6,000 / 1,000 rows, 2 epochs, target 0.7
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

SIZES = [784, 256, 10]
ROWS_PER_STEP = 128


from benchmarks.runner import figure  # noqa: E402 - the runner's figure records


def load(small):
    import dmlcore as dml

    X, y = dml.datasets.fashion_mnist("train")
    Xt, yt = dml.datasets.fashion_mnist("test")
    if small:
        X, y, Xt, yt = X[:6000], y[:6000], Xt[:1000], yt[:1000]
    return X, y.astype(np.int64), Xt, yt.astype(np.int64)


def torch_net(params):
    """A torch Sequential holding dmlcore's initial weights (W is stored in x out)."""
    import torch

    from dmlcore.models import MLP

    net = torch.nn.Sequential(torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.ReLU(),
                              torch.nn.Linear(SIZES[1], SIZES[2]))
    v = MLP(SIZES).views(params.astype(np.float32))
    with torch.no_grad():
        for i, name in ((0, "layer0"), (2, "layer1")):
            net[i].weight.copy_(torch.from_numpy(v[name]["W"].T.copy()))
            net[i].bias.copy_(torch.from_numpy(v[name]["b"].copy()))
    return net


def _accuracy(net, Xt, yt):
    import torch

    with torch.no_grad():
        return float((net(Xt).argmax(1) == yt).float().mean())


def train_torch(net, X, y, Xt, yt, epochs, batch, lr, momentum, seed, rank=0, world=1,
                step_hook=None):
    """Train ``net``; (step times, [(seconds since start, accuracy) per epoch])."""
    import torch

    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    lossf = torch.nn.CrossEntropyLoss()
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    Xt, yt = torch.from_numpy(Xt), torch.from_numpy(yt)
    n = X.shape[0]
    steps = -(-n // (batch * world))
    step_times, curve = [], []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng((seed, epoch)).permutation(n))
        mine = order[rank::world]                      # this process's shard of the epoch
        for s in range(steps):
            idx = mine[s * batch:(s + 1) * batch]
            if len(idx) == 0:
                idx = mine[:batch]
            ts = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            lossf(net(X[idx]), y[idx]).backward()
            opt.step()
            step_times.append(time.perf_counter() - ts)
        acc = _accuracy(net, Xt, yt) if rank == 0 else float("nan")
        curve.append((time.perf_counter() - t0, acc))
        if step_hook is not None:
            step_hook()
    return step_times, curve, steps


def _ddp_worker(rank, world, port, small, epochs, lr, momentum, out):
    import torch
    import torch.distributed as dist

    import dmlcore as dml

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=120))
    try:
        X, y, Xt, yt = load(small)
        net = torch_net(dml.models.MLP(SIZES).init(0, dtype=np.float32))
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        dist.barrier()
        step_times, curve, steps = train_torch(ddp, X, y, Xt, yt, epochs,
                                               ROWS_PER_STEP // world, lr, momentum, seed=0,
                                               rank=rank, world=world,
                                               step_hook=dist.barrier)
        if rank == 0:
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"step_times": step_times, "curve": curve, "steps": steps}, f)
            os.replace(tmp, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(world, small, epochs, lr, momentum, timeout):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        out = str(Path(tmp) / "rank0.json")
        ctx = mp.start_processes(_ddp_worker, args=(world, _free_port(), small, epochs, lr,
                                                    momentum, out),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"DDP on {world} processes ran past {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        r = json.loads(Path(out).read_text())
    return r["step_times"], [tuple(c) for c in r["curve"]], r["steps"]


def run_dmlcore(n_workers, X, y, Xt, yt, epochs, lr, momentum):
    from distributed import Client

    import dmlcore as dml
    from dmlcore.cluster import local_cluster

    model = dml.models.MLP(SIZES, activation="relu")
    with local_cluster(n_workers=n_workers, threads_per_worker=1,
                       dashboard_address=":0") as cluster, Client(cluster) as client:
        data = dml.partition(X, y, n_partitions=n_workers, scheme="iid", seed=0, client=client)
        strategy = dml.SyncSGD(batch_size=ROWS_PER_STEP // n_workers)
        steps = strategy.steps_per_epoch(data)
        # warm-up: imports, worker code, the data plane (not timed)
        dml.fit(model, data, strategy, dml.optim.SGD(lr=lr, momentum=momentum), steps=5,
                client=client, progress=False)
        res = dml.fit(model, data, strategy, dml.optim.SGD(lr=lr, momentum=momentum),
                      epochs=epochs, eval_data=(Xt, yt), eval_every=steps,
                      init_params=model.init(0, dtype=np.float32), client=client,
                      progress=False)
    h = res.history
    wall = h["wall_time"].values
    acc = h["eval_accuracy"].values
    curve = [(float(wall[i]), float(acc[i])) for i in np.flatnonzero(np.isfinite(acc))]
    step_times = np.diff(wall)
    return step_times, curve, steps


def summary(step_times, curve, steps, target):
    """(seconds per epoch, seconds to target or None, final accuracy)."""
    per_epoch = float(np.median(step_times)) * steps
    hit = next((t for t, a in curve if a >= target), None)
    return per_epoch, hit, curve[-1][1]


def run(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="6,000 / 1,000 rows, 2 epochs, target 0.7 (smoke run)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (10; --small: 2)")
    parser.add_argument("--target", type=float, default=None, help="test accuracy (0.88)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads, one process")
    parser.add_argument("--workers", default="2",
                        help="comma-separated worker / process counts (e.g. 1,2,4)")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a DDP run may take before it is ended")
    args = parser.parse_args(argv)
    epochs = args.epochs or (2 if args.small else 10)
    target = args.target or (0.7 if args.small else 0.88)
    counts = [int(w) for w in args.workers.split(",") if w.strip()]

    import torch

    import dmlcore as dml

    X, y, Xt, yt = load(args.small)
    print(f"Fashion-MNIST {X.shape[0]} train / {Xt.shape[0]} test rows; MLP {SIZES}, SGD lr "
          f"{args.lr} momentum {args.momentum}, {ROWS_PER_STEP} rows per step, {epochs} "
          f"epochs, target {target}; torch {torch.__version__}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    rows = {}
    torch.set_num_threads(args.threads)
    net = torch_net(dml.models.MLP(SIZES).init(0, dtype=np.float32))
    single = f"PyTorch 1 process, {args.threads} threads"
    rows[single] = summary(*train_torch(net, X, y, Xt, yt, epochs, ROWS_PER_STEP, args.lr,
                                        args.momentum, seed=0), target)
    torch.set_num_threads(1)
    for n in counts:
        if n >= 2 and not args.skip_ddp:
            rows[f"PyTorch DDP gloo, {n} processes"] = summary(
                *run_ddp(n, args.small, epochs, args.lr, args.momentum, args.timeout), target)
        rows[f"dmlcore SyncSGD, {n} workers"] = summary(
            *run_dmlcore(n, X, y, Xt, yt, epochs, args.lr, args.momentum), target)

    figures, notes = [], []
    print(f"\n{'run':34s} {'s/epoch':>8s} {f's to {target}':>10s} {'final acc':>9s}")
    for name, (per_epoch, hit, acc) in rows.items():
        print(f"{name:34s} {per_epoch:8.2f} {'-' if hit is None else f'{hit:.2f}':>10s} "
              f"{acc:9.4f}")
        figures.append(figure(f"{name}: seconds per epoch", per_epoch, "s"))
        figures.append(figure(f"{name}: final test accuracy", acc, "accuracy"))
        if hit is None:
            notes.append(f"{name}: did not reach {target} in {epochs} epochs")
        else:
            figures.append(figure(f"{name}: time to {target}", hit, "s"))
    figures.append(figure("target test accuracy", target, "accuracy"))
    figures.append(figure("epochs", epochs, "epochs"))
    figures.append(figure("training rows", X.shape[0], "rows"))
    print("\nratios (same recipe, same run):")
    for n in counts:
        ours = rows[f"dmlcore SyncSGD, {n} workers"]
        r = ours[0] / rows[single][0]
        print(f"  dmlcore epoch on {n} workers / {single} epoch: {r:.2f}")
        figures.append(figure(f"dmlcore epoch, {n} workers / PyTorch epoch", r, "x", peer=single))
        for peer in (single, f"PyTorch DDP gloo, {n} processes"):
            if peer in rows and ours[1] is not None and rows[peer][1] is not None:
                r = rows[peer][1] / ours[1]
                print(f"  time to {target}: {peer} / dmlcore on {n} workers: {r:.2f} "
                      f"({'dmlcore sooner' if r > 1 else 'dmlcore later'})")
                figures.append(figure(f"time to {target}: {peer} / dmlcore, {n} workers", r,
                                    "x", peer=peer))
    if 1 in counts:
        base = rows["dmlcore SyncSGD, 1 workers"][0]
        for n in counts:
            if n > 1:
                speedup = base / rows[f"dmlcore SyncSGD, {n} workers"][0]
                print(f"  dmlcore epoch speed-up 1 -> {n} workers: {speedup:.2f} "
                      f"(parallel efficiency {speedup / n:.2f})")
                figures.append(figure(f"dmlcore epoch speed-up 1 -> {n} workers", speedup, "x",
                                    peer="dmlcore SyncSGD, 1 worker"))
    for note in notes:
        print(f"  note: {note}")
    return {"figures": figures, "notes": notes}


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
