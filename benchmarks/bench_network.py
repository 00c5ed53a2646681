"""Which strategy for which network: Fashion-MNIST MLP over shaped links (benchmarks/netns.py).

For each profile (lan, wan, edge) and worker count, a fresh cluster (scheduler
and workers each in a network namespace) receives the data unshaped, then
its workers' links are shaped and every case trains the 784-256-10 MLP with
SGD(lr 0.1, momentum 0.9), 64 rows per partition per step, until ``--budget``
seconds of the fit's wall time have passed (``--budget-for wan=60``: one
profile's budget); a run stops at its first evaluation past the budget
(``EVAL_EVERY``: every 48 steps or rounds on the LAN, fewer on slow links;
every ``PS_EVAL_EVERY`` PS updates; every FedAvg round). The LAN profile's
links are plain veth pairs; the shaped ones use netem, or the userspace
delay line where the kernel has no netem (the JSON's ``link_kind`` per
profile). Per run: seconds to the first
evaluation at >= 0.85 and >= 0.88 test accuracy (None, printed "> budget",
when not reached: a lower bound), final and best test accuracy, bytes sent
per worker (total and per step) from the history's ``bytes_sent``. Cases:
SyncSGD, local SGD (4, 16), FedAvg, PS async and SSP(2), last-layer-only
fine-tuning from a model pretrained in-process on part of the data, and
SyncSGD under each compression; "-plain" PS cases use SGD(lr 0.1) without
momentum. ``--straggler 2,4`` adds LAN runs with
worker 0 f times slower (sync, PS async, SSP): its gradient calls take f
times as long (``--straggler-kind compute``, as a slower machine's would),
or it is held to 1/f of a CPU (``cpu``: on a 2-core host a worker that
waits on the network uses less than a CPU, so this slows it less than f
times). ``--also 3:lan:sync,fedavg`` adds runs at another worker
count (its profiles joined by +, its cases); ``--side-budget`` sets the budget of
the straggler and ``--also`` runs. ``--lbfgs ROWS`` adds full-batch logistic
regression with L-BFGS on synthetic ROWS x 100 data (placed before the shaping).
Results go to ``--json`` (default ``benchmarks/results/network-<date>-<host>.json``),
rewritten atomically after every run. ``--smoke``: a tiny size for tests.
Needs root and iproute2 (exit code 3 with the reason otherwise).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import netns  # noqa: E402
from benchmarks.worker_faults import hooked, slowed, worker_pid  # noqa: E402

TARGETS = (0.85, 0.88)
ALL_CASES = ("sync", "sync-ls4", "sync-ls16", "fedavg", "ps-async", "ps-ssp2", "lastlayer",
             "sync-fp16", "sync-int8", "sync-topk", "ls16-topk", "fedavg-int8",
             "ps-async-plain", "ps-ssp2-plain")
STRAGGLER_CASES = ("sync", "ps-async", "ps-ssp2", "ps-async-plain", "ps-ssp2-plain")
# Steps between evaluations, per profile: (SyncSGD and its compressions, local SGD, whose
# history step is a round of 16 local steps). A budget can stop a run only at an evaluation:
# 48 local-SGD rounds took 35 s on the WAN, and at 10 Mbit/s 48 steps took 48 s (SyncSGD)
# to 124 s (local SGD). Each SyncSGD evaluation also fetches the parameters and optimizer
# state from a worker (1.6 MB), so its intervals stay the longer; local SGD's values come to
# the driver every round anyway.
EVAL_EVERY = {"lan": (48, 48), "wan": (48, 16), "edge": (12, 6)}
# The driver evaluates on the same 2 cores, about 60 ms of a core per evaluation of the
# 10,000 test rows; the parameter server's loops run on while it does. At 100 updates the
# PS, making about 600 a second on the LAN under a 4x straggler, was evaluated twice as often
# as SyncSGD's 48 steps there (about 7 ms a step), and its evaluations took a third of a
# core from its loops; at 200 both are evaluated about every 0.35 s.
PS_EVAL_EVERY = 200


def build_case(dml, name, profile="lan"):
    """(strategy, eval_every in steps) of case ``name`` on ``profile``."""
    S, PS = dml.SyncSGD, dml.ParameterServer
    every, local = EVAL_EVERY.get(profile, EVAL_EVERY["lan"])
    table = {
        "sync": (lambda: S(batch_size=64), every),
        "sync-ls4": (lambda: S(batch_size=64, local_steps=4), local),
        "sync-ls16": (lambda: S(batch_size=64, local_steps=16), local),
        "fedavg": (lambda: dml.FedAvg(clients_per_round=1.0, local_epochs=1, batch_size=64), 1),
        "fedavg-int8": (lambda: dml.FedAvg(clients_per_round=1.0, local_epochs=1, batch_size=64,
                                           compression="int8"), 1),
        "ps-async": (lambda: PS("async", batch_size=64), PS_EVAL_EVERY),
        "ps-ssp2": (lambda: PS("ssp", staleness=2, batch_size=64), PS_EVAL_EVERY),
        "ps-async-plain": (lambda: PS("async", batch_size=64), PS_EVAL_EVERY),
        "ps-ssp2-plain": (lambda: PS("ssp", staleness=2, batch_size=64), PS_EVAL_EVERY),
        "lastlayer": (lambda: S(batch_size=64, trainable=["layer1"]), every),
        "sync-fp16": (lambda: S(batch_size=64, compression="float16"), every),
        "sync-int8": (lambda: S(batch_size=64, compression="int8"), every),
        "sync-topk": (lambda: S(batch_size=64, compression={"topk": 0.01}), every),
        "ls16-topk": (lambda: S(batch_size=64, local_steps=16, compression={"topk": 0.01}),
                      local),
    }
    make, every = table[name]
    return make(), every


def build_optimizer(dml, name):
    """SGD(lr 0.1, momentum 0.9); the "-plain" cases: SGD(lr 0.1) without momentum."""
    if name.endswith("-plain"):
        return dml.optim.SGD(lr=0.1)
    return dml.optim.SGD(lr=0.1, momentum=0.9)


class Budget:
    """Callback: stop at the first multiple of ``sync_every`` past ``seconds`` of wall time."""

    def __init__(self, seconds, sync_every):
        self.seconds, self.sync_every = float(seconds), int(sync_every)

    def __call__(self, step, record, params):
        return step % self.sync_every == 0 and record["wall_time"] >= self.seconds


def first_reach(history, target):
    """Wall time (s) of the first evaluation with accuracy >= target, else None."""
    acc = np.nan_to_num(history.eval_accuracy.values, nan=-1.0)
    hit = np.flatnonzero(acc >= target)
    return float(history.wall_time.values[hit[0]]) if len(hit) else None


def summarise(history, n_workers, budget):
    acc = history.eval_accuracy.values
    acc = acc[np.isfinite(acc)]
    sent = history.bytes_sent.values
    row = {"steps": int(history.sizes["step"]), "wall_s": float(history.wall_time.values[-1]),
           "final_acc": float(acc[-1]), "best_acc": float(acc.max()),
           "bytes_per_worker": float(sent.sum() / n_workers),
           "bytes_per_step_per_worker": float(sent.mean() / n_workers), "budget_s": budget}
    for t in TARGETS:
        row[f"t{int(t * 100)}"] = first_reach(history, t)
    return row


def fmt_t(value):
    return "> budget" if value is None else f"{value:.1f}"


def pretrain(dml, X, y, seed=0):
    """An MLP trained in this process on the first 12,000 rows: the base of fine-tuning."""
    model = dml.models.MLP([X.shape[1], 256, 10])
    n = min(len(X), 12_000)
    part = dml.partition(X[:n], y[:n], n_partitions=1, seed=seed, client=False)
    res = dml.fit(model, part, dml.SyncSGD(batch_size=64), dml.optim.SGD(lr=0.1, momentum=0.9),
                  epochs=2, client=False, progress=False, seed=seed)
    return res.params


def run_profile(dml, args, profile, n_workers, straggler, cases, data_np, test, pre, out):
    """One fresh cluster for (profile, workers, straggler); every case in turn on it."""
    from distributed import Client

    X, y = data_np
    cpu = straggler if args.straggler_kind == "cpu" else None
    with netns.cluster(n_workers, profile, straggler=cpu, shape_now=False) as cl, \
            Client(cl.address, timeout=60) as client:
        data = dml.partition(X, y, n_partitions=n_workers, seed=0, client=client)
        lbfgs = (lbfgs_problem(dml, args, client, n_workers)
                 if args.lbfgs and not straggler else None)
        cl.shape(profile)
        out.setdefault("link_kind", {})[profile] = cl.network.link_kind
        kind = dml.models.MLP
        if straggler and cpu is None:               # worker 0 computes `straggler` x slower
            w0 = next(a for a, w in client.scheduler_info()["workers"].items()
                      if w["name"] == "w0")
            kind = hooked(kind, worker_pid(client, w0), slowed(straggler))
            out["straggler_kind"] = ("compute: worker 0's gradient calls take f times as long "
                                     "(it sleeps f - 1 times each call's time)")
        elif straggler:
            out["straggler_kind"] = cl.straggler_kind
        model = kind([X.shape[1], 256, 10])
        budget = args.budget_for.get(profile, args.budget)
        for case in cases:
            strategy, every = build_case(dml, case, profile)
            t = time.perf_counter()
            try:
                res = dml.fit(model, data, strategy, build_optimizer(dml, case),
                              steps=10**7 if not case.startswith("fedavg") else None,
                              rounds=10**4 if case.startswith("fedavg") else None,
                              eval_data=test, eval_every=every, client=client, progress=False,
                              init_params=pre if case == "lastlayer" else None,
                              callbacks=[Budget(budget, every)], timeout=120)
                row = summarise(res.history, n_workers, budget)
            except Exception as exc:  # noqa: BLE001 - one failed case is reported, not fatal
                row = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            row.update(profile=profile, workers=n_workers, straggler=straggler, case=case,
                       elapsed_s=time.perf_counter() - t)
            out["runs"].append(row)
            write_json(args.json, out)
            print(_line(row), flush=True)
        if lbfgs is not None:
            row = run_lbfgs(dml, args, client, n_workers, *lbfgs)
            row.update(profile=profile, workers=n_workers, straggler=None, case="lbfgs-logistic")
            out["runs"].append(row)
            write_json(args.json, out)
            print(_line(row), flush=True)


def lbfgs_problem(dml, args, client, n_workers, n_features=100):
    """``(data, X_eval, y_eval)``: ``args.lbfgs`` synthetic logistic rows, placed on the
    workers before the links are shaped (at 10 Mbit/s placing 80 MB alone takes a minute,
    and placement is not what the row measures)."""
    rng = np.random.default_rng(0)
    n = int(args.lbfgs)
    X = rng.normal(size=(n, n_features)).astype(np.float32)
    w = rng.normal(size=n_features).astype(np.float32)
    y = (X @ w + rng.logistic(size=n).astype(np.float32) > 0).astype(np.int64)
    data = dml.partition(X, y, n_partitions=n_workers, seed=0, client=client)
    return data, X[:20000].copy(), y[:20000].copy()


def run_lbfgs(dml, args, client, n_workers, data, X_eval, y_eval):
    """Full-batch logistic regression with L-BFGS on ``data`` (from ``lbfgs_problem``)."""
    n, n_features = int(args.lbfgs), X_eval.shape[1]
    t = time.perf_counter()
    try:
        res = dml.fit(dml.models.Logistic(n_features), data, dml.SyncSGD(batch_size=None),
                      dml.optim.LBFGS(max_iter=args.lbfgs_iter, tol=1e-8), steps=args.lbfgs_iter,
                      client=client, progress=False, timeout=120,
                      eval_data=(X_eval, y_eval), eval_every=args.lbfgs_iter)
        h = res.history
        return {"rows": n, "features": n_features, "iterations": int(h.sizes["step"]),
                "wall_s": float(h.wall_time.values[-1]), "final_loss": float(h.loss.values[-1]),
                "final_acc": float(np.nanmax(h.eval_accuracy.values)),
                "bytes_per_worker": float(h.bytes_sent.values.sum() / n_workers),
                "elapsed_s": time.perf_counter() - t}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def _line(row):
    head = f"{row['profile']:5s} w={row['workers']} s={row['straggler'] or '-'} {row['case']:15s}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    if row["case"] == "lbfgs-logistic":
        return (f"{head} {row['iterations']} it in {row['wall_s']:.1f} s, loss "
                f"{row['final_loss']:.4f}, acc {row['final_acc']:.4f}, "
                f"{row['bytes_per_worker'] / 1e3:.1f} kB/worker")
    return (f"{head} t85 {fmt_t(row['t85']):>8s}  t88 {fmt_t(row['t88']):>8s}  final "
            f"{row['final_acc']:.4f} best {row['best_acc']:.4f}  {row['steps']} steps  "
            f"{row['bytes_per_worker'] / 1e6:.1f} MB/worker "
            f"({row['bytes_per_step_per_worker'] / 1e3:.1f} kB/step)")


def write_json(path, obj):
    """Write ``obj`` to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "kernel": platform.release()}


