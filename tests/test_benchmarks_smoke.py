"""Every benchmark script runs end to end at a tiny size and prints the figures it promises.

The values are not judged (speed lives in the benchmarks themselves): each
expected line must be there, its figures must parse as finite, positive numbers
(accuracies in (0, 1]), and the peers it compares against must be named.
"""
import math
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FASHION_MNIST_SKIP, fashion_mnist_available

# Without the Fashion-MNIST files these tests are skipped, the reason saying how to install them.
NEEDS_FASHION_MNIST_FILES = pytest.mark.skipif(not fashion_mnist_available(),
                                               reason=FASHION_MNIST_SKIP)

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

SMALL_ARGS = {
    "bench_kernels.py": ["--rows", "20000", "--cols", "20", "--repeat", "2"],
    "bench_mlp_optim.py": ["--small"],
    "bench_compression.py": ["--small"],
    "bench_convex.py": ["--rows", "20000", "--cols", "10", "--chunks", "4"],
    "bench_estimator.py": ["--rows", "20000", "--cols", "10", "--chunks", "4", "--weighted"],
    "bench_sync_step.py": ["--rows", "20000", "--cols", "10", "--steps", "20"],
    "bench_fashion_mlp.py": ["--small"],
    "bench_fedavg.py": ["--small"],
    "bench_partial.py": ["--small"],
    "bench_ps.py": ["--small"],
    "bench_torch.py": ["--small", "--grid", "--epochs", "1", "--workers", "1,2"],
    "bench_tls.py": ["--small", "--steps", "20", "--repeat", "1"],
    "bench_sparse.py": ["--rows", "20000", "--cols", "2000", "--repeat", "2", "--fit",
                        "--fit-rows", "5000", "--l1", "--l1-C", "0.05"],
}


# A figure as printed: 12, 1.5, 3.99e-10, 7,481; nan and inf are captured so that they fail
# the finiteness check with a clear message instead of failing to match.
N = r"(nan|inf|[-+]?\d[\d,]*(?:\.\d*)?(?:e[-+]?\d+)?)"
A = "acc"        # marks a pattern whose figures are accuracies: in (0, 1]

