"""The Fashion-MNIST MLP (784-256-10, relu), same recipes: dmlcore SyncSGD vs PyTorch and DDP.

Recipe for all: SGD lr 0.1, momentum 0.9, 128 rows per step (mean gradient),
``--epochs`` epochs from the same initial weights (dmlcore's ``MLP.init(0)``),
test accuracy evaluated at the end of every epoch (the clock runs through
the evaluations, for every peer alike). ``--grid`` runs every recipe of
``GRID`` for every library (the same small grid for all: SGD momentum 0.9
constant or cosine, Adam with cosine at 128 and 512 rows per step; a cosine
schedule decays to 0 over the ``--epochs``, the same function in PyTorch
through ``LambdaLR``) and prints each library's best time to the target (the
recipes after the first end at the first epoch that reaches it).
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

SIZES = [784, 256, 10]
ROWS_PER_STEP = 128


@dataclass(frozen=True)
class Recipe:
    """One training recipe, the same for every library.

    ``optimizer``: "sgd" (heavy-ball momentum ``momentum``) or "adam" (betas
    0.9 / 0.999, eps 1e-8); ``schedule``: "constant" or "cosine" (to 0 at the
    last step); ``rows``: rows per step over all processes (each of n
    processes / workers takes rows // n)."""

    optimizer: str
    lr: float
    schedule: str
    rows: int
    momentum: float = 0.9

    @property
    def label(self):
        opt = (f"SGD lr {self.lr:g} m {self.momentum:g}" if self.optimizer == "sgd"
               else f"Adam lr {self.lr:g}")
        return f"{opt}, {self.schedule}, {self.rows} rows"


GRID = (Recipe("sgd", 0.1, "constant", 128), Recipe("sgd", 0.1, "cosine", 128),
        Recipe("adam", 0.002, "cosine", 128), Recipe("adam", 0.002, "cosine", 512))


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


def dml_optimizer(recipe):
    """dmlcore's optimizer for ``recipe`` (a cosine horizon is filled in by ``dml.fit``)."""
    import dmlcore as dml

    schedule = None if recipe.schedule == "constant" else dml.optim.Cosine()
    if recipe.optimizer == "sgd":
        return dml.optim.SGD(lr=recipe.lr, momentum=recipe.momentum, schedule=schedule)
    return dml.optim.Adam(lr=recipe.lr, schedule=schedule)


def torch_optimizer(params, recipe, total_steps):
    """(optimizer, scheduler or None): ``recipe`` in PyTorch, dmlcore's schedule function."""
    import torch

    import dmlcore as dml

    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum)
    else:
        opt = torch.optim.Adam(params, lr=recipe.lr, betas=(0.9, 0.999), eps=1e-8)
    if recipe.schedule == "constant":
        return opt, None
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, dml.optim.Cosine(total_steps))


def train_torch(net, X, y, Xt, yt, epochs, recipe, seed, rank=0, world=1, epoch_hook=None,
                stop_at=None):
    """Train ``net``; (step times, [(seconds since start, accuracy) per epoch], steps per
    epoch). ``stop_at``: end after the first epoch whose test accuracy reaches it;
    ``epoch_hook(stop)``, called at each epoch's end, returns whether to stop (DDP:
    rank 0's word)."""
    import torch

    batch = recipe.rows // world
    lossf = torch.nn.CrossEntropyLoss()
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    Xt, yt = torch.from_numpy(Xt), torch.from_numpy(yt)
    n = X.shape[0]
    steps = -(-n // (batch * world))
    opt, scheduler = torch_optimizer(net.parameters(), recipe, steps * epochs)
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
            if scheduler is not None:
                scheduler.step()
            step_times.append(time.perf_counter() - ts)
        acc = _accuracy(net, Xt, yt) if rank == 0 else float("nan")
        curve.append((time.perf_counter() - t0, acc))
        stop = stop_at is not None and acc >= stop_at
        if epoch_hook is not None:
            stop = epoch_hook(stop)
        if stop:
            break
    return step_times, curve, steps


def _ddp_worker(rank, world, port, small, epochs, recipe, out, stop_at):
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

        def rank0_says(stop):                        # every rank ends at the same epoch
            flag = torch.tensor([1 if stop else 0])
            dist.broadcast(flag, src=0)
            return bool(flag.item())

        step_times, curve, steps = train_torch(ddp, X, y, Xt, yt, epochs, Recipe(**recipe),
                                               seed=0, rank=rank, world=world,
                                               epoch_hook=rank0_says, stop_at=stop_at)
        if rank == 0:
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"step_times": step_times, "curve": curve, "steps": steps}, f)
            os.replace(tmp, out)
        dist.barrier()                 # both ranks done before gloo's threads shut down
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(world, small, epochs, recipe, timeout, stop_at=None):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        out = str(Path(tmp) / "rank0.json")
        ctx = mp.start_processes(_ddp_worker, args=(world, _free_port(), small, epochs,
                                                    asdict(recipe), out, stop_at),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"DDP on {world} processes ran past {timeout:.0f} s")
        except mp.ProcessExitedException as exc:
            # gloo now and then aborts a process as it shuts down ("terminate called without
            # an active exception"): rank 0's complete results (written atomically after
            # the last epoch) are used; a crash before that is an error.
            if not Path(out).exists():
                raise
            print(f"  note: DDP on {world} processes: {exc} after rank 0 wrote its results",
                  flush=True)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        r = json.loads(Path(out).read_text())
    return r["step_times"], [tuple(c) for c in r["curve"]], r["steps"]


