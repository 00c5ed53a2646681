"""Workflow files: parsing with line numbers, --set, the schema, the registry.

Most checks run in this process through ``dmlcore.cli.main`` (no cluster is
started for anything caught before one would be): exit code 2, one line on
stderr naming the file, the YAML line and the key path.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import yaml

from dmlcore import cli, workflow
from dmlcore.workflow import REGISTRY, WorkflowError

from conftest import FASHION_MNIST_SKIP, fashion_mnist_available

# Without the Fashion-MNIST files these tests are skipped, the reason saying how to install them.
NEEDS_FASHION_MNIST_FILES = pytest.mark.skipif(not fashion_mnist_available(),
                                               reason=FASHION_MNIST_SKIP)

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "workflows" / "quickstart.yaml"

GOOD = """\
name: t
data:
  source:
    synthetic: {kind: classification, n_samples: 1000, n_features: 5, n_classes: 3}
  partitions: 2
model: {kind: mlp, hidden: [8]}
strategy: {kind: sync, batch_size: 32}
optimizer: {kind: sgd, lr: 0.1, momentum: 0.9}
train: {epochs: 1}
output: {dir: OUT}
"""


@pytest.fixture
def files(tmp_path):
    """Small data files: good ones, and ones with each kind of defect."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "y_short.npy", y[:50])
    np.save(tmp_path / "y_three.npy", np.where(y == 1, 2, 0))
    np.save(tmp_path / "y_negative.npy", y - 1)
    np.save(tmp_path / "y_fraction.npy", y + 0.5)
    np.save(tmp_path / "X3d.npy", X.reshape(60, 5, 1))
    return tmp_path


def write(tmp_path, text, name="wf.yaml"):
    path = tmp_path / name
    path.write_text(text.replace("OUT", str(tmp_path / "out")))
    return path


