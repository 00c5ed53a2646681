"""The ``dmlcore`` command end to end, through subprocesses.

* ``run`` on an embedded LocalCluster: exit code, files, ``history.nc`` with
  xarray, ``model.npz`` without pickle predicting as in-process, ``predict``;
* every workflow of ``workflows/`` (shortened with ``--set``) against a real
  ``dask scheduler`` + two ``dask worker`` processes started here;
* ``--resume`` after the run is SIGKILLed once its first checkpoint exists;
* a sweep (``sweep.nc`` dimensions, ``best.yaml`` runnable);
* bad inputs that need a process or a cluster: exit 2, one line, and the
  previous run's files untouched.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from dask_processes import dask_cluster

from conftest import FASHION_MNIST_SKIP, fashion_mnist_available

# Without the Fashion-MNIST files these tests are skipped, the reason saying how to install them.
NEEDS_FASHION_MNIST_FILES = pytest.mark.skipif(not fashion_mnist_available(),
                                               reason=FASHION_MNIST_SKIP)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
CMD = [sys.executable, "-m", "dmlcore.cli"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def dmlcore(*args, cwd=None, timeout=240):
    return subprocess.run(CMD + [str(a) for a in args], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=timeout)


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


# ---- a real cluster: dask scheduler + 2 dask workers --------------------------------------
@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """Address of a `dask scheduler` with two `dask worker` processes (killed at teardown)."""
    with dask_cluster(tmp_path_factory.mktemp("dask-logs"), [([], None)] * 2,
                      env=_env()) as address:
        yield address


# ---- run + predict on an embedded LocalCluster -------------------------------------------
QUICK = ["--set", "data.source.synthetic.n_samples=5000", "--set", "data.test.split=1000",
         "--set", "train.epochs=1", "--set", "train.eval_every=10",
         "--set", "cluster.local.n_workers=1"]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "out"
    proc = dmlcore("run", WORKFLOWS / "quickstart.yaml", *QUICK, "--set", f"output.dir={out}",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_run_says_what_it_does_before_each_slow_phase(quickstart_run):
    _, proc = quickstart_run
    lines = proc.stdout.splitlines()
    order = [next(i for i, line in enumerate(lines) if line.startswith(start)) for start in (
        "starting an embedded LocalCluster (1 workers)", "dashboard: ", "loading data: synthetic",
        "partitioning 4000 rows x ", "partitions: ")]
    assert order == sorted(order), lines
    skew = lines[order[-1]]
    assert re.search(r"rows per partition \d+/\d+/\d+ \(min/mean/max, imbalance \d\.\d\d\)", skew)
    assert "label skew" in skew


def test_metrics_hold_the_strategy_configuration_only(quickstart_run):
    out, _ = quickstart_run
    metrics = json.loads((out / "metrics.json").read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())["strategy"]
    assert metrics["strategy"] == config


@pytest.mark.slow
def test_resume_of_a_finished_run_has_nothing_to_do(quickstart_run):
    out, _ = quickstart_run
    before = _snapshot(out)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = dmlcore("run", WORKFLOWS / "quickstart.yaml", *QUICK, "--set", f"output.dir={out}",
                   "--no-progress", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout and proc.stderr.strip() == ""
    assert _snapshot(out) == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts
    assert not (out / "checkpoints.partial").exists()


def test_run_writes_every_output(quickstart_run):
    out, proc = quickstart_run
    assert "dashboard: http" in proc.stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "history.nc", "model.npz", "metrics.json", "loss_vs_step.png",
            "loss_vs_time.png", "accuracy_vs_step.png", "checkpoints"} <= names
    assert not [n for n in names if n.endswith(".tmp")
                or (n.startswith(".") and n != ".dmlcore-manifest.json")]
    with xr.open_dataset(out / "history.nc") as h:
        assert {"loss", "wall_time", "bytes_sent", "eval_loss", "eval_accuracy"} <= set(h)
        n_steps = h.sizes["step"]
        assert list(h["step"].values) == list(range(1, n_steps + 1))
        assert np.isfinite(h["loss"].values).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == n_steps
    assert 0.4 < metrics["eval_accuracy"] <= 1.0          # 4 classes: chance is 0.25
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["source"]["synthetic"]["n_samples"] == 5000   # --set applied
    assert (out / "loss_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_file_predicts_like_in_process(quickstart_run, tmp_path):
    import dmlcore as dml

    out, _ = quickstart_run
    with np.load(out / "model.npz", allow_pickle=False) as z:
        params = z["params"]
        model = dml.models.from_config(json.loads(str(z["config"])))
        slices = z["layer_slices"]
    assert slices[-1, 1] == params.size == model.n_params
    X = np.asarray(dml.datasets.make_classification(300, 32, 4, seed=5, dtype=np.float32)[0])
    np.save(tmp_path / "X.npy", X)
    expected = model.predict(params, X)
    proc = dmlcore("predict", out / "model.npz", tmp_path / "X.npy", "-o", tmp_path / "p.npy",
                   "--proba")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, rtol=1e-6)
    from dmlcore.cli import main

    assert main(["predict", str(out / "model.npz"), str(tmp_path / "X.npy"), "-o",
                 str(tmp_path / "labels.npy"), "--chunk-rows", "64"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), expected.argmax(axis=1))


@pytest.mark.slow
def test_predict_chunk_by_chunk_on_a_cluster(quickstart_run, scheduler, tmp_path):
    """.npy and zarr inputs predicted in chunks by tasks on the cluster, as in-process."""
    import zarr

    import dmlcore as dml
    from dmlcore.cli import main
    from dmlcore.outputs import load_model

    out, _ = quickstart_run
    model, params, _ = load_model(out / "model.npz")
    X = np.asarray(dml.datasets.make_classification(1000, 32, 4, seed=6, dtype=np.float32)[0])
    np.save(tmp_path / "X.npy", X)
    z = zarr.open_array(str(tmp_path / "X.zarr"), mode="w", shape=X.shape, chunks=(300, 32),
                        dtype="f4")
    z[:] = X
    expected = model.predict(params, X).argmax(axis=1)
    for source in ("X.npy", "X.zarr"):
        assert main(["predict", str(out / "model.npz"), str(tmp_path / source), "-o",
                     str(tmp_path / "labels.npy"), "--scheduler", scheduler,
                     "--chunk-rows", "256"]) == 0
        np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), expected)


@pytest.mark.slow
def test_failed_run_leaves_earlier_outputs_untouched(quickstart_run, scheduler, tmp_path):
    out, _ = quickstart_run
    before = _snapshot(out)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    X = np.random.default_rng(0).standard_normal((400, 5)).astype(np.float32)
    X[17, 3] = np.nan
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", (X[:, 0] > 0).astype(np.int64))
    proc = dmlcore("run", WORKFLOWS / "quickstart.yaml",
                   "--set", f"data.source={{path: {tmp_path / 'X.npy'}, labels: "
                            f"{tmp_path / 'y.npy'}}}",
                   "--set", "data.test.split=0.25", "--scheduler", scheduler,
                   "--set", f"output.dir={out}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "NaN" in lines[0] and "Traceback" not in proc.stderr
    assert _snapshot(out) == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts


# ---- every workflow of workflows/ on a real dask scheduler + workers -----------------------
SHORT = {
    "quickstart.yaml": ["data.source.synthetic.n_samples=4000", "data.test.split=500",
                        "train.steps=20", "train.eval_every=10"],
    "fashion_mnist_sync.yaml": ["data.max_rows=3000", "data.partitions=4", "train.steps=30",
                                "train.eval_every=15", "train.checkpoint_every=15"],
    "fashion_mnist_fedavg_noniid.yaml": ["data.max_rows=3000", "data.partitions=20",
                                         "train.rounds=4", "strategy.local_epochs=1",
                                         "train.eval_every=2", "train.checkpoint_every=2"],
    "fashion_mnist_ps_async.yaml": ["data.max_rows=3000", "data.partitions=4",
                                    "train.steps=60", "train.eval_every=20",
                                    "train.checkpoint_every=30"],
    "logistic_large_synthetic.yaml": ["data.source.synthetic.n_samples=30000",
                                      "data.source.synthetic.chunks=6000",
                                      "data.test.split=3000", "train.steps=5"],
    "sweep_lr.yaml": ["data.source.synthetic.n_samples=3000", "data.test.split=500",
                      "train.epochs=1", "sweep.optimizer.lr=[0.03, 0.3]",
                      "sweep.strategy.batch_size=[32, 64]"],
}


def test_every_workflow_has_a_test_setting():
    assert {p.name for p in WORKFLOWS.glob("*.yaml")} == set(SHORT)


@pytest.mark.parametrize("name", [            # quickstart stays in the quick subset
    pytest.param(n, marks=([NEEDS_FASHION_MNIST_FILES] if n.startswith("fashion_mnist") else [])
                 + ([] if n == "quickstart.yaml" else [pytest.mark.slow]))
    for n in sorted(SHORT)])
def test_workflow_runs_on_a_dask_scheduler(name, scheduler, tmp_path):
    out = tmp_path / "out"
    sets = [a for s in SHORT[name] + [f"output.dir={out}"] for a in ("--set", s)]
    proc = dmlcore("run", WORKFLOWS / name, "--scheduler", scheduler, "--no-progress", *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dashboard: " in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    if name == "sweep_lr.yaml":
        with xr.open_dataset(out / "sweep.nc") as s:
            assert s["eval_accuracy"].dims == ("optimizer.lr", "strategy.batch_size")
            assert list(s["optimizer.lr"].values) == [0.03, 0.3]
            assert list(s["strategy.batch_size"].values) == [32, 64]
            assert s["loss_curve"].dims == ("optimizer.lr", "strategy.batch_size", "step")
            assert np.isfinite(s["eval_accuracy"].values).all()
            best = s["eval_accuracy"].values.max()
        assert metrics["best_metrics"]["eval_accuracy"] == pytest.approx(best)
        assert len(metrics["runs"]) == 4 and "best:" in proc.stdout
        assert {"sweep_loss_vs_step.png", "sweep_accuracy_vs_step.png", "best.yaml"} <= {
            p.name for p in out.iterdir()}
        import yaml

        best_cfg = yaml.safe_load((out / "best.yaml").read_text())
        assert "sweep" not in best_cfg
        assert best_cfg["optimizer"]["lr"] in (0.03, 0.3)
        assert dmlcore("validate", out / "best.yaml").returncode == 0
        return
    with xr.open_dataset(out / "history.nc") as h:
        assert np.isfinite(h["loss"].values).all()
        steps = h.sizes["step"]
    assert metrics["steps"] == steps > 0
    if name == "fashion_mnist_ps_async.yaml":
        assert (out / "staleness_hist.png").exists()
    if name == "fashion_mnist_fedavg_noniid.yaml":
        assert steps == 4 and (out / "loss_vs_round.png").exists()
        assert "4 rounds, final loss" in proc.stdout
    if name == "logistic_large_synthetic.yaml":
        assert metrics["eval_accuracy"] > 0.7


@pytest.mark.slow
def test_info_describes_the_cluster(scheduler):
    proc = dmlcore("info", "--scheduler", scheduler)
    assert proc.returncode == 0, proc.stderr
    for word in ("numpy", "scipy", "dask", "distributed", "sklearn", "xarray", "loss", "mlp",
                 "optim", "2 workers"):
        assert word in proc.stdout
    assert "NOT IMPORTABLE" not in proc.stdout


# ---- --resume after a SIGKILL ------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_kill_continues_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "out"
    args = ["run", WORKFLOWS / "quickstart.yaml", "--no-progress",
            "--set", "data.source.synthetic.n_samples=6000", "--set", "data.test.split=1000",
            "--set", "train.steps=300",
            "--set", "train.checkpoint_every=10", "--set", "train.eval_every=100",
            "--set", "cluster.local.n_workers=1", "--set", f"output.dir={out}"]
    proc = subprocess.Popen(CMD + [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(), start_new_session=True)
    live = out / "checkpoints.partial"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if list(live.glob("ckpt-*.npz")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)      # the CLI and its LocalCluster's processes
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    killed_at = max(int(p.stem.split("-")[1]) for p in live.glob("ckpt-*.npz"))
    assert 10 <= killed_at < 300
    assert not (out / "metrics.json").exists()          # nothing final was written
    done = dmlcore(*args, "--resume")
    assert done.returncode == 0, done.stderr
    m = re.search(r"resuming from step (\d+)", done.stdout)
    assert m and int(m.group(1)) >= killed_at
    with xr.open_dataset(out / "history.nc") as h:
        assert list(h["step"].values) == list(range(1, 301))   # history kept across the kill
        assert np.isfinite(h["loss"].values).all()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 300
    assert not live.exists() and list((out / "checkpoints").glob("ckpt-*.npz"))


# ---- bad input through a real process ---------------------------------------------------
def test_bad_input_exit_code_through_a_process(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  source: fashion_mnist\nmodel: {kind: mlp\n")
    proc = dmlcore("run", bad)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "malformed YAML" in proc.stderr
    assert "Traceback" not in proc.stderr
    from dmlcore.cli import main

    assert main(["run", str(bad), "--debug"]) == 2       # --debug shows the traceback
    assert "Traceback" in capsys.readouterr().err


# ---- lazy imports: `import dmlcore` and `dmlcore --help` import nothing heavy ---------------
HEAVY = ("distributed", "dask", "xarray", "matplotlib", "sklearn", "scipy", "numpy")


@pytest.mark.parametrize("code, allowed", [
    ("import dmlcore", ()),
    ("import dmlcore.cli as c\ntry:\n    c.main(['--help'])\nexcept SystemExit:\n    pass", ()),
    ("import dmlcore as dml\ndml.SyncSGD; dml.partition", ("numpy",)),
])
def test_import_and_help_do_not_import_heavy_modules(code, allowed):
    probe = code + "\nimport sys\nprint(sorted({m.split('.')[0] for m in sys.modules} & %r))" % (
        set(HEAVY),)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = eval(proc.stdout.strip().splitlines()[-1])
    assert set(loaded) <= set(allowed), loaded
    assert {"distributed", "xarray", "matplotlib"}.isdisjoint(loaded)


def test_lazy_names_resolve_to_the_public_objects():
    import dmlcore as dml
    from dmlcore.strategies import SyncSGD
    from dmlcore.train import fit

    assert dml.SyncSGD is SyncSGD and dml.fit is fit
    assert set(dml.__all__) <= set(dir(dml))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dml.nope


def test_fedavg_progress_counts_rounds():
    from dmlcore.strategies import FedAvg, SyncSGD
    from dmlcore.train import _Progress

    units = []
    for strategy in (FedAvg(), SyncSGD()):
        bar = _Progress(True, 3, 0, strategy)
        units.append(bar.bar.unit)
        bar.close()
    assert units == ["round", "step"]
