"""``python -m benchmarks``: run every ``benchmarks/bench_*.py`` and write one results JSON.

Each benchmark runs in its own child process (``python -m benchmarks.runner
--child NAME OUT -- ARGS``) under a deadline; the child calls the script's
``run(argv) -> list of figures`` (its printed output goes to the runner's
stdout) and writes the figures to OUT. A figure is a dict ``name, value,
unit`` (a ratio has unit ``"x"`` and names its ``peer``); a benchmark's
``notes`` (e.g. a target not reached) go beside its figures.

The results file ``benchmarks/results/<date>-<host>.json`` (``--out DIR``
elsewhere) holds the machine's description and, per benchmark, its status
(``ok``, ``skipped`` with the reason, ``failed`` with the error), arguments,
seconds and figures; it is written to a temporary file and renamed. A
benchmark is skipped, with the reason, when its data, an optional module or
what its ``Spec.unavailable`` checks (bench_network: root and iproute2 for its
network namespaces) is missing, or when its child exits 3 after printing
``NAME: skipped: REASON``. The command exits 1 when any benchmark failed
(after writing the file).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Spec:
    """How the runner calls one benchmark: arguments at full and at --quick size."""
    full: list = field(default_factory=list)
    quick: list = field(default_factory=list)
    fashion_mnist: bool = False        # needs the Fashion-MNIST files
    needs: tuple = ()                  # optional modules; absent -> skipped with the reason
    workers: bool = False              # takes --workers 1,2,...
    timeout: float = 900.0             # seconds, full size (quick: a fifth, at least 120)
    unavailable: object = None         # () -> why it cannot run here (skipped), or None


def _network_unavailable():
    """Why bench_network cannot make its network namespaces here (root, iproute2), or None."""
    from benchmarks import netns

    reason = netns.unavailable()
    return f"{reason} (benchmarks/netns.py)" if reason else None


SPECS = {
    "bench_kernels": Spec(["--loss-only"], ["--loss-only", "--rows", "20000", "--cols", "20",
                                            "--repeat", "2"]),
    "bench_mlp_optim": Spec([], ["--small"]),
    "bench_convex": Spec(["--rows", "1000000"],
                         ["--rows", "10000", "--cols", "10", "--chunks", "4"]),
    "bench_estimator": Spec(["--rows", "1000000", "--weighted", "--skip-iid"],
                            ["--rows", "10000", "--cols", "10", "--chunks", "4", "--weighted",
                             "--skip-iid"]),
    "bench_sync_step": Spec(["--rows", "1000000", "--steps", "100"],
                            ["--rows", "10000", "--cols", "10", "--steps", "10"]),
    # The L1 fit on 1M rows (C scaled with them: about 1% non-zero as at 2M): saga alone
    # took 114 s on 2M rows, 56 s on 1M.
    "bench_sparse": Spec(["--rows", "2000000", "--repeat", "3", "--fit", "--fit-rows", "2000000",
                          "--l1", "--l1-rows", "1000000", "--l1-C", "0.03", "--saga-tol", "1e-3"],
                         ["--rows", "10000", "--cols", "2000", "--repeat", "2", "--fit",
                          "--fit-rows", "3000", "--l1", "--l1-C", "0.05"]),
    "bench_fashion_mlp": Spec([], ["--small"], fashion_mnist=True),
    "bench_compression": Spec([], ["--small"], fashion_mnist=True),
    "bench_fedavg": Spec(["--cap-iid", "100", "--cap-noniid", "120", "--cap-local", "30",
                          "--out", "{tmp}/fedavg"],
                         ["--small", "--only", "iid/", "--out", "{tmp}/fedavg"],
                         fashion_mnist=True, timeout=1200),
    "bench_partial": Spec([], ["--small", "--fedavg-rounds", "1"], fashion_mnist=True),
    "bench_ps": Spec([], ["--small"], fashion_mnist=True),
    "bench_tls": Spec(["--steps", "200"], ["--small", "--steps", "10", "--repeat", "1",
                                           "--skip-mlp"]),
    "bench_export": Spec([], ["--small", "--epochs", "1"], fashion_mnist=True),
    "bench_torch": Spec(["--epochs", "10", "--grid"], ["--small"], fashion_mnist=True,
                        needs=("torch",), workers=True),
    "bench_soak": Spec([], ["--small"], timeout=900),
    # --quick: the replicated and the L-BFGS cases (the driver and local-SGD cases run the
    # same script code with other keywords; tests/test_recovery.py covers all of them)
    "bench_recovery": Spec([], ["--small", "--sync-cases", "replicas,lbfgs"], timeout=900),
    # Each case trains for --budget seconds of fit time on a fresh namespaced cluster per
    # profile (40 on the WAN, where SyncSGD needs more than 20 to come near 0.85; 15 for the
    # straggler and 3-worker runs, whose rows compare times to 0.85); the full
    # size is a subset of bench_network's cases that fits the 30 minutes.
    "bench_network": Spec(["--profiles", "lan,wan,edge", "--workers", "2", "--budget", "20",
                           "--budget-for", "wan=40", "--side-budget", "15",
                           "--cases", "sync,sync-ls16,ls16-topk,fedavg,fedavg-int8,"
                           "ps-async-plain",
                           "--straggler", "2,4", "--straggler-cases", "sync,ps-async-plain",
                           "--also", "3:lan:sync,ls16-topk,fedavg-int8,ps-async-plain",
                           "--lbfgs", "200000", "--json", "{tmp}/network.json"],
                          ["--smoke", "--profiles", "lan", "--workers", "2", "--budget", "3",
                           "--cases", "sync,sync-topk", "--lbfgs", "0",
                           "--json", "{tmp}/network.json"],
                          fashion_mnist=True, unavailable=_network_unavailable, timeout=1500),
}


# ---- figures --------------------------------------------------------------------
def figure(name, value, unit, peer=None, **extra):
    """One figure: ``name``, ``value`` (a float), ``unit``; a ratio (unit "x") names its peer."""
    out = {"name": name, "value": float(value), "unit": unit}
    if peer is not None:
        out["peer"] = peer
    out.update(extra)
    return out


def ratio(name, value, peer, **extra):
    return figure(name, value, "x", peer=peer, **extra)


def check_figures(figures):
    """Problems with a benchmark's figures (empty when none): non-finite values,
    ratios that are not positive or name no peer, duplicated names."""
    problems, seen = [], set()
    for f in figures:
        name = f.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"a figure without a name: {f!r}")
            continue
        if name in seen:
            problems.append(f"{name}: the name appears twice")
        seen.add(name)
        value = f.get("value")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{name}: value {value!r} is not finite")
            continue
        if not f.get("unit"):
            problems.append(f"{name}: no unit")
        if f.get("unit") == "x":
            if not f.get("peer"):
                problems.append(f"{name}: a ratio names no peer")
            if value <= 0:
                problems.append(f"{name}: ratio {value!r} is not positive")
    return problems


# ---- adapters for scripts without run() (bench_export belongs to another file owner) ----
def _export_figures(results):
    (f_size, f_acc, f_t, f_pred), (q_size, q_acc, q_t, q_pred) = results.values()
    import numpy as np

    return [figure("float model size", f_size, "bytes"),
            figure("int8 model size", q_size, "bytes"),
            figure("float model test accuracy", f_acc, "accuracy"),
            figure("int8 model test accuracy", q_acc, "accuracy"),
            figure("accuracy change int8 - float", 100 * (q_acc - f_acc), "points"),
            figure("same label as the float model", float(np.mean(q_pred == f_pred)), "share"),
            figure("float predict time", f_t, "s"),
            figure("int8 predict time", q_t, "s"),
            ratio("size int8 / float", q_size / f_size, "float model.npz"),
            ratio("predict time int8 / float", q_t / f_t, "float model.npz")]


ADAPTERS = {"bench_export": _export_figures}


def _child(name, out, argv):
    """Run one benchmark in this process and write {figures, notes} to ``out``."""
    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(f"benchmarks.{name}")
    if hasattr(module, "run"):
        result = module.run(argv)
    elif name in ADAPTERS:
        result = ADAPTERS[name](module.main(argv))
    else:
        raise SystemExit(f"{name} has no run(argv) and no adapter in benchmarks/runner.py")
    notes = []
    if isinstance(result, dict):
        result, notes = result["figures"], result.get("notes", [])
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps({"figures": result, "notes": notes}, allow_nan=True))
    os.replace(tmp, out)


# ---- machine --------------------------------------------------------------------
def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(dist):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine():
    """CPU, cores, memory, BLAS (threadpoolctl) and the versions of the stack."""
    import numpy  # noqa: F401  (loads NumPy's BLAS)
    import scipy.linalg  # noqa: F401  (SciPy's, which dmlcore's kernels call)
    from threadpoolctl import threadpool_info

    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads",
                                   "threading_layer", "filepath")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "platform": platform.platform(),
        "blas": blas,
        "load_average_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git_commit": commit,
        "versions": {"python": platform.python_version(),
                     **{d: _version(d) for d in ("numpy", "scipy", "dask", "distributed",
                                                 "scikit-learn", "dask-ml", "torch",
                                                 "dmlcore")}},
    }


def fashion_mnist_available():
    from dmlcore import datasets

    directory = datasets._fashion_mnist_dir()
    return all(datasets._find_idx(directory, stem) is not None
               for pair in datasets._FMNIST_FILES.values() for stem in pair)


FASHION_MNIST_MISSING = ("needs the Fashion-MNIST files: `apt-get install dataset-fashion-mnist` "
                         "(/usr/share/datasets/fashion-mnist) or DMLCORE_DATA set to a directory "
                         "holding the four *-ubyte.gz files")


def discover():
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def _missing_module(names):
    import importlib.util

    for name in names:
        if importlib.util.find_spec(name) is None:
            return name
    return None


# A child that exits with this code after printing "NAME: skipped: REASON" to stderr as its
# last line found at run time that it cannot run here (bench_network without namespaces).
SKIPPED_EXIT = 3


def run_one(name, quick, workers, tmp, echo=True):
    """One benchmark's entry of the results file."""
    spec = SPECS.get(name)
    entry = {"status": None, "args": None, "seconds": None, "figures": [], "notes": []}
    if spec is None:
        entry.update(status="skipped", reason="not registered in benchmarks/runner.py SPECS")
        return entry
    if spec.fashion_mnist and not fashion_mnist_available():
        entry.update(status="skipped", reason=FASHION_MNIST_MISSING)
        return entry
    why = spec.unavailable() if spec.unavailable else None
    if why:
        entry.update(status="skipped", reason=why)
        return entry
    absent = _missing_module(spec.needs)
    if absent:
        entry.update(status="skipped", reason=f"{absent} is not installed (pip install "
                                               f"'.[bench]')")
        return entry
    argv = [a.replace("{tmp}", str(tmp)) for a in (spec.quick if quick else spec.full)]
    if spec.workers and workers:
        argv += ["--workers", ",".join(map(str, workers))]
    entry["args"] = argv
    out = Path(tmp) / f"{name}.json"
    timeout = max(120.0, spec.timeout / 5) if quick else spec.timeout
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.runner", "--child", name,
                               str(out), "--", *argv], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        entry.update(status="failed", seconds=time.perf_counter() - t0,
                     error=f"timed out after {timeout:.0f} s")
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        if echo:
            print(stdout, flush=True)
        return entry
    entry["seconds"] = time.perf_counter() - t0
    if echo:
        print(proc.stdout, end="", flush=True)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    if proc.returncode == SKIPPED_EXIT and lines and ": skipped: " in lines[-1]:
        entry.update(status="skipped", reason=lines[-1].split(": skipped: ", 1)[1])
        return entry
    if proc.returncode != 0 or not out.exists():
        entry.update(status="failed", error=(lines[-1] if lines else f"exit {proc.returncode}"),
                     stderr_tail=proc.stderr[-3000:])
        return entry
    data = json.loads(out.read_text())
    entry.update(figures=data["figures"], notes=data["notes"])
    problems = check_figures(entry["figures"])
    if problems:
        entry.update(status="failed", error="bad figures: " + "; ".join(problems))
    else:
        entry["status"] = "ok"
    return entry