def run_main(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


SYNTHETIC = ("  source:\n"
             "    synthetic: {kind: classification, n_samples: 1000, n_features: 5, n_classes: 3}\n")


def with_source(source, model="{kind: logistic}"):
    """GOOD with ``data.source`` replaced (one line, so later line numbers shift by -1)."""
    return GOOD.replace(SYNTHETIC, f"  source: {source}\n").replace("{kind: mlp, hidden: [8]}",
                                                                   model)


# Each case: (workflow text or None for GOOD, extra argv, expected fragment, expected line)
CATALOGUE = {
    "malformed yaml": ("data: [1, 2\nmodel: {kind: mlp}\n", [], "malformed YAML", None),
    "empty file": ("", [], "the file is empty", None),
    "only a comment": ("# nothing here\n", [], "the file is empty", None),
    "top level is a list": ("- a\n- b\n", [], "top level must be a mapping", 1),
    "unknown top-level key": (GOOD + "modle: {kind: mlp}\n", [],
                              "modle: unknown key (did you mean 'model'?)", 11),
    "unknown strategy kind": (GOOD.replace("kind: sync", "kind: spark"), [],
                              "strategy.kind: 'spark' is not one of sync, ps, fedavg", 7),
    "unknown model kind": (GOOD.replace("kind: mlp", "kind: cnn"), [],
                           "model.kind: 'cnn' is not one of linear, logistic, softmax, mlp", 6),
    "unknown optimizer key": (GOOD.replace("momentum: 0.9", "momentun: 0.9"), [],
                              "optimizer.momentun: unknown key (did you mean 'momentum'?)", 8),
    "wrong type": (GOOD.replace("lr: 0.1", "lr: fast"), [],
                   "optimizer.lr: expected a number, got the string 'fast'", 8),
    "wrong type int": (GOOD.replace("batch_size: 32", "batch_size: 3.5"), [],
                       "strategy.batch_size: expected an integer", 7),
    "out of range (constructor)": (GOOD.replace("momentum: 0.9", "momentum: 1.5"), [],
                                   "optimizer.momentum: momentum must be in [0, 1)", 8),
    "out of range (schema)": (GOOD.replace("partitions: 2", "partitions: 0"), [],
                              "data.partitions: must be >= 1, got 0", 5),
    "bool for a number": (GOOD.replace("epochs: 1", "epochs: yes"), [],
                          "train.epochs: expected an integer, got the boolean true", 9),
    "no training length": (GOOD.replace("train: {epochs: 1}", "train: {seed: 1}"), [],
                           "train: give exactly one of epochs, steps, rounds", 9),
    "two training lengths": (GOOD.replace("epochs: 1", "epochs: 1, steps: 5"), [],
                             "give exactly one of epochs, steps, rounds (got epochs, steps)", 9),
    "missing section": (GOOD.replace("strategy: {kind: sync, batch_size: 32}\n", ""), [],
                        "missing key 'strategy'", None),
    "duplicate key": (GOOD + "train: {steps: 3}\n", [], "train: duplicate key", 11),
    "unknown scheme": (GOOD.replace("partitions: 2", "partitions: 2\n  scheme: random"), [],
                       "data.scheme: 'random' is not one of iid, shards, dirichlet", 6),
    "unknown data set": (with_source("mnist_digits", "{kind: mlp}"), [],
                         "'mnist_digits' is not a known data set", 3),
    "lbfgs with mini-batches": (GOOD.replace("{kind: sgd, lr: 0.1, momentum: 0.9}",
                                             "{kind: lbfgs}"), [],
                                "lbfgs is a full-batch solver", 8),
    "rounds with sync": (GOOD.replace("epochs: 1", "rounds: 3"), [],
                         "train.rounds: rounds are FedAvg rounds", 9),
    "logistic on 3 classes": (GOOD.replace("{kind: mlp, hidden: [8]}", "{kind: logistic}"), [],
                              "logistic is binary; the data have 3 classes", 6),
    "unknown mlp activation": (GOOD.replace("hidden: [8]", "hidden: [8], activation: swish"),
                               [], "model", 6),
    "hidden not a list": (GOOD.replace("hidden: [8]", "hidden: 8"), [],
                          "model.hidden: expected a list of integers", 6),
    "bad sweep value": (GOOD + "sweep: {optimizer.lr: [0.1, -1]}\n", [],
                        "sweep optimizer.lr=-1: optimizer.lr: lr must be positive", 11),
    "sweep not a list": (GOOD + "sweep: {optimizer.lr: 0.1}\n", [],
                         "sweep.optimizer.lr: expected a non-empty list", 11),
    "--set without =": (None, ["--set", "optimizer.lr"], "expected key.path=value", None),
    "--set into a scalar": (None, ["--set", "optimizer.lr.x=1"],
                            "optimizer.lr is a float, not a mapping", None),
    "--set unknown key": (None, ["--set", "train.epochz=2"],
                          "--set train.epochz=2: train.epochz: unknown key", None),
    "--set bad value": (None, ["--set", "optimizer.lr=[1, 2"], "the value is not valid YAML",
                        None),
    "--set bad kind": (None, ["--set", "strategy.kind=spark"],
                       "--set strategy.kind=spark: strategy.kind: 'spark' is not one of", None),
}


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_workflow_exit_2_one_line(case, tmp_path, capsys):
    text, argv, fragment, line = CATALOGUE[case]
    path = write(tmp_path, GOOD if text is None else text)
    rc, out, err = run_main(capsys, "validate", path, *argv)
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err
    if line is not None:
        assert f"{path}:{line}: " in err, err
    assert not (tmp_path / "out").exists()


FILE_CASES = {
    "missing data file": ("{path: NOPE.npy, labels: DIR/y.npy}", "{kind: logistic}",
                          "data.source.path: data file not found"),
    "missing labels file": ("{path: DIR/X.npy, labels: DIR/nope.npy}", "{kind: logistic}",
                            "data.source.labels: labels file not found"),
    "X and y of different lengths": ("{path: DIR/X.npy, labels: DIR/y_short.npy}",
                                     "{kind: logistic}", "X has 60 rows but the labels have 50"),
    "labels outside the classes": ("{path: DIR/X.npy, labels: DIR/y_three.npy}",
                                   "{kind: logistic}", "outside the classes 0, 1"),
    "negative labels": ("{path: DIR/X.npy, labels: DIR/y_negative.npy}", "{kind: softmax}",
                        "negative values"),
    "fractional labels": ("{path: DIR/X.npy, labels: DIR/y_fraction.npy}", "{kind: softmax}",
                          "not integer class ids"),
    "3-D X": ("{path: DIR/X3d.npy, labels: DIR/y.npy}", "{kind: logistic}",
              "X must be 2-D"),
    "not a data file": ("{path: DIR/wf.yaml, labels: DIR/y.npy}", "{kind: logistic}",
                        "unsupported data file"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_data_files_exit_2_before_any_cluster(case, files, capsys, monkeypatch):
    source, model, fragment = FILE_CASES[case]
    path = write(files, with_source(source.replace("DIR", str(files)), model))
    started = []
    monkeypatch.setattr(workflow, "open_client", lambda *a, **k: started.append(1))
    rc, out, err = run_main(capsys, "run", path)
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err and fragment in err, err
    assert not started and not (files / "out").exists()


def test_missing_workflow_and_model_files(tmp_path, capsys):
    rc, _, err = run_main(capsys, "run", tmp_path / "nope.yaml")
    assert rc == 2 and "no such workflow file" in err
    rc, _, err = run_main(capsys, "predict", tmp_path / "m.npz", tmp_path / "X.npy", "-o",
                          tmp_path / "o.npy")
    assert rc == 2 and "no such model file" in err and err.count("\n") == 1
    (tmp_path / "m.npz").write_bytes(b"not an npz file")
    rc, _, err = run_main(capsys, "predict", tmp_path / "m.npz", tmp_path / "X.npy", "-o",
                          tmp_path / "o.npy")
    assert rc == 2 and "not a dmlcore model file" in err
    rc, _, err = run_main(capsys, "run")
    assert rc == 2 and err.count("\n") == 1 and "required" in err


def test_predict_rejects_wrong_feature_count_and_nan(tmp_path, capsys):
    from dmlcore.models import Softmax
    from dmlcore.outputs import model_bytes

    model = Softmax(4, 3)
    (tmp_path / "m.npz").write_bytes(model_bytes(model, model.init(0)))
    np.save(tmp_path / "X5.npy", np.zeros((10, 5)))
    rc, _, err = run_main(capsys, "predict", tmp_path / "m.npz", tmp_path / "X5.npy", "-o",
                          tmp_path / "o.npy")
    assert rc == 2 and "5 features, the model expects 4" in err
    X = np.zeros((10, 4))
    X[7, 1] = np.nan
    np.save(tmp_path / "Xnan.npy", X)
    rc, _, err = run_main(capsys, "predict", tmp_path / "m.npz", tmp_path / "Xnan.npy", "-o",
                          tmp_path / "o.npy")
    assert rc == 2 and "NaN" in err and not (tmp_path / "o.npy").exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_unreachable_address_in_the_file_names_its_yaml_line(tmp_path, capsys):
    text = GOOD.replace("name: t\n", "name: t\ncluster: {address: 'tcp://127.0.0.1:9', timeout: 2}\n")
    rc, _, err = run_main(capsys, "run", write(tmp_path, text))
    assert rc == 2 and err.count("\n") == 1, err
    assert ":2: cluster.address: cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_unreachable_scheduler_is_bad_input(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    rc, _, err = run_main(capsys, "run", path, "--scheduler", "tcp://127.0.0.1:9")
    assert rc == 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err
    assert not (tmp_path / "out").exists()


# ---- parsing, lines, overrides ----------------------------------------------------------
def test_lines_of_key_paths_and_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    wf = workflow.load(path, ["optimizer.lr=3e-2", "sweep.strategy.batch_size=[16, 32]",
                              "data.source.synthetic.n_samples=500"])
    assert wf.lines[("strategy", "kind")] == 7
    assert wf.lines[("data", "source", "synthetic")] == 4
    assert wf.config["optimizer"]["lr"] == 0.03            # 3e-2 is a float, not a string
    assert wf.config["sweep"] == {"strategy.batch_size": [16, 32]}
    assert wf.where(("optimizer", "lr")) == f"{path}: --set optimizer.lr=3e-2"
    assert wf.where(("optimizer", "momentum")) == f"{path}:8"
    plan = workflow.validate(wf)
    assert plan.sweep_keys == ["strategy.batch_size"]
    assert [r.strategy_kwargs["batch_size"] for r in plan.runs] == [16, 32]
    assert all(r.data["source"]["options"]["n_samples"] == 500 for r in plan.runs)


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=NEEDS_FASHION_MNIST_FILES) if "fashion_mnist" in p.read_text() else p
    for p in sorted((ROOT / "workflows").glob("*.yaml"))], ids=lambda p: p.name)
