"""Faults and membership changes mid-fit: time to detect and recover, cost, answer.

Every part runs on real processes: a `dask scheduler` and single-threaded
`dask worker --no-nanny` workers (a killed worker stays dead), on the
Fashion-MNIST training set (first ``--rows`` rows; synthetic data of the
same shape when it is absent, said so), evaluated on its test set.

1. *SyncSGD* (3 workers, 6 partitions): each of replicas (``apply_on=
   "workers"``), the driver path, local SGD (``local_steps=4``) and L-BFGS
   runs once undisturbed and once with one worker SIGKILLing itself in the
   step at ``--kill-at`` of the run (the kill switch is in its model's
   ``loss_grad``: mid-fit however short the fit). Printed: the seconds from
   the kill to the fault's event (detect), the event's ``recovery_s``
   (recover: data made again, executors re-created), the disturbed fit's
   time over the undisturbed one, and whether the parameters are
   bit-identical (L-BFGS: the objective's relative difference too).
2. *FedAvg* (3 workers, 6 clients, all sampled): test accuracy undisturbed
   and with a worker killed mid-run; clients dropped.
3. *Parameter server* (async, softmax): test accuracy undisturbed and with
   the server's worker killed mid-run; updates lost.
4. *Elastic*: SyncSGD on 2 workers, a third joins after ``--join-epoch``
   epochs: mean epoch time before and after; the parameter server (async,
   every push delayed ``--push-delay`` s, as a slower worker's compute
   would be) on 2 workers, a third joins: updates/s before and after. On a
   2-core machine a third worker process adds no core: say so when the
   figures show it.

``--small`` runs a smoke-sized version (3,000 rows, short fits).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout
sys.path.insert(0, str(ROOT / "tests"))         # dask_processes: the tests' process harness
from benchmarks.runner import figure, ratio  # noqa: E402 - the runner's figure records
from dask_processes import dask_processes  # noqa: E402
from benchmarks.worker_faults import hooked, kill_at, worker_pid  # noqa: E402


# ---- processes ------------------------------------------------------------------
@contextlib.contextmanager
def cluster(n_workers, logdir):
    """``(procs, client)``: a `dask scheduler` and ``n_workers`` `dask worker
    --no-nanny` processes (``tests/dask_processes.DaskProcesses``: a killed
    worker stays dead, ``procs.start_worker()`` adds one), all ended on exit."""
    from distributed import Client

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    with dask_processes(logdir, [([], None)] * n_workers, memory_limit="4GiB", env=env,
                        worker_args=["--no-nanny"]) as procs, \
            Client(procs.address, timeout=30) as client:
        yield procs, client


def kill_later(client, address, delay):
    """SIGKILL ``address``'s process after ``delay`` s (a thread); returns a dict
    that gets ``"at"`` (``time.time()`` of the kill)."""
    pid = worker_pid(client, address)
    out = {}

    def fire():
        time.sleep(delay)
        out["at"] = time.time()
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=fire, daemon=True).start()
    return out


def events(history):
    names = [v for v in history.data_vars if v.startswith("event_")]
    return [{n[len("event_"):]: history[n].values[i].item() for n in names}
            for i in range(history.sizes.get("event", 0))]


# ---- data -----------------------------------------------------------------------
def load(rows):
    """((X, y) train, (X, y) test, "fashion-mnist" or "synthetic")."""
    import dmlcore as dml

    try:
        X, y = dml.datasets.fashion_mnist("train")
        Xt, yt = dml.datasets.fashion_mnist("test")
        return (X[:rows], y[:rows]), (Xt, yt), "fashion-mnist"
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        W = rng.normal(size=(784, 10)).astype(np.float32)

        def make(n):
            X = rng.random((n, 784), dtype=np.float32)
            return X, np.argmax(X @ W + rng.gumbel(size=(n, 10)), axis=1)
        return make(rows), make(10000), "synthetic"


def accuracy(result, test):
    X, y = test
    scores = np.asarray(result.predict(X))
    return float(np.mean((scores.argmax(axis=1) if scores.ndim == 2 else scores) == y))


# ---- parts ----------------------------------------------------------------------
SYNC_CASES = {   # keywords, loss_grad calls per partition and step
    "replicas": (dict(batch_size=64), 1),
    "driver": (dict(batch_size=64, apply_on="driver"), 1),
    "local_steps": (dict(batch_size=64, local_steps=4), 4),
    "lbfgs": (dict(batch_size=None), 1),     # per evaluation: at least one an iteration
}


def sync_part(args, train, test, tmp):
    import dmlcore as dml

    out, figures = {}, []
    for case in args.sync_cases.split(","):
        keywords, calls_per_step = SYNC_CASES[case]
        with cluster(3, _dir(tmp, f"sync-{case}")) as (procs, client):
            data = dml.partition(*train, n_partitions=6, seed=0, client=client)
            if case == "lbfgs":
                kind, shape, optimizer, length = dml.models.Softmax, (784, 10), \
                    dml.optim.LBFGS(), dict(steps=args.lbfgs_iterations)
            else:
                kind, shape = dml.models.MLP, ([784, args.hidden, 10],)
                optimizer = dml.optim.Adam(lr=1e-3) if case != "local_steps" else \
                    dml.optim.SGD(lr=0.05)
                length = dict(epochs=args.epochs)

            def fit(model):
                t0 = time.perf_counter()
                r = dml.fit(model, data, dml.SyncSGD(**keywords), optimizer, client=client,
                            progress=False, seed=1, timeout=30, **length)
                return r, time.perf_counter() - t0
            fit(kind(*shape))                       # warm-up: imports and first calls
            calm, calm_s = fit(kind(*shape))
            victim = sorted(client.nthreads())[1]
            stamp = Path(tmp) / f"killed-{case}"
            kill_step = int(args.kill_at * calm.history.sizes["step"])
            at_call = data.workers().count(victim) * calls_per_step * kill_step + 1
            hit, hit_s = fit(hooked(kind, worker_pid(client, victim),
                                    kill_at(at_call, stamp))(*shape))
            kill = {"at": float(stamp.read_text())} if stamp.exists() else {}
            ev = [e for e in events(hit.history) if e.get("what", "").startswith("executor re")]
        row = {"calm_s": calm_s, "hit_s": hit_s, "identical": bool(np.array_equal(
            calm.params, hit.params)), "events": len(ev), "killed": "at" in kill}
        if ev and "at" in kill:
            row["detect_s"] = ev[0]["time"] - kill["at"]
            row["recover_s"] = ev[0]["recovery_s"]
        if case == "lbfgs":
            a, b = (float(r.history.loss.values[-1]) for r in (calm, hit))
            row["objective_rel_diff"] = abs(a - b) / abs(a)
        else:
            row["acc_calm"], row["acc_hit"] = accuracy(calm, test), accuracy(hit, test)
        out[case] = row
        print(f"sync {case:11s}: undisturbed {calm_s:6.2f} s, killed {hit_s:6.2f} s "
              f"({hit_s / calm_s:.2f}x); detect {row.get('detect_s', float('nan')):.3f} s, "
              f"recover {row.get('recover_s', float('nan')):.3f} s; bit-identical "
              f"{row['identical']}" + (f"; objective rel diff {row['objective_rel_diff']:.1e}"
                                       if case == "lbfgs" else
                                       f"; test acc {row['acc_calm']:.4f} / {row['acc_hit']:.4f}"),
              flush=True)
        if "detect_s" in row:
            figures += [figure(f"sync_{case}_detect", row["detect_s"], "s"),
                        figure(f"sync_{case}_recover", row["recover_s"], "s"),
                        ratio(f"sync_{case}_killed_vs_undisturbed_time", hit_s / calm_s,
                              "the undisturbed fit"),
                        figure(f"sync_{case}_bit_identical", float(row["identical"]), "bool")]
    return out, figures


def fedavg_part(args, train, test, tmp):
    import dmlcore as dml

    with cluster(3, _dir(tmp, "fedavg")) as (procs, client):
        data = dml.partition(*train, n_partitions=6, seed=0, client=client)
        model = dml.models.MLP([784, args.hidden, 10])

        def fit(callbacks=()):
            t0 = time.perf_counter()
            r = dml.fit(model, data, dml.FedAvg(clients_per_round=1.0, batch_size=32),
                        dml.optim.SGD(lr=0.05), rounds=args.rounds, client=client,
                        progress=False, seed=1, timeout=30, callbacks=callbacks)
            return r, time.perf_counter() - t0
        fit()
        calm, calm_s = fit()
        kill, victim = {}, sorted(client.nthreads())[1]

        def kill_mid_run(step, record, params):     # after round rounds // 2: the next dies
            if step == args.rounds // 2 and not kill:
                kill["shot"] = kill_later(client, victim, 0.0)
        hit, hit_s = fit([kill_mid_run])
    dropped = int(hit.history.failed.values.sum())
    ev = events(hit.history)
    shot = kill.get("shot", {})
    row = {"acc_calm": accuracy(calm, test), "acc_hit": accuracy(hit, test),
           "dropped": dropped, "calm_s": calm_s, "hit_s": hit_s, "killed": "at" in shot,
           "detect_s": ev[0]["time"] - shot["at"] if ev and "at" in shot else float("nan")}
    print(f"fedavg: test acc undisturbed {row['acc_calm']:.4f}, killed {row['acc_hit']:.4f}; "
          f"client updates dropped {dropped}; detect {row['detect_s']:.3f} s",
          flush=True)
    return row, [figure("fedavg_acc_undisturbed", row["acc_calm"], "accuracy"),
                 figure("fedavg_acc_killed", row["acc_hit"], "accuracy"),
                 figure("fedavg_clients_dropped", dropped, "client updates")]


def ps_part(args, train, test, tmp):
    import dmlcore as dml
    from dmlcore.strategies.ps import ParameterServer

    def hosts_server():
        from dmlcore.strategies import ps
        return bool(ps._SERVERS)

    with cluster(3, _dir(tmp, "ps")) as (procs, client):
        data = dml.partition(*train, n_partitions=2, seed=0, client=client)  # 2 of 3 workers

        def fit(callbacks=()):
            t0 = time.perf_counter()
            r = dml.fit(dml.models.Softmax(784, 10), data, ParameterServer("async", batch_size=64),
                        dml.optim.SGD(lr=0.1), steps=args.ps_updates, client=client,
                        progress=False, seed=1, timeout=30, callbacks=callbacks)
            return r, time.perf_counter() - t0
        fit()
        calm, calm_s = fit()
        kill = {}

        def kill_server(step, record, params):
            if step == args.ps_updates // 2 and not kill:
                address = [w for w, here in client.run(hosts_server).items() if here][0]
                kill.update(kill_later(client, address, 0.0), address=address)
        hit, hit_s = fit([kill_server])
    ev = [e for e in events(hit.history) if e.get("what") == "parameter server restarted"]
    row = {"acc_calm": accuracy(calm, test), "acc_hit": accuracy(hit, test),
           "updates_lost": int(hit.history.updates_lost.values.sum()),
           "restarted": len(ev), "from_update": ev[0]["from_update"] if ev else None}
    print(f"parameter server: test acc undisturbed {row['acc_calm']:.4f}, server killed at "
          f"update {args.ps_updates // 2}: {row['acc_hit']:.4f} (restarted from update "
          f"{row['from_update']}, {row['updates_lost']} updates lost)", flush=True)
    return row, [figure("ps_acc_undisturbed", row["acc_calm"], "accuracy"),
                 figure("ps_acc_server_killed", row["acc_hit"], "accuracy"),
                 figure("ps_updates_lost", row["updates_lost"], "updates")]


def elastic_part(args, train, test, tmp):
    import dmlcore as dml
    from dmlcore.strategies.ps import ParameterServer

    out, figures = {}, []
    with cluster(2, _dir(tmp, "elastic-sync")) as (procs, client):
        data = dml.partition(*train, n_partitions=6, seed=0, client=client)
        strategy = dml.SyncSGD(batch_size=64)
        per_epoch = strategy.steps_per_epoch(data)

        def join(step, record, params):
            if step == args.join_epoch * per_epoch - 1:
                procs.start_worker()
                client.wait_for_workers(3, timeout=90)
        join.sync_every = per_epoch
        dml.fit(dml.models.MLP([784, args.hidden, 10]), data, strategy, steps=per_epoch,
                client=client, progress=False)      # warm-up
        r = dml.fit(dml.models.MLP([784, args.hidden, 10]), data, strategy,
                    epochs=args.join_epoch + args.epochs_after, client=client, progress=False,
                    callbacks=[join], timeout=30)
        wall = r.history.wall_time.values
        ends = wall[per_epoch - 1::per_epoch]
        epochs = np.diff(np.concatenate([[0.0], ends]))
        # the epoch that started the new worker (and waited for it) is left out
        before = epochs[1:args.join_epoch - 1] if args.join_epoch > 2 else epochs[:1]
        after = epochs[args.join_epoch + 1:]
        grown = [e for e in events(r.history) if "joined" in e.get("what", "")
                 or "regrouped" in e.get("what", "")]
    out["sync"] = {"epoch_before_s": float(np.mean(before)), "epoch_after_s": float(np.mean(after)),
                   "events": [e["what"] for e in grown]}
    print(f"elastic SyncSGD: epoch {out['sync']['epoch_before_s']:.3f} s on 2 workers, "
          f"{out['sync']['epoch_after_s']:.3f} s after a third joined ({grown and grown[0]['what']})",
          flush=True)
    with cluster(2, _dir(tmp, "elastic-ps")) as (procs, client):
        data = dml.partition(*train, n_partitions=6, seed=0, client=client)
        joined = {}

        def join_ps(step, record, params):
            if step == args.ps_updates // 3 and not joined:
                joined["t"] = time.perf_counter()
                procs.start_worker()
                client.wait_for_workers(3, timeout=90)
                joined["ready"] = time.perf_counter()
        r = dml.fit(dml.models.Softmax(784, 10), data,
                    ParameterServer("async", batch_size=64, slow_partitions={
                        p: args.push_delay for p in range(6)}),
                    dml.optim.SGD(lr=0.1), steps=args.ps_updates, client=client,
                    progress=False, callbacks=[join_ps], timeout=30)
        ev = [e for e in events(r.history) if e.get("what") == "loops moved to a joined worker"]
        wall = r.history.wall_time.values
        cut = int(ev[0]["step"]) if ev else len(wall) // 2
        rate = lambda w: (len(w) - 1) / (w[-1] - w[0])  # noqa: E731
        out["ps"] = {"rate_before": rate(wall[5:max(cut - 5, 7)]),
                     "rate_after": rate(wall[cut + 20:]), "moved": bool(ev)}
    print(f"elastic parameter server: {out['ps']['rate_before']:.0f} updates/s on 2 workers, "
          f"{out['ps']['rate_after']:.0f} after a third joined (loops moved: "
          f"{out['ps']['moved']})", flush=True)
    figures += [figure("elastic_sync_epoch_before", out["sync"]["epoch_before_s"], "s"),
                figure("elastic_sync_epoch_after", out["sync"]["epoch_after_s"], "s"),
                figure("elastic_ps_rate_before", out["ps"]["rate_before"], "updates/s"),
                figure("elastic_ps_rate_after", out["ps"]["rate_after"], "updates/s"),
                ratio("elastic_ps_rate_after_vs_before",
                      out["ps"]["rate_after"] / out["ps"]["rate_before"], "2 workers")]
    return out, figures


def _dir(tmp, name):
    path = Path(tmp) / name
    path.mkdir()
    return path


def run(argv=None):
    """Run and print as main() does; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="smoke-sized run")
    parser.add_argument("--rows", type=int, default=30000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lbfgs-iterations", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--ps-updates", type=int, default=3000)
    parser.add_argument("--kill-at", type=float, default=0.4,
                        help="SyncSGD: kill in the step at this fraction of the fit")
    parser.add_argument("--join-epoch", type=int, default=3)
    parser.add_argument("--epochs-after", type=int, default=3)
    parser.add_argument("--push-delay", type=float, default=0.01)
    parser.add_argument("--parts", default="sync,fedavg,ps,elastic")
    parser.add_argument("--sync-cases", default=",".join(SYNC_CASES))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.small:
        args.rows, args.hidden, args.epochs, args.lbfgs_iterations = 3000, 32, 2, 10
        args.rounds, args.ps_updates, args.join_epoch, args.epochs_after = 4, 600, 2, 2
    train, test, source = load(args.rows)
    print(f"data: {source}, {len(train[1])} training rows, {len(test[1])} test rows", flush=True)
    results, figures = {"source": source}, []
    parts = {"sync": sync_part, "fedavg": fedavg_part, "ps": ps_part, "elastic": elastic_part}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.parts.split(","):
            results[name], more = parts[name](args, train, test, tmp)
            figures += more
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "figures": figures}, indent=1,
                                              default=float))
    return figures


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