def run_dmlcore(n_workers, X, y, Xt, yt, epochs, recipe, stop_at=None):
    from distributed import Client

    import dmlcore as dml
    from dmlcore.cluster import local_cluster

    model = dml.models.MLP(SIZES, activation="relu")
    with local_cluster(n_workers=n_workers, threads_per_worker=1,
                       dashboard_address=":0") as cluster, Client(cluster) as client:
        data = dml.partition(X, y, n_partitions=n_workers, scheme="iid", seed=0, client=client)
        strategy = dml.SyncSGD(batch_size=recipe.rows // n_workers)
        steps = strategy.steps_per_epoch(data)
        # warm-up: imports, worker code, the data plane (not timed)
        dml.fit(model, data, strategy, dml_optimizer(recipe), steps=5,
                client=client, progress=False)
        res = dml.fit(model, data, strategy, dml_optimizer(recipe),
                      epochs=epochs, eval_data=(Xt, yt), eval_every=steps,
                      init_params=model.init(0, dtype=np.float32), client=client,
                      progress=False,
                      callbacks=[] if stop_at is None else [_Reached(stop_at, steps)])
    h = res.history
    wall = h["wall_time"].values
    acc = h["eval_accuracy"].values
    curve = [(float(wall[i]), float(acc[i])) for i in np.flatnonzero(np.isfinite(acc))]
    step_times = np.diff(wall)
    return step_times, curve, steps


class _Reached:
    """Callback: stop at the first evaluation (every ``sync_every`` steps) whose test
    accuracy reaches ``target``. ``sync_every`` matters: a callback without it is called
    with current parameters at every step, which puts the replicated step on the driver."""

    def __init__(self, target, sync_every):
        self.target, self.sync_every = target, int(sync_every)

    def __call__(self, step, record, params):
        return record.get("eval_accuracy", -1.0) >= self.target


def summary(step_times, curve, steps, target):
    """(seconds per epoch, seconds to target or None, the last epoch's accuracy)."""
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
    parser.add_argument("--grid", action="store_true",
                        help="also run every recipe of GRID on the counts >= 2; each "
                             "library's best time to the target")
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
    single = f"PyTorch 1 process, {args.threads} threads"

    def libraries(recipe, worker_counts, stop_at=None):
        """{library: (seconds per epoch, seconds to target or None, last accuracy)};
        ``stop_at``: each run ends at the first epoch reaching that accuracy."""
        out = {}
        torch.set_num_threads(args.threads)
        net = torch_net(dml.models.MLP(SIZES).init(0, dtype=np.float32))
        out[single] = summary(*train_torch(net, X, y, Xt, yt, epochs, recipe, seed=0,
                                           stop_at=stop_at), target)
        torch.set_num_threads(1)
        for n in worker_counts:
            if n >= 2 and not args.skip_ddp:
                out[f"PyTorch DDP gloo, {n} processes"] = summary(
                    *run_ddp(n, args.small, epochs, recipe, args.timeout, stop_at), target)
            out[f"dmlcore SyncSGD, {n} workers"] = summary(
                *run_dmlcore(n, X, y, Xt, yt, epochs, recipe, stop_at), target)
        return out

    first = Recipe("sgd", args.lr, "constant", ROWS_PER_STEP, args.momentum)
    rows = libraries(first, counts)
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
    if args.grid:
        grid_counts = [n for n in counts if n >= 2]
        results = {first.label: {k: v for k, v in rows.items()
                                 if k != "dmlcore SyncSGD, 1 workers"}}
        for recipe in GRID:                  # the grid asks for times to the target only
            if recipe.label not in results:
                results[recipe.label] = libraries(recipe, grid_counts, stop_at=target)
        figures += grid_figures(results, target, grid_counts, notes, full=first.label)
    for note in notes:
        print(f"  note: {note}")
    return {"figures": figures, "notes": notes}


def grid_figures(results, target, counts, notes, full):
    """Print the grid; figures per (library, recipe) and each library's best time to target.

    ``results``: {recipe label: {library: summary}}; recipe ``full`` ran every epoch (its
    accuracies are final), the others stopped at the target (their "last" accuracies)."""
    print(f"\ngrid: time to {target} (s) / last accuracy (after {full}: stopped at the target)")
    libs = list(next(iter(results.values())))
    print(f"{'recipe':38s} " + " ".join(f"{lib[:30]:>30s}" for lib in libs))
    figures, best = [], {}
    for label, by_lib in results.items():
        cells = []
        for lib, (_, hit, acc) in by_lib.items():
            cells.append(f"{'-' if hit is None else f'{hit:.2f}':>7s} / {acc:.4f}".rjust(30))
            which = "final" if label == full else "last"
            figures.append(figure(f"{lib} [{label}]: {which} test accuracy", acc, "accuracy"))
            if hit is not None:
                figures.append(figure(f"{lib} [{label}]: time to {target}", hit, "s"))
                if lib not in best or hit < best[lib][0]:
                    best[lib] = (hit, label)
        print(f"{label:38s} " + " ".join(cells))
    for lib in libs:
        if lib in best:
            print(f"  best of the grid, {lib}: {best[lib][0]:.2f} s ({best[lib][1]})")
            figures.append(figure(f"{lib}: best time to {target} of the grid", best[lib][0], "s",
                                  recipe=best[lib][1]))
        else:
            notes.append(f"{lib}: no recipe of the grid reached {target}")
    for n in counts:
        ours = best.get(f"dmlcore SyncSGD, {n} workers")
        for peer in (lib for lib in libs if not lib.startswith("dmlcore")):
            if ours is not None and peer in best:
                r = best[peer][0] / ours[0]
                print(f"  best of the grid, time to {target}: {peer} / dmlcore on {n} workers: "
                      f"{r:.2f}")
                figures.append(figure(f"best of the grid, time to {target}: {peer} / dmlcore, "
                                      f"{n} workers", r, "x", peer=peer))
    return figures


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