def test_every_shipped_workflow_validates(path, capsys):
    rc, out, err = run_main(capsys, "validate", path)       # validate checks the data files
    assert rc == 0, err
    assert "valid" in out


def test_registry_and_signatures_agree():
    """Every registered kind resolves, and the keys allowed are its constructor's keywords."""
    for section, kinds in REGISTRY.items():
        for kind in kinds:
            obj = workflow.resolve_kind(section, kind)
            assert callable(obj)
    from dmlcore import SyncSGD, optim

    assert workflow.resolve_kind("strategy", "sync") is SyncSGD
    assert workflow.resolve_kind("optimizer", "adam") is optim.Adam
    # a keyword added to a constructor is accepted by the file without touching workflow.py
    text = GOOD.replace("{kind: sync, batch_size: 32}", "{kind: sync, batch_size: 32, "
                        + ", ".join(f"{k}: {v.default!r}" for k, v in inspect.signature(
                            SyncSGD).parameters.items() if k in ("fan_in", "local_steps",
                                                                 "transport"))
                        .replace("'", "") + "}")
    wf = workflow.Workflow(config=yaml.safe_load(text), name="x.yaml")
    spec = workflow.validate(wf).runs[0]
    assert spec.strategy_kwargs == {"batch_size": 32, "fan_in": 4, "local_steps": 1,
                                    "transport": "actors"}