def write_json(path, payload):
    """Write ``payload`` to ``path`` through a temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        name, out = argv[1], argv[2]
        rest = argv[4:] if argv[3:4] == ["--"] else argv[3:]
        _child(name, out, rest)
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes (under 3 minutes)")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the results file")
    parser.add_argument("--only", default=None,
                        help="comma-separated benchmark names (bench_kernels or kernels)")
    parser.add_argument("--workers", default="1,2",
                        help="worker counts for the benchmarks that take them (e.g. 1,2,4,8,16)")
    parser.add_argument("--conditions", default=None,
                        help="a sentence on the conditions of the run, kept in the file "
                             "(e.g. 'the host was shared with other jobs')")
    args = parser.parse_args(argv)
    names = discover()
    if args.only:
        wanted = {w if w.startswith("bench_") else f"bench_{w}"
                  for w in args.only.split(",") if w}
        unknown = wanted - set(names)
        if unknown:
            parser.error(f"--only: no benchmark {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(names)})")
        names = [n for n in names if n in wanted]
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    started = _dt.datetime.now(_dt.timezone.utc)
    payload = {"date": started.isoformat(timespec="seconds"), "quick": args.quick,
               "command": shlex.join(["python", "-m", "benchmarks", *argv]),
               "conditions": args.conditions, "machine": machine(), "benchmarks": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmlcore-bench-") as tmp:
        for name in names:
            print(f"\n===== {name} =====", flush=True)
            entry = run_one(name, args.quick, workers, tmp)
            payload["benchmarks"][name] = entry
            print(f"----- {name}: {entry['status']}"
                  + (f" ({entry['seconds']:.1f} s)" if entry["seconds"] else "")
                  + (f": {entry.get('reason') or entry.get('error')}"
                     if entry["status"] != "ok" else ""), flush=True)
    payload["seconds"] = time.perf_counter() - t0
    payload["machine"]["load_average_end"] = (os.getloadavg()[0]
                                              if hasattr(os, "getloadavg") else None)
    path = Path(args.out) / f"{started:%Y-%m-%d}-{payload['machine']['host']}.json"
    write_json(path, payload)
    failed = [n for n, e in payload["benchmarks"].items() if e["status"] == "failed"]
    print(f"\nwrote {path} ({payload['seconds']:.0f} s); "
          + (f"FAILED: {', '.join(failed)}" if failed else "no failures"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
