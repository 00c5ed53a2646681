#!/usr/bin/env python
"""FedAvg vs FedSGD on real Fashion-MNIST: the design of McMahan et al. 2017, Tables 1/2.

2NN (784-200-200-10, relu), K=100 clients, C=0.1 (10 clients a round), IID
clients (100 x 600 rows) and pathological non-IID clients (the 60000 rows
sorted by label, cut into 200 shards of 300, 2 shards per client:
``dml.partition(scheme="shards", shards_per_partition=2)``). For every run
the test accuracy (10 000 test images) is measured after every round and the
number of rounds until its RUNNING MAXIMUM reaches 0.75 / 0.80 / 0.85 is
reported, as in the paper. The peer is FedSGD (E=1, B=inf) in the same run:
speed-ups are FedSGD's rounds / the method's rounds.

Grids (``--grid``):
  core  FedSGD (lr 0.3) and FedAvg(E=5, B=10, lr 0.05) on IID and non-IID
        clients, plus FedProx (mu) and FedAvgM (server SGD with momentum) on
        non-IID clients, each run to its round cap (the non-IID plateau);
  full  FedSGD lr in {0.1, 0.2, 0.3}; FedAvg E in {1, 5, 20} x B in {10, 50, inf}
        x lr in {0.03, 0.05, 0.1}, cheapest first; a run stops when its running
        maximum reaches 0.85 or at the cap.
Results are appended to ``<out>/runs.jsonl`` as each run finishes (a re-run
skips finished runs), and the markdown tables (``<out>/table.md``) and the
xarray Dataset (``<out>/fedavg.nc``: curves per run and round, rounds to each
target) are rewritten from everything finished so far.

``--seed N`` reruns a configuration with other client samples, batch orders and
initial weights (the clients' data stay the same); the run's name gets
``/seedN``. ``--small``: a smoke test (3000 training rows, 20 clients, 1000 test rows,
3 rounds per run). Run it from the repository root (it adds the checkout to
sys.path) or with dmlcore installed. Cost: a FedSGD round is 10 full-batch
gradients of 600 rows, a FedAvg(E=5, B=10) round 10 x 300 local steps of 10
rows (about 10x the CPU of a FedSGD round), plus one evaluation on the test
set per round. Disjoint ``--only`` selections may run concurrently with the
same ``--out``; ``--report-only`` then rebuilds the tables from runs.jsonl.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

import dmlcore as dml  # noqa: E402
from dmlcore.strategies.fedavg import FedAvg  # noqa: E402

TARGETS = (0.75, 0.80, 0.85)
SIZES = [784, 200, 200, 10]


from benchmarks.runner import figure  # noqa: E402 - the runner's figure records


def run_name(c):
    b = "inf" if c["B"] is None else c["B"]
    name = f"{c['scheme']}/{c['method']}/E{c['E']}/B{b}/lr{c['lr']}"
    if c.get("mu"):
        name += f"/mu{c['mu']}"
    if c.get("server"):
        name += f"/server-lr{c['server'][0]}-m{c['server'][1]}"
    if c.get("seed"):
        name += f"/seed{c['seed']}"
    return name


def make_configs(grid, caps, cap_local, prox_mus, servers, seed=0):
    out = []

    def add(scheme, method, E, B, lr, mu=0.0, server=None, stop=True):
        cap = caps[scheme] if method == "FedSGD" else min(caps[scheme], cap_local)
        c = dict(scheme=scheme, method=method, E=E, B=B, lr=lr, mu=mu, server=server,
                 cap=cap, stop_at_max_target=stop, seed=seed)
        c["name"] = run_name(c)
        out.append(c)

    if grid == "core":
        for scheme in ("iid", "shards"):
            add(scheme, "FedSGD", 1, None, 0.3, stop=False)
            add(scheme, "FedAvg", 5, 10, 0.05, stop=scheme == "iid")
        for mu in prox_mus:
            add("shards", "FedProx", 5, 10, 0.05, mu=mu, stop=False)
        for server in servers:
            add("shards", "FedAvgM", 5, 10, 0.05, server=server, stop=False)
        return out
    # full grid, cheapest per round first: FedSGD, then by local updates per round
    for scheme in ("iid", "shards"):
        for lr in (0.1, 0.2, 0.3):
            add(scheme, "FedSGD", 1, None, lr)
    pairs = [(E, B) for E in (1, 5, 20) for B in (None, 50, 10) if (E, B) != (1, None)]
    pairs.sort(key=lambda eb: eb[0] * (600 / (eb[1] or 600)))
    for E, B in pairs:
        for scheme in ("iid", "shards"):
            for lr in (0.03, 0.05, 0.1):
                add(scheme, "FedAvg", E, B, lr)
    return out


def rounds_to(acc, target):
    """First round (1-based) whose running maximum reaches ``target``; None if never."""
    best = np.fmax.accumulate(np.nan_to_num(np.asarray(acc, float), nan=-1.0))
    hit = np.flatnonzero(best >= target)
    return int(hit[0]) + 1 if hit.size else None


def run_one(c, data, model, test, client):
    server = None if c["server"] is None else dml.optim.SGD(lr=c["server"][0],
                                                            momentum=c["server"][1])
    strategy = FedAvg(clients_per_round=0.1, local_epochs=c["E"], batch_size=c["B"],
                      proximal_mu=c["mu"], server_optimizer=server)
    top = max(TARGETS)
    best = {"acc": -1.0}

    def stop(step, record, params):
        acc = record.get("eval_accuracy", np.nan)
        if np.isfinite(acc):
            best["acc"] = max(best["acc"], acc)
        return bool(c["stop_at_max_target"] and best["acc"] >= top)

    t0 = time.perf_counter()
    res = dml.fit(model, data, strategy, dml.optim.SGD(lr=c["lr"]), rounds=c["cap"],
                  eval_data=test, eval_every=1, client=client, seed=c.get("seed", 0),
                  progress=False,
                  callbacks=[stop])
    seconds = time.perf_counter() - t0
    h = res.history
    acc = h["eval_accuracy"].values.tolist()
    return dict(c, n_client=float(np.mean(data.partition_sizes)), acc=acc, loss=h["loss"].values.tolist(),
                bytes_sent=h["bytes_sent"].values.tolist(),
                participants=h["participants"].values.tolist(), seconds=seconds,
                rounds_run=len(acc),
                rounds_to={str(t): rounds_to(acc, t) for t in TARGETS},
                max_acc=float(np.nanmax(acc)),
                last10_acc=float(np.nanmean(acc[-10:])))


# ---- reporting -------------------------------------------------------------------
def _fmt_rounds(r, ref, cap):
    if r is None:
        return f">{cap}"
    if ref is None or r == 0:
        return str(r)
    return f"{r} ({ref / r:.1f}x)"


def _best(runs, key_target):
    """The run with the fewest rounds to ``key_target`` (ties: higher max accuracy)."""
    def score(r):
        n = r["rounds_to"][str(key_target)]
        return (n if n is not None else 10 ** 9, -r["max_acc"])
    return min(runs, key=score)


def tables(results):
    """Markdown: the paper-style table (best lr per row) and the non-IID plateau table."""
    lines = []
    groups = {}
    for r in results:
        key = (r["method"], r["E"], r["B"], r.get("mu", 0.0), tuple(r["server"] or ()))
        groups.setdefault(key, {}).setdefault(r["scheme"], []).append(r)
    key_target = {"iid": 0.80, "shards": 0.75}
    fedsgd = {}
    for scheme in ("iid", "shards"):
        runs = groups.get(("FedSGD", 1, None, 0.0, ()), {}).get(scheme)
        if runs:
            fedsgd[scheme] = _best(runs, key_target[scheme])
    lines.append("Rounds for the running-max test accuracy to reach each target "
                 "(speed-up vs FedSGD's best lr in parentheses; `>N` = not reached in N "
                 "rounds). lr* = the best of the lrs run for that row.\n")
    head = ["method", "E", "B", "u", "mu / server"]
    for scheme, label in (("iid", "IID"), ("shards", "non-IID")):
        head += [f"{label} lr*"] + [f"{label} {t:.2f}" for t in TARGETS] + [f"{label} max acc"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    order = sorted(groups, key=lambda k: (k[0] != "FedSGD", k[0], k[1],
                                          -(600 / (k[2] or 600)), k[3], k[4]))
    for key in order:
        method, E, B, mu, server = key
        n = next(iter(groups[key].values()))[0].get("n_client", 600)
        u = E * n / (B or n)
        extra = f"mu={mu}" if mu else (f"lr={server[0]}, m={server[1]}" if server else "")
        row = [method, str(E), "inf" if B is None else str(B), f"{u:g}", extra]
        for scheme in ("iid", "shards"):
            runs = groups[key].get(scheme)
            if not runs:
                row += ["-"] * (len(TARGETS) + 2)
                continue
            best = _best(runs, key_target[scheme])
            ref = fedsgd.get(scheme)
            row.append(f"{best['lr']:g}")
            for t in TARGETS:
                ref_n = None if ref is None or ref is best else ref["rounds_to"][str(t)]
                row.append(_fmt_rounds(best["rounds_to"][str(t)], ref_n, best["rounds_run"]))
            row.append(f"{best['max_acc']:.4f}")
        lines.append("| " + " | ".join(row) + " |")
    plateau = [r for r in results if r["scheme"] == "shards" and r["method"] != "FedSGD"
               and not r["stop_at_max_target"] and r["E"] == 5 and r["B"] == 10]
    if plateau:
        lines.append("\nNon-IID plateau (runs to the cap, E=5, B=10): max and mean of the "
                     "last 10 rounds' test accuracy.\n")
        lines.append("| run | rounds | max acc | mean acc, last 10 | rounds to 0.75 | "
                     "rounds to 0.80 | s/round |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in plateau:
            lines.append(f"| {r['name']} | {r['rounds_run']} | {r['max_acc']:.4f} | "
                         f"{r['last10_acc']:.4f} | {r['rounds_to']['0.75']} | "
                         f"{r['rounds_to']['0.8']} | {r['seconds'] / r['rounds_run']:.2f} |")
    return "\n".join(lines) + "\n"


def dataset(results):
    import xarray as xr

    n_round = max(r["rounds_run"] for r in results)

    def pad(v):
        a = np.full(n_round, np.nan)
        a[:len(v)] = v
        return a

    rt = np.array([[np.nan if r["rounds_to"][str(t)] is None else r["rounds_to"][str(t)]
                    for t in TARGETS] for r in results])
    return xr.Dataset(
        {"eval_accuracy": (("run", "round"), np.stack([pad(r["acc"]) for r in results])),
         "loss": (("run", "round"), np.stack([pad(r["loss"]) for r in results])),
         "bytes_sent": (("run", "round"), np.stack([pad(r["bytes_sent"]) for r in results])),
         "rounds_to": (("run", "target"), rt),
         "seconds": ("run", np.array([r["seconds"] for r in results]))},
        coords={"run": [r["name"] for r in results], "round": np.arange(1, n_round + 1),
                "target": list(TARGETS),
                "scheme": ("run", [r["scheme"] for r in results]),
                "method": ("run", [r["method"] for r in results]),
                "E": ("run", [r["E"] for r in results]),
                "B": ("run", [-1 if r["B"] is None else r["B"] for r in results]),
                "lr": ("run", [r["lr"] for r in results]),
                "mu": ("run", [r["mu"] for r in results]),
                "cap": ("run", [r["cap"] for r in results])},
        attrs={"description": "FedAvg vs FedSGD, Fashion-MNIST 2NN, K=100, C=0.1; "
                              "B=-1 means the whole local set; rounds_to is NaN when "
                              "the target was not reached"})


def write_reports(out, results):
    (out / "table.md").write_text(tables(results))
    dataset(results).to_netcdf(out / "fedavg.nc", engine="scipy")   # netCDF3: no h5py needed


def run_grid(configs, results, X, y, test, K, workers, out, done_path):
    """Run ``configs`` on a fresh 2-worker cluster, appending each result as it finishes."""
    from distributed import Client

    from dmlcore.cluster import local_cluster

    cluster = local_cluster(n_workers=workers)
    client = Client(cluster)
    try:
        data = {}
        if any(c["scheme"] == "iid" for c in configs):
            data["iid"] = dml.partition(X, y, K, scheme="iid", seed=0, client=client)
        if any(c["scheme"] == "shards" for c in configs):
            data["shards"] = dml.partition(X, y, K, scheme="shards", shards_per_partition=2,
                                           seed=0, client=client)
            print(f"non-IID clients: sizes "
                  f"{sorted(set(data['shards'].partition_sizes.tolist()))}, classes per "
                  f"client (first 10): "
                  f"{[len(np.unique(y[r])) for r in data['shards'].source_rows[:10]]}",
                  flush=True)
        model = dml.models.MLP(SIZES, activation="relu")
        for c in configs:
            r = run_one(c, data[c["scheme"]], model, test, client)
            results.append(r)
            with open(done_path, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{r['name']}: rounds {r['rounds_run']}, rounds to "
                  f"{r['rounds_to']}, max acc {r['max_acc']:.4f}, last-10 mean "
                  f"{r['last10_acc']:.4f}, {r['seconds']:.0f} s "
                  f"({r['seconds'] / r['rounds_run']:.2f} s/round)", flush=True)
            write_reports(out, results)
    finally:
        client.close()
        cluster.close()


def run(argv=None):
    """Run and print as main() does; return the figures (and notes)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=("core", "full"), default="core")
    ap.add_argument("--cap-iid", type=int, default=150, help="round cap, IID clients")
    ap.add_argument("--cap-noniid", type=int, default=150, help="round cap, non-IID clients")
    ap.add_argument("--cap-local", type=int, default=60,
                    help="round cap of the runs with local epochs (FedAvg, FedProx, FedAvgM)")
    ap.add_argument("--prox-mu", type=float, nargs="*", default=[0.1])
    ap.add_argument("--server", nargs="*", default=["1.0:0.9"],
                    help="FedAvgM server SGD as lr:momentum (core grid)")
    ap.add_argument("--only", default=None, help="run only configs whose name contains this")
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed (client sampling, batch orders, initial weights); "
                         "the clients' data stay the same")
    ap.add_argument("--out", default="runs/bench_fedavg")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="smoke test")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the tables and the Dataset from <out>/runs.jsonl; run nothing")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    X, y = dml.datasets.fashion_mnist("train")
    Xt, yt = dml.datasets.fashion_mnist("test")
    K = 100
    caps = {"iid": args.cap_iid, "shards": args.cap_noniid}
    if args.small:
        X, y, Xt, yt, K = X[:3000], y[:3000], Xt[:1000], yt[:1000], 20
        caps = {"iid": 3, "shards": 3}
        args.cap_local = 3
    servers = [tuple(float(v) for v in s.split(":")) for s in args.server]
    configs = make_configs(args.grid, caps, args.cap_local, args.prox_mu, servers, args.seed)
    if args.only:
        configs = [c for c in configs if args.only in c["name"]]
    done_path = out / "runs.jsonl"
    results = []
    if done_path.exists():
        results = [json.loads(line) for line in done_path.read_text().splitlines() if line]
    done = {r["name"] for r in results}
    configs = [] if args.report_only else [c for c in configs if c["name"] not in done]
    if configs:
        run_grid(configs, results, X, y, (Xt, yt), K, args.workers, out, done_path)
    if results:
        write_reports(out, results)
        print()
        print(tables(results))
        for scheme, t in (("iid", "0.8"), ("shards", "0.75")):
            sgd = [r for r in results if r["scheme"] == scheme and r["method"] == "FedSGD"]
            avg = [r for r in results if r["scheme"] == scheme and r["method"] == "FedAvg"
                   and r["E"] == 5 and r["B"] == 10]
            if sgd and avg:
                a = _best(sgd, float(t))["rounds_to"][t]
                b = _best(avg, float(t))["rounds_to"][t]
                if a and b:
                    print(f"{scheme}: FedSGD/FedAvg(E=5,B=10) rounds to {t}: {a}/{b} = "
                          f"{a / b:.1f}x fewer rounds")
        print(f"wrote {out / 'table.md'} and {out / 'fedavg.nc'}")
    return figures_of(results, args.seed)