def test_model_sizes_are_inferred_from_the_data():
    wf = workflow.Workflow(config=yaml.safe_load(GOOD), name="x.yaml")
    spec = workflow.validate(wf).runs[0]
    prepared = workflow.PreparedData(data=None, eval_data=None, n_features=784, n_outputs=10)
    model = workflow.build_model(spec, prepared)
    assert model.sizes == [784, 8, 10]


def test_fedavg_server_optimizer_is_built_from_the_registry():
    text = GOOD.replace("{kind: sync, batch_size: 32}",
                        "{kind: fedavg, clients_per_round: 0.5, server_optimizer: "
                        "{kind: sgd, lr: 1.0, momentum: 0.9}}").replace("epochs: 1", "rounds: 2")
    spec = workflow.validate(workflow.Workflow(config=yaml.safe_load(text), name="x")).runs[0]
    strategy = workflow.build_strategy(spec.strategy_kind, spec.strategy_kwargs)
    assert type(strategy.server_optimizer).__name__ == "SGD"
    bad = text.replace("{kind: sgd, lr: 1.0", "{kind: sgd, lr: -1.0")
    with pytest.raises(WorkflowError, match="strategy.server_optimizer.lr: lr must be positive"):
        workflow.validate(workflow.Workflow(config=yaml.safe_load(bad), name="x"))