# For each script: (pattern, kind) pairs, each of which must match a line of stdout
# (re.MULTILINE; every group is a figure), and the peers' names that must appear.
FIGURES = {
    "bench_compression.py": [         # bytes per step, test accuracy
        (rf"^  none\s+{N}\s+[\d.]+x\s+{N}", A),
        (rf"^  float16\s+{N}\s+[\d.]+x\s+{N}", A),
        (rf"^  int8\s+{N}\s+[\d.]+x\s+{N}", A),
        (rf"^  topk 1%\s+{N}\s+[\d.]+x\s+{N}", A),
        (rf"^  topk 1% EF only\s+{N}\s+[\d.]+x\s+{N}", A)],
    "bench_convex.py": [
        (rf"^dmlcore lbfgs\s+{N}\s+{N}", None),                      # time, objective
        (rf"^dask-ml lbfgs\s+{N}\s+{N}\s+\S+\s+{N}x", None),          # time, objective, ratio
        (rf"dmlcore vs dask-ml lbfgs: {N}x faster", None),
        (rf"dmlcore vs scikit-learn lbfgs \(1 process\): {N}x faster", None)],
    "bench_estimator.py": [
        (rf"^dmlcore, chunks in place\s+{N}\s+{N}", None),
        (rf"^dask-ml lbfgs\s+{N}\s+{N}\s+{N}x", None),
        (rf"weighted \(all 1\) / unweighted fit time, both warm: {N}", None),
        (rf"dmlcore LogisticRegression vs dask-ml lbfgs: {N}x faster", None)],
    "bench_fashion_mlp.py": [
        (rf"scikit-learn MLPClassifier\(100,\), max_iter=20:\s+{N} s", None),
        (rf"test accuracy {N}", A),
        (rf"dmlcore MLPClassifier\(256,\) defaults, 2 workers:\s+{N} s \({N} s in the "
         rf"training loop, {N} epochs, {N} steps, {N} ms/step\)", None),
        (rf"time ratio dmlcore / scikit-learn: {N}", None)],
    "bench_fedavg.py": [
        (rf"^iid/FedSGD/\S+: rounds {N},.* max acc {N}, last-10 mean {N}", A),
        (rf"^iid/FedAvg/\S+: rounds {N},.*\({N} s/round\)", None),
        (rf"^shards/FedProx/\S+:.* max acc {N}", A),
        (rf"^\| FedAvg \| 5 \| 10 \|.* \| {N} \|$", A)],        # non-IID max acc
    "bench_kernels.py": [
        (rf"stream \(np\.add\.reduce\)\s+{N} ms\s+{N} GB/s", None),
        (rf"logistic f64 / stream\s+{N}", None),
        (rf"numpy / logistic f64\s+{N}", None),
        (rf"numpy / softmax K=10 f64\s+{N}", None),
        (rf"weighted / unweighted logistic\s+{N}", None)],
    "bench_mlp_optim.py": [
        (rf"^float32\s+64\s+{N}\s+{N}\s+{N}\s+{N}\s+{N}", None),   # dmlcore, numpy, ratio
        (rf"^float64\s+256\s+{N}\s+{N}\s+{N}\s+{N}\s+{N}", None),
        (rf"rows\s+64: dmlcore {N} ms", None),
        (rf"^numpy \(in place\)\s+{N}\s+{N}\s+{N}\s+\d+\s+{N}", None)],
    "bench_partial.py": [
        (rf"pretrained {N} steps on {N} rows in {N} s: test accuracy {N}", None),
        (rf"^\| SyncSGD \| last layer \| {N} \| {N} \| {N} \| {N} \| {N} ms \| True \|$",
         None),
        (rf"^\| FedAvg\S* K=20 \| last layer \| {N} \| {N} \| {N} \| {N} \| {N} ms \| True \|$",
         None),
        (rf"layer2 \(last\)\s+{N} ms\s+\({N}x faster than all\)", None)],
    "bench_ps.py": [
        (rf"^\| async \| {N} \| {N} \| {N} \| {N} \|", None),
        (rf"^\| sync \| {N} \| {N} \| {N} \| {N} \|", None),
        (rf"^  async\s+updates/s x{N}\s+rows/s x{N}", None),
        (rf"^  ssp\(2\)\s+updates/s x{N}\s+rows/s x{N}", None),
        (rf"^  bsp\s+updates/s x{N}\s+rows/s x{N}", None),
        (rf"^  async\s+done: {N} updates/s, acc {N}", None)],
    "bench_sparse.py": [
        (rf"logistic kernel / \(stream \+ scatter\)\s+{N}", None),
        (rf"scipy / logistic kernel\s+{N}", None),
        (rf"scikit-learn lbfgs \(1 process\)\s+{N} s\s+objective {N}", None),
        (rf"dmlcore \(2 workers\)\s+{N} s\s+objective {N}.*sklearn time / this {N}x", None),
        (rf"dmlcore, data partitioned before \(2 workers\)\s+{N} s\s+objective {N}.*"
         rf"sklearn time / this {N}x", None),
        (rf"scikit-learn saga \(tol {N}\): {N} s, {N} epochs, objective {N}", None),
        (rf"time to saga's objective: dmlcore {N} s vs saga {N} s: {N}x faster", None)],
    "bench_sync_step.py": [
        (rf"dmlcore SyncSGD \(actors\)\s+{N} ms/step", None),
        (rf"naive Dask \(submit \+ gather \+ sum\)\s+{N} ms/step", None),
        (rf"ratio naive / dmlcore: {N}x", None),
        (rf"dmlcore SyncSGD step:\s+{N} ms", None),
        (rf"dmlcore is {N}x faster", None),
        (rf"local_steps=\s*16:\s+{N} ms per synchronisation,\s+{N} ms per local step "
         rf"\({N}x throughput\)", None)],
    "bench_torch.py": [
        (rf"dmlcore epoch on 2 workers / .* epoch: {N}", None),
        (rf"^Adam lr 0.002, cosine, 512 rows\s+\S+ / {N}\s+\S+ / {N}\s+\S+ / {N}$", A)],
    "bench_tls.py": [
        (rf"full batch, driver updates\s+tcp\s+{N} ms\s+tls\s+{N} ms\s+ratio {N}", None),
        (rf"batch 16, replicated optimizer\s+tcp\s+{N} ms\s+tls\s+{N} ms\s+ratio {N}", None),
        (rf"tcp\s+{N} s \(accuracy {N}\)\s+tls\s+{N} s \(accuracy {N}\)\s+ratio {N}", None),
        (rf"loopback bytes/step tcp {N}\s+tls {N}", None)],
}