def figures_of(results, seed=0):
    """Per run: rounds, max and last-10 accuracy, rounds to each target, s/round; and
    FedSGD's rounds / each run's rounds to the same target (same scheme)."""
    figures, notes = [], []
    for r in results:
        if r.get("seed", 0) != seed:
            continue
        name = r["name"]
        figures += [figure(f"{name}: rounds", r["rounds_run"], "rounds"),
                    figure(f"{name}: max test accuracy", r["max_acc"], "accuracy"),
                    figure(f"{name}: mean test accuracy, last 10 rounds", r["last10_acc"],
                         "accuracy"),
                    figure(f"{name}: seconds per round", r["seconds"] / r["rounds_run"], "s")]
        for t, n in r["rounds_to"].items():
            if n is None:
                notes.append(f"{name}: did not reach {t} in {r['rounds_run']} rounds")
            else:
                figures.append(figure(f"{name}: rounds to {t}", n, "rounds"))
        sgd = [q for q in results if q["scheme"] == r["scheme"] and q["method"] == "FedSGD"
               and q.get("seed", 0) == seed]
        if r["method"] != "FedSGD" and sgd:
            for t, n in r["rounds_to"].items():
                m = min((q["rounds_to"][t] for q in sgd if q["rounds_to"][t]), default=None)
                if n and m:
                    figures.append(figure(f"{name}: FedSGD rounds / rounds to {t}", m / n, "x",
                                        peer=f"{r['scheme']}/FedSGD"))
    return {"figures": figures, "notes": notes}


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