def measure(argv=None):
    """Parse ``argv``, run every (profile, workers, straggler) and return the results dict;
    None (the reason printed to stderr) where namespaces cannot be made here."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profiles", default="lan,wan,edge")
    p.add_argument("--workers", default="2")
    p.add_argument("--budget", type=float, default=30.0, help="seconds of fit per run")
    p.add_argument("--budget-for", default="",
                   help="per-profile budgets overriding --budget, e.g. wan=60,edge=60")
    p.add_argument("--side-budget", type=float, default=None,
                   help="seconds of fit per straggler and --also run (default: --budget)")
    p.add_argument("--straggler", default="", help="slow-down factors, e.g. 2,4 (LAN runs)")
    p.add_argument("--straggler-kind", choices=("compute", "cpu"), default="compute",
                   help="compute: worker 0's gradients take f x as long; cpu: worker 0 held "
                        "to 1/f of a CPU (a cgroup quota)")
    p.add_argument("--cases", default=",".join(ALL_CASES))
    p.add_argument("--straggler-cases", default=",".join(STRAGGLER_CASES))
    p.add_argument("--also", action="append", default=[], metavar="N:PROFILES:CASES",
                   help="more runs at another worker count, e.g. 3:lan:sync,fedavg (PROFILES "
                        "joined by +); repeatable")
    p.add_argument("--lbfgs", type=int, default=200_000, help="rows (0: skip)")
    p.add_argument("--lbfgs-iter", type=int, default=30)
    p.add_argument("--json", default=None)
    p.add_argument("--append", action="store_true", help="keep the runs already in --json")
    p.add_argument("--smoke", action="store_true", help="tiny data and budget (tests)")
    args = p.parse_args(argv)
    try:
        args.budget_for = {k.strip(): float(v) for k, v in
                           (item.split("=") for item in args.budget_for.split(",") if item)}
    except ValueError:
        p.error(f"--budget-for: expected PROFILE=SECONDS[,...], got {args.budget_for!r}")
    unknown = set(args.budget_for) - set(netns.PROFILES)
    if unknown:
        p.error(f"--budget-for: no profile {', '.join(sorted(unknown))}")
    try:
        also = [parse_also(spec) for spec in args.also]
    except ValueError as exc:
        p.error(f"--also: {exc}")
    reason = netns.unavailable()
    if reason:
        print(f"bench_network: skipped: {reason}", file=sys.stderr)
        return None
    import dmlcore as dml

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    if args.json is None:
        args.json = (Path(__file__).parent / "results"
                     / f"network-{date}-{socket.gethostname()}.json")
    X, y = dml.datasets.fashion_mnist("train")
    Xt, yt = dml.datasets.fashion_mnist("test")
    if args.smoke:
        X, y, Xt, yt = X[:6000], y[:6000], Xt[:1000], yt[:1000]
        args.lbfgs = min(args.lbfgs, 5000)
        args.lbfgs_iter = min(args.lbfgs_iter, 5)
    wants_pre = "lastlayer" in args.cases.split(",") + [c for _, _, cs in also for c in cs]
    pre = pretrain(dml, X, y) if wants_pre else None
    out = {"benchmark": "bench_network", "date": date, "machine": machine(),
           "profiles": {k: vars(v) for k, v in netns.PROFILES.items()},
           "recipe": "MLP 784-256-10, SGD(lr=0.1, momentum=0.9), 64 rows/partition/step",
           "budget_s": args.budget, "budget_for": args.budget_for,
           "side_budget_s": args.side_budget, "smoke": args.smoke,
           "runs": []}
    if args.append and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        out["runs"] = old.get("runs", [])
        kinds = old.get("link_kind")                # one per profile (a str before)
        out["link_kind"] = dict(kinds) if isinstance(kinds, dict) else {}
        if "straggler_kind" in old:
            out["straggler_kind"] = old["straggler_kind"]
    # the straggler and --also runs: no L-BFGS row, and --side-budget's budget where given
    side = {} if args.side_budget is None else {"budget": args.side_budget, "budget_for": {}}
    side_args = argparse.Namespace(**{**vars(args), "lbfgs": 0, **side})
    for n_workers in [int(w) for w in args.workers.split(",") if w]:
        for profile in [s for s in args.profiles.split(",") if s]:
            run_profile(dml, args, profile, n_workers, None, args.cases.split(","),
                        (X, y), (Xt, yt), pre, out)
        for factor in [float(f) for f in args.straggler.split(",") if f]:
            run_profile(dml, side_args, "lan", n_workers, factor,
                        args.straggler_cases.split(","), (X, y), (Xt, yt), None, out)
    for n_workers, profiles, cases in also:
        for profile in profiles:
            run_profile(dml, side_args, profile, n_workers, None, cases, (X, y), (Xt, yt), pre,
                        out)
    print(f"wrote {args.json}")
    return out


def parse_also(spec):
    """``"3:lan+wan:sync,fedavg"`` -> (3, ["lan", "wan"], ["sync", "fedavg"])."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) < 1:
        raise ValueError(f"expected WORKERS:PROFILES:CASES, got {spec!r}")
    profiles = [x for x in parts[1].split("+") if x]
    cases = [x for x in parts[2].split(",") if x]
    bad = ([x for x in profiles if x not in netns.PROFILES]
           + [x for x in cases if x not in ALL_CASES])
    if bad or not profiles or not cases:
        raise ValueError(f"{spec!r}: unknown or missing profile / case {', '.join(bad)}")
    return int(parts[0]), profiles, cases