PEERS = {
    "bench_compression.py": ["none"],
    "bench_convex.py": ["dask-ml", "scikit-learn"],
    "bench_estimator.py": ["dask-ml"],
    "bench_fashion_mlp.py": ["scikit-learn"],
    "bench_fedavg.py": ["FedSGD", "FedProx", "FedAvgM"],
    "bench_kernels.py": ["numpy"],
    "bench_mlp_optim.py": ["numpy"],
    "bench_partial.py": ["all layers"],
    "bench_ps.py": ["sync", "bsp", "ssp(2)"],
    "bench_sparse.py": ["scipy", "scikit-learn", "dask-ml"],
    "bench_sync_step.py": ["naive Dask"],
    "bench_tls.py": ["tcp", "tls"],
    "bench_torch.py": ["PyTorch"],
}


def check_figures(script, stdout):
    """Every promised line is printed with finite, positive figures; the peers are named."""
    for pattern, kind in FIGURES[script]:
        match = re.search(pattern, stdout, re.MULTILINE)
        assert match, f"{script}: no line matching {pattern!r} in:\n{stdout[-3000:]}"
        for text in match.groups():
            value = float(text.replace(",", ""))
            assert math.isfinite(value) and value > 0, (
                f"{script}: figure {text!r} is not finite and positive in {match.group(0)!r}")
            if kind == A and "." in text:
                assert value <= 1, f"{script}: accuracy {text!r} > 1 in {match.group(0)!r}"
    for peer in PEERS[script]:
        assert peer in stdout, f"{script}: the peer {peer!r} is not named in its output"


# Smoke-run in their own test files: the export (tests/test_export.py), the network
# harness (tests/test_network_harness.py, which needs root for its namespaces) and the soak
# (tests/test_bench_soak.py).
SMOKED_ELSEWHERE = {"bench_export.py", "bench_network.py", "bench_soak.py",
                    "bench_recovery.py"}    # tests/test_bench_recovery.py


def test_every_benchmark_has_a_smoke_run():
    scripts = sorted(p.name for p in BENCH.glob("bench_*.py") if p.name not in SMOKED_ELSEWHERE)
    assert scripts == sorted(SMALL_ARGS)
    assert sorted(FIGURES) == sorted(PEERS) == sorted(SMALL_ARGS)


NEEDS_FASHION_MNIST = {"bench_compression.py", "bench_torch.py", "bench_fashion_mlp.py", "bench_fedavg.py", "bench_partial.py", "bench_ps.py"}


# Seconds each: the two kernel benchmarks stay in the quick subset (-m "not slow").
QUICK = {"bench_kernels.py", "bench_mlp_optim.py"}


NEEDS_TORCH = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="bench_torch.py needs PyTorch: pip install -e '.[bench]'")


def _marks(script):
    return ([NEEDS_FASHION_MNIST_FILES] if script in NEEDS_FASHION_MNIST else []) + (
        [NEEDS_TORCH] if script == "bench_torch.py" else []) + (
        [] if script in QUICK else [pytest.mark.slow])


@pytest.mark.parametrize("script", [pytest.param(s, marks=_marks(s)) for s in sorted(SMALL_ARGS)])
def test_benchmark_smoke(script, tmp_path):
    root = str(BENCH.parent)
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(BENCH / script), *SMALL_ARGS[script]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    check_figures(script, proc.stdout)