# ---- validate checks what it can without a cluster ------------------------------------------
def _npy(directory, name, array):
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / name, array)


def test_relative_data_paths_resolve_from_the_workflow_folder(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    folder = tmp_path / "project"
    _npy(folder, "X.npy", rng.random((40, 5)))
    _npy(folder, "y.npy", np.arange(40) % 2)
    path = write(folder, with_source("{path: X.npy, labels: y.npy}"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, out, err = run_main(capsys, "validate", path)
    assert rc == 0 and "valid" in out, err
    spec = workflow.validate(workflow.load(path)).runs[0]
    assert spec.data["source"]["path"] == str(folder / "X.npy")
    missing = write(folder, with_source("{path: nope.npy, labels: y.npy}"), "missing.yaml")
    rc, _, err = run_main(capsys, "validate", missing)
    assert rc == 2 and f"(looked for {folder / 'nope.npy'})" in err and ":3:" in err, err


def test_validate_rejects_test_labels_outside_the_training_classes(tmp_path, capsys):
    rng = np.random.default_rng(0)
    _npy(tmp_path, "X.npy", rng.random((40, 5)))
    _npy(tmp_path, "y.npy", np.arange(40) % 3)
    _npy(tmp_path, "Xt.npy", rng.random((10, 5)))
    _npy(tmp_path, "yt.npy", np.arange(10) % 5)
    text = with_source("{path: X.npy, labels: y.npy}", "{kind: softmax}").replace(
        "  partitions: 2\n", "  partitions: 2\n  test: {source: {path: Xt.npy, labels: yt.npy}}\n")
    rc, _, err = run_main(capsys, "validate", write(tmp_path, text))
    assert rc == 2 and "the test labels hold [3, 4], outside the classes 0..2" in err, err
    _npy(tmp_path, "yt.npy", np.arange(10) % 3)
    rc, _, err = run_main(capsys, "validate", write(tmp_path, text))
    assert rc == 0, err


def test_validate_reports_missing_fashion_mnist_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DMLCORE_DATA", str(tmp_path))
    rc, _, err = run_main(capsys, "validate", write(tmp_path, with_source(
        "fashion_mnist", "{kind: softmax}")))
    assert rc == 2 and err.count("\n") == 1, err
    assert "Fashion-MNIST files not found" in err and "apt-get install" in err and ":3:" in err


def test_data_weights_file_travels_with_the_rows(files):
    """``data.weights``: a .npy of row weights, relative to the workflow's folder;
    the holdout split keeps each weight with its row."""
    w = np.arange(60, dtype=np.float64) + 1.0
    np.save(files / "w.npy", w)
    text = with_source(f"{{path: {files}/X.npy, labels: {files}/y.npy}}").replace(
        "  partitions: 2\n", "  partitions: 2\n  weights: w.npy\n  test: {split: 10}\n")
    plan = workflow.validate(workflow.load(write(files, text)))
    spec = plan.runs[0]
    prepared = workflow.prepare_data(spec, None, plan.workflow)
    data = prepared.data
    assert data.is_weighted
    X = np.load(files / "X.npy")
    for rows, Xb, wb in zip(data.source_rows, data.x_blocks(), data.w_blocks()):
        Xb, wb = np.asarray(Xb.compute()), np.asarray(wb.compute())
        # every partition row is a source row whose weight came along (w = row + 1)
        src = [int(np.flatnonzero((X == r).all(axis=1))[0]) for r in Xb]
        np.testing.assert_array_equal(wb, w[src])
    assert sum(len(r) for r in data.source_rows) == 50


@pytest.mark.parametrize("weights, fragment", [
    ("w.txt", "expected the path of a .npy file"),
    ("nope.npy", "weights file not found"),
    ("w_short.npy", "one weight per row of the source (60)"),
])
def test_bad_weights_file_exit_2_one_line(files, capsys, weights, fragment):
    np.save(files / "w_short.npy", np.ones(59))
    text = with_source(f"{{path: {files}/X.npy, labels: {files}/y.npy}}").replace(
        "  partitions: 2\n", f"  partitions: 2\n  weights: {weights}\n")
    rc, out, err = run_main(capsys, "run", write(files, text))
    assert rc == 2 and err.count("\n") == 1 and fragment in err and "data.weights" in err, err


def test_written_config_names_data_files_by_absolute_path(files):
    """config.yaml (the resolved workflow) reruns from any folder: relative data
    paths of the workflow become absolute; --set overrides are in it."""
    (files / "sub").mkdir()
    for name in ("X.npy", "y.npy"):
        (files / "sub" / name).write_bytes((files / name).read_bytes())
    np.save(files / "sub" / "w.npy", np.ones(60))
    text = with_source("{path: X.npy, labels: y.npy}").replace(
        "  partitions: 2\n", "  partitions: 2\n  weights: w.npy\n")
    plan = workflow.validate(workflow.load(write(files / "sub", text), ["train.epochs=3"]))
    cfg = workflow._resolved_config(plan)
    source = cfg["data"]["source"]
    assert source["path"] == str(files / "sub" / "X.npy")
    assert source["labels"] == str(files / "sub" / "y.npy")
    assert cfg["data"]["weights"] == str(files / "sub" / "w.npy")
    assert cfg["train"]["epochs"] == 3
    again = workflow.validate(workflow.Workflow(config=cfg, name="config.yaml"))
    assert again.runs[0].data["source"]["path"] == source["path"]


def test_sweep_runs_claim_their_checkpoint_folders_concurrently(tmp_path):
    """The runs of a sweep set up ``checkpoints.partial/NNN`` from parallel
    threads; one of them must never see the shared folder half-claimed (it
    used to fail "... exists and was not written by dmlcore")."""
    import threading

    from dmlcore.models import Logistic

    errors = []
    for trial in range(30):
        out = tmp_path / f"out{trial}"
        out.mkdir()
        start = threading.Barrier(8)

        def claim(i):
            live, done = workflow._checkpoint_dirs(out, i)
            start.wait()
            try:
                workflow._prepare_checkpoints(live, done, False, Logistic(3), None,
                                              lambda m: None)
            except Exception as exc:  # noqa: BLE001 — collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:3]


@pytest.mark.slow
def test_sparse_npz_source_runs_end_to_end(tmp_path, capsys):
    """A CSR matrix saved by scipy.sparse.save_npz is a data source: the
    partitions stay CSR, the holdout is scored, and an MLP is refused in one line."""
    import json

    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    X = sp.random(600, 50, density=0.1, format="csr", random_state=0)
    y = (X @ rng.normal(size=50) > 0).astype(np.int64)
    sp.save_npz(tmp_path / "X.npz", X)
    np.save(tmp_path / "y.npy", y)
    text = with_source("{path: X.npz, labels: y.npy}").replace(
        "  partitions: 2\n", "  partitions: 2\n  test: {split: 100}\n").replace(
        "{kind: sync, batch_size: 32}", "{kind: sync, batch_size: 32}").replace(
        "train: {epochs: 1}", "train: {epochs: 20}")
    path = write(tmp_path, text)
    plan = workflow.validate(workflow.load(path))
    prepared = workflow.prepare_data(plan.runs[0], None, plan.workflow)
    assert prepared.data.is_sparse and sp.issparse(prepared.eval_data[0])
    rc, out, err = run_main(capsys, "run", path, "--no-progress")
    assert rc == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_accuracy"] > 0.8
    mlp = path.read_text().replace("{kind: logistic}", "{kind: mlp, hidden: [8]}")
    rc, out, err = run_main(capsys, "run", write(tmp_path, mlp, "mlp.yaml"))
    assert rc == 2 and err.count("\n") == 1 and "sparse" in err and "model.kind" in err, err