def _name(row):
    where = f"{row['profile']}, {row['workers']} workers"
    if row.get("straggler"):
        where += f", {row['straggler']:g}x straggler"
    return f"{where}: {row['case']}"


def figures(out):
    """The runner's figures and notes from ``measure``'s results: per run the time to each
    target (absent where not reached within the budget: a note says so), final accuracy and
    bytes per step per worker; per profile the ratios of each case's time to 0.85 and
    bytes per step against plain SyncSGD's ("sync") in the same cluster."""
    from benchmarks.runner import figure, ratio

    figs, notes = [], []
    runs = [r for r in out["runs"] if "error" not in r]
    for row in out["runs"]:
        if "error" in row:
            notes.append(f"{_name(row)} failed: {row['error'][:200]}")
    for row in runs:
        name = _name(row)
        if row["case"] == "lbfgs-logistic":
            figs += [figure(f"{name}: seconds", row["wall_s"], "s"),
                     figure(f"{name}: iterations", row["iterations"], "iterations"),
                     figure(f"{name}: accuracy", row["final_acc"], "accuracy"),
                     figure(f"{name}: bytes per worker", row["bytes_per_worker"], "bytes")]
            continue
        figs += [figure(f"{name}: final test accuracy", row["final_acc"], "accuracy"),
                 figure(f"{name}: best test accuracy", row["best_acc"], "accuracy"),
                 figure(f"{name}: steps", row["steps"], "steps"),
                 figure(f"{name}: bytes per step per worker", row["bytes_per_step_per_worker"],
                        "bytes")]
        for t in TARGETS:
            value = row.get(f"t{int(t * 100)}")
            if value is None:
                notes.append(f"{name} did not reach {t:g} in its {row['budget_s']:g} s budget")
            else:
                figs.append(figure(f"{name}: time to {t:g}", value, "s"))
    base = {(r["profile"], r["workers"], r.get("straggler")): r for r in runs
            if r["case"] == "sync"}
    for row in runs:
        ref = base.get((row["profile"], row["workers"], row.get("straggler")))
        if ref is None or row is ref or row["case"] == "lbfgs-logistic":
            continue
        peer = _name(ref)
        if row.get("t85") and ref.get("t85"):
            figs.append(ratio(f"{_name(row)}: time to 0.85, sync / this", ref["t85"] / row["t85"],
                              peer))
        if row["bytes_per_step_per_worker"] > 0:
            figs.append(ratio(f"{_name(row)}: bytes per step, sync / this",
                              ref["bytes_per_step_per_worker"]
                              / row["bytes_per_step_per_worker"], peer))
    notes += [f"{profile} links: {kind}" for profile, kind in out.get("link_kind", {}).items()]
    figs.append(figure("budget per run", out["budget_s"], "s"))
    budgets = {_name(r).rsplit(": ", 1)[0]: r["budget_s"] for r in runs if "budget_s" in r}
    figs += [figure(f"{where}: budget per run", b, "s") for where, b in sorted(budgets.items())]
    return {"figures": figs, "notes": notes}


def run(argv=None):
    """The runner's entry: ``measure`` then ``figures``; exit code 3 where it cannot run."""
    out = measure(argv)
    if out is None:
        raise SystemExit(3)
    return figures(out)


def main(argv=None):
    return 0 if measure(argv) is not None else 3


if __name__ == "__main__":
    sys.exit(main())