# ---- the runner: `python -m benchmarks --quick` on a subset ---------------------------
# The whole --quick run takes minutes here; this smokes the runner end to end on the fast
# benchmarks (and bench_network, which needs root for its namespaces and is skipped with the
# reason elsewhere), in well under a minute: the results file, the machine, finite figures.
RUNNER_SUBSET = ("bench_kernels", "bench_mlp_optim", "bench_network")

sys.path.insert(0, str(BENCH.parent))
from benchmarks import readme as bench_readme, runner  # noqa: E402


def test_every_benchmark_script_is_registered_in_the_runner():
    assert sorted(runner.SPECS) == runner.discover()


@pytest.mark.slow
def test_runner_quick_subset_writes_finite_figures(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        filter(None, [str(BENCH.parent), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only",
                           ",".join(RUNNER_SUBSET), "--out", str(out)], cwd=BENCH.parent,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = out.glob("*.json")
    payload = json.loads(path.read_text())
    assert payload["quick"] is True
    machine = payload["machine"]
    for key in ("cpu", "cores", "memory_bytes", "blas", "versions"):
        assert machine.get(key), key
    assert machine["versions"]["numpy"] and machine["versions"]["dmlcore"]
    assert sorted(payload["benchmarks"]) == sorted(RUNNER_SUBSET)
    for name, entry in payload["benchmarks"].items():
        if name == "bench_network" and entry["status"] == "skipped":
            assert entry["reason"], entry
            continue
        assert entry["status"] == "ok", (name, entry)
        assert entry["figures"], name
        assert runner.check_figures(entry["figures"]) == [], name
        assert all(math.isfinite(f["value"]) for f in entry["figures"]), name
    # the README's table renders from it: the subset's rows have figures, none failed
    text = bench_readme.rewrite(f"a\n{bench_readme.BEGIN}\nold\n{bench_readme.END}\nb\n",
                                bench_readme.load_results(path))
    assert "old" not in text and text.startswith("a\n") and text.endswith("b\n")
    kernels = [line for line in text.splitlines() if line.startswith("| logistic loss+grad")]
    assert kernels and "n/a" not in kernels[0] and "failed" not in text, text


def test_runner_skips_with_the_reason(tmp_path, monkeypatch):
    spec = runner.Spec(["--x"], ["--x"], unavailable=lambda: "needs root (a test)")
    monkeypatch.setitem(runner.SPECS, "bench_network", spec)
    entry = runner.run_one("bench_network", True, [1], tmp_path, echo=False)
    assert entry["status"] == "skipped" and entry["reason"] == "needs root (a test)"
    monkeypatch.delitem(runner.SPECS, "bench_network")
    entry = runner.run_one("bench_network", True, [1], tmp_path, echo=False)
    assert entry["status"] == "skipped" and "not registered" in entry["reason"]


def test_network_figures_from_runs():
    from benchmarks import bench_network

    def run(case, t85, straggler=None, acc=0.86, per_step=1000.0):
        return {"profile": "wan", "workers": 2, "straggler": straggler, "case": case,
                "t85": t85, "t88": None, "final_acc": acc, "best_acc": acc, "steps": 10,
                "bytes_per_step_per_worker": per_step, "budget_s": 20.0}
    out = {"budget_s": 20.0, "runs": [run("sync", 10.0), run("ls16-topk", 2.0, per_step=10.0),
                                      run("ps-async", None), {**run("fedavg", 1.0),
                                                              "error": "boom"}]}
    result = bench_network.figures(out)
    values = {f["name"]: f["value"] for f in result["figures"]}
    assert runner.check_figures(result["figures"]) == []
    assert values["wan, 2 workers: ls16-topk: time to 0.85, sync / this"] == 5.0
    assert values["wan, 2 workers: ls16-topk: bytes per step, sync / this"] == 100.0
    assert "wan, 2 workers: ps-async: time to 0.85" not in values
    assert any("ps-async did not reach 0.85" in n for n in result["notes"])
    assert any("fedavg failed: boom" in n for n in result["notes"])
    get = bench_readme.getter({"figures": result["figures"]})
    assert bench_readme._net_best(get, "wan, 2 workers", ("ls16-topk", "ps-async")) == (
        "local SGD (16) + top-k 1%: 5.0x sooner to 0.85 than SyncSGD")
    assert bench_readme._net_t(get, "wan, 2 workers", "ps-async") == "> 20 s"


def test_a_profile_budget_is_the_one_its_rows_show():
    # --budget-for wan=60: the WAN rows' "> N s" and lower bounds use 60, the others 20
    from benchmarks import bench_network

    def run(profile, case, t85, budget):
        return {"profile": profile, "workers": 2, "straggler": None, "case": case, "t85": t85,
                "t88": None, "final_acc": 0.8, "best_acc": 0.8, "steps": 10,
                "bytes_per_step_per_worker": 1000.0, "budget_s": budget}
    out = {"budget_s": 20.0, "runs": [run("wan", "sync", None, 60.0),
                                      run("wan", "fedavg-int8", 6.0, 60.0),
                                      run("lan", "sync", None, 20.0)]}
    get = bench_readme.getter(bench_network.figures(out))
    assert bench_readme._net_t(get, "wan, 2 workers", "sync") == "> 60 s"
    assert bench_readme._net_t(get, "lan, 2 workers", "sync") == "> 20 s"
    assert bench_readme._net_best(get, "wan, 2 workers", ("fedavg-int8",)) == (
        "FedAvg + int8: >= 10.0x sooner to 0.85 than SyncSGD")


def test_also_adds_runs_at_another_worker_count_and_refuses_unknown_names():
    from benchmarks import bench_network

    assert bench_network.parse_also("3:lan+wan:sync,fedavg-int8") == (
        3, ["lan", "wan"], ["sync", "fedavg-int8"])
    for bad in ("3:lan", "x:lan:sync", "0:lan:sync", "3:moon:sync", "3:lan:nosuchcase",
                "3::sync", "3:lan:"):
        with pytest.raises(ValueError):
            bench_network.parse_also(bad)


def test_grid_best_recipe_per_library_and_its_readme_row(capsys):
    # bench_torch --grid: each library's fastest recipe to the target; the README row reads it
    from benchmarks import bench_torch

    a, b, c, d = (r.label for r in bench_torch.GRID)
    ours, ddp, one = ("dmlcore SyncSGD, 2 workers", "PyTorch DDP gloo, 2 processes",
                      "PyTorch 1 process, 2 threads")
    results = {a: {one: (1.0, None, 0.87), ddp: (1.0, None, 0.86), ours: (1.0, 9.0, 0.881)},
               b: {one: (1.0, 8.0, 0.882), ddp: (1.0, None, 0.87), ours: (1.0, 6.0, 0.884)},
               c: {one: (1.0, 5.0, 0.89), ddp: (1.0, 12.0, 0.885), ours: (1.0, 2.0, 0.89)},
               d: {one: (1.0, 7.0, 0.888), ddp: (1.0, 6.0, 0.883), ours: (1.0, 3.0, 0.887)}}
    notes = []
    figures = bench_torch.grid_figures(results, 0.88, [2], notes, full=a)
    assert runner.check_figures(figures) == [] and notes == []
    values = {f["name"]: f for f in figures}
    # the first recipe ran every epoch; the others stopped at the target
    assert values[f"{one} [{a}]: final test accuracy"]["value"] == 0.87
    assert values[f"{one} [{b}]: last test accuracy"]["value"] == 0.882
    assert f"{one} [{b}]: final test accuracy" not in values
    assert values[f"{ours}: best time to 0.88 of the grid"]["value"] == 2.0
    assert values[f"{ours}: best time to 0.88 of the grid"]["recipe"] == c
    assert values[f"{ddp}: best time to 0.88 of the grid"]["recipe"] == d
    assert values[f"best of the grid, time to 0.88: {ddp} / dmlcore, 2 workers"]["value"] == 3.0
    assert f"{ddp} [{a}]: time to 0.88" not in values          # not reached: no figure
    assert "best of the grid, dmlcore SyncSGD, 2 workers: 2.00 s" in capsys.readouterr().out
    get = bench_readme.getter({"figures": figures + [
        runner.figure("target test accuracy", 0.88, "accuracy")]})
    row = bench_readme._grid_row(2)
    assert bench_readme.cell(row.ours, get) == f"SyncSGD, 2 workers: 2.0 s ({c})"
    assert bench_readme.cell(row.peer, get) == (
        f"PyTorch 1 process, 2 threads: 5.0 s ({c}); DDP gloo, 2 processes: 6.0 s ({d})")
    assert bench_readme.cell(row.ratio, get) == (
        "3.00x sooner than DDP; 2.50x sooner than PyTorch 1 process")
    # a library that reached the target with no recipe: said so, and a note
    none = {label: {**by, ddp: (1.0, None, 0.8)} for label, by in results.items()}
    notes = []
    figures = bench_torch.grid_figures(none, 0.88, [2], notes, full=a)
    assert notes == [f"{ddp}: no recipe of the grid reached 0.88"]
    get = bench_readme.getter({"figures": figures + [
        runner.figure("target test accuracy", 0.88, "accuracy")]})
    assert "DDP did not reach it" in bench_readme.cell(row.ratio, get)


def test_grid_runs_end_at_the_first_epoch_reaching_the_target():
    # bench_torch: PyTorch's loop and dmlcore's callback stop at the target, not before
    torch = pytest.importorskip("torch")
    import numpy as np

    import dmlcore as dml
    from benchmarks import bench_torch

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(256, 784)).astype(np.float32), rng.integers(0, 10, 256)
    recipe = bench_torch.GRID[0]
    torch.set_num_threads(1)

    def epochs_run(stop_at):
        net = bench_torch.torch_net(dml.models.MLP(bench_torch.SIZES).init(0, dtype=np.float32))
        _, curve, _ = bench_torch.train_torch(net, X, y, X[:64], y[:64], 3, recipe, seed=0,
                                              stop_at=stop_at)
        return len(curve)

    assert epochs_run(None) == 3 and epochs_run(2.0) == 3 and epochs_run(0.0) == 1
    said = []                                 # the hook's word ends the run (DDP's rank 0)
    net = bench_torch.torch_net(dml.models.MLP(bench_torch.SIZES).init(0, dtype=np.float32))
    _, curve, _ = bench_torch.train_torch(
        net, X, y, X[:64], y[:64], 3, recipe, seed=0,
        epoch_hook=lambda stop: said.append(stop) or len(said) == 2)
    assert len(curve) == 2
    reached = bench_torch._Reached(0.88, sync_every=469)
    assert reached.sync_every == 469          # else the fit syncs (driver path) every step
    assert not reached(5, {"loss": 1.0}, None) and not reached(6, {"eval_accuracy": 0.87}, None)
    assert reached(7, {"eval_accuracy": 0.88}, None)


def test_a_slowed_worker_sleeps_its_calls_time_again_only_in_its_process(monkeypatch):
    # benchmarks/worker_faults: the straggler of bench_network (a clock stands in for time)
    import numpy as np

    import dmlcore as dml
    from benchmarks import worker_faults

    clock, slept = [0.0], []

    def perf_counter():
        clock[0] += 0.5                 # every reading: half a second later
        return clock[0]

    monkeypatch.setattr(worker_faults.time, "perf_counter", perf_counter)
    monkeypatch.setattr(worker_faults.time, "sleep", slept.append)
    X, y = np.ones((4, 3)), np.array([0.0, 1.0, 1.0, 0.0])
    plain = dml.models.Logistic(3)
    params = plain.init(0)
    expected = plain.loss_grad(params, X, y, np.zeros_like(params))
    for pid, sleeps in ((os.getpid(), [1.5]), (os.getpid() + 1, [])):
        model = worker_faults.hooked(dml.models.Logistic, pid, worker_faults.slowed(4.0))(3)
        grad = np.zeros_like(params)
        assert model.loss_grad(params, X, y, grad) == expected
        assert slept == sleeps          # (4 - 1) x the call's 0.5 s; none elsewhere
        slept.clear()
