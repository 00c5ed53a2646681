"""``dmlcore export MODEL.npz --int8``, ``dml.load`` and ``dmlcore predict`` on int8 files.

Truths are independent of ``dmlcore.quantize``: per-output-unit scales and
rounding computed here with NumPy from the float file's own arrays, a NumPy
forward pass (``reference_mlp.forward``, a GLM one-liner) on weights
dequantized here, and each model's own ``predict`` on the float file. Every
model kind (linear, logistic, softmax, MLP classifier and regressor) is
covered; CLI errors are checked for exit code 2, one stderr line, no
traceback, no file left behind and a foreign file untouched.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reference_mlp import forward as mlp_forward

import dmlcore as dml
from conftest import FASHION_MNIST_SKIP, fashion_mnist_available
from dmlcore.cli import main
from dmlcore.outputs import model_bytes
from dmlcore.quantize import quantize

NEEDS_FASHION_MNIST_FILES = pytest.mark.skipif(not fashion_mnist_available(),
                                               reason=FASHION_MNIST_SKIP)
ROOT = Path(__file__).resolve().parents[1]

KINDS = {
    "linear": lambda: dml.models.Linear(12),
    "logistic": lambda: dml.models.Logistic(12),
    "softmax": lambda: dml.models.Softmax(12, 4),
    "mlp": lambda: dml.models.MLP([12, 16, 4], activation="relu"),
    "mlp_regressor": lambda: dml.models.MLP([12, 8, 1], activation="tanh", output="linear"),
}


def _params(model, seed, dtype=np.float32):
    """Random parameters whose output columns differ in magnitude by up to 1000x
    (so one scale per tensor would be visibly worse than one per column)."""
    rng = np.random.default_rng(seed)
    params = np.zeros(model.n_params)
    for view in model.views(params).values():
        W = view["W"].reshape(view["W"].shape[0], -1)
        W[...] = rng.normal(size=W.shape) * 10.0 ** rng.uniform(-2, 1, size=W.shape[1])
        view["b"][...] = rng.normal(size=view["b"].shape)
    return params.astype(dtype)


@pytest.fixture(params=sorted(KINDS))
def saved(request, tmp_path):
    """(kind, model, params, float model file) for every model kind."""
    model = KINDS[request.param]()
    dtype = np.float64 if request.param == "softmax" else np.float32
    params = _params(model, seed=len(request.param), dtype=dtype)
    path = tmp_path / "model.npz"
    path.write_bytes(model_bytes(model, params, {"workflow_name": "t"}))
    return request.param, model, params, path


def _X(n_features, n=200, seed=1, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=(n, n_features)).astype(dtype)


def _run(*args):
    """``dmlcore`` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def _export(path, *extra):
    rc, out, err = _run("export", path, "--int8", *extra)
    assert rc == 0, err
    return Path(out.split()[1].rstrip(":"))


# ---- references (NumPy, from the files' own arrays) -------------------------------------------
def _reference_layers(float_file):
    """{layer: (W, b)} read from the float file's layout arrays."""
    with np.load(float_file, allow_pickle=False) as z:
        params = z["params"]
        layout = json.loads(str(z["layout"]))
    out = {}
    for item in layout:
        flat = params[item["start"]:item["stop"]]
        nw = int(np.prod(item["W"]))
        out[item["name"]] = (flat[:nw].reshape(item["W"]), flat[nw:])
    return out


def _reference_dequantized(int8_file):
    """{layer: (W float64, b)} dequantized with NumPy from the int8 file's arrays."""
    with np.load(int8_file, allow_pickle=False) as z:
        out = {}
        for name in z["layer_names"]:
            q, s = z[f"W_int8/{name}"], z[f"W_scale/{name}"]
            W = (q.reshape(q.shape[0], -1).astype(np.float64) * s.astype(np.float64))
            out[str(name)] = (W.reshape(q.shape), z[f"b/{name}"].astype(np.float64))
    return out


def _reference_predict(model, layers, X):
    """The model's output (probabilities or values) by a NumPy forward pass."""
    X = X.astype(np.float64)
    if isinstance(model, dml.models.MLP):
        flat = np.concatenate([np.concatenate([W.ravel(), b]) for W, b in layers.values()])
        return mlp_forward(flat, model.sizes, X, model.activation, model.output)[2].squeeze()
    W, b = layers["linear"]
    z = X @ W + b
    if model.kind == "logistic":
        return 1 / (1 + np.exp(-z))
    if model.kind == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return z


# ---- the quantizer ------------------------------------------------------------------------------
def test_per_channel_error_at_most_half_a_step():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(50, 7)) * 10.0 ** np.arange(-3, 4)       # columns 1e-3 .. 1e3
    W[:, 2] = 0.0                                                   # an all-zero unit
    q, scale = quantize(W)
    ref_scale = np.abs(W).max(axis=0) / 127
    assert q.dtype == np.int8 and q.shape == W.shape and np.abs(q.astype(int)).max() <= 127
    assert scale.dtype == np.float32 and scale.shape == (7,)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
    err = np.abs(W - q.astype(np.float64) * scale.astype(np.float64))
    assert (err <= scale.astype(np.float64) / 2 * (1 + 1e-6) + 1e-30).all()
    assert (q[:, 2] == 0).all()
    assert (np.abs(q[:, [0, 1, 3, 4, 5, 6]]).max(axis=0) == 127).all()   # the full range used
    np.testing.assert_array_equal(q, np.rint(W / np.where(ref_scale > 0, ref_scale, 1)))


def test_one_output_weight_vector_has_one_scale():
    w = np.array([0.5, -2.0, 1.0, 0.01])
    q, scale = quantize(w)
    assert q.shape == (4,) and scale.shape == (1,)
    np.testing.assert_array_equal(q, np.rint(w / (2.0 / 127)))


# ---- the file ---------------------------------------------------------------------------------------
def test_file_holds_per_channel_int8_weights(saved):
    kind, model, params, path = saved
    out = _export(path)
    assert out == path.with_name("model.int8.npz")
    ref = _reference_layers(path)
    with np.load(out, allow_pickle=False) as z:
        assert list(z["layer_names"]) == model.layer_names
        assert json.loads(str(z["config"])) == model.to_config()
        for name, (W, b) in ref.items():
            cols = W.reshape(W.shape[0], -1).astype(np.float64)
            ref_scale = np.abs(cols).max(axis=0) / 127
            q, s = z[f"W_int8/{name}"], z[f"W_scale/{name}"]
            assert q.dtype == np.int8 and q.shape == W.shape
            assert s.dtype == np.float32 and s.shape == (cols.shape[1],)
            np.testing.assert_allclose(s, ref_scale, rtol=1e-6)
            err = np.abs(cols - q.reshape(cols.shape) * s.astype(np.float64))
            assert (err <= ref_scale / 2 * (1 + 1e-5)).all(), f"{kind} {name}"
            assert z[f"b/{name}"].dtype == np.float32
            np.testing.assert_array_equal(z[f"b/{name}"], b.astype(np.float32))
    assert out.stat().st_size < path.stat().st_size or model.n_params < 500


def test_int8_predictions_equal_numpy_forward_on_dequantized_weights(saved):
    kind, model, params, path = saved
    loaded = dml.load(_export(path))
    assert loaded.quantized and loaded.params.dtype == params.dtype
    X = _X(model.n_features)
    ref = _reference_predict(model, _reference_dequantized(path.with_name("model.int8.npz")), X)
    got = loaded.predict_proba(X) if model.is_classifier else loaded.predict(X)
    if kind == "logistic":
        got = got[:, 1]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    if model.is_classifier:
        labels = (ref > 0.5).astype(int) if ref.ndim == 1 else ref.argmax(axis=1)
        assert (loaded.predict(X) == labels).mean() >= 0.99


def test_load_float_is_the_model_and_int8_is_close(saved):
    kind, model, params, path = saved
    X = _X(model.n_features)
    own = model.predict(params, X.astype(params.dtype))
    flt, i8 = dml.load(path), dml.load(_export(path))
    assert not flt.quantized
    if model.is_classifier:
        p_flt, p_i8 = flt.predict_proba(X), i8.predict_proba(X)
        if kind == "logistic":
            np.testing.assert_allclose(p_flt.sum(axis=1), 1.0)
            p_flt, p_i8 = p_flt[:, 1], p_i8[:, 1]
        np.testing.assert_array_equal(p_flt, own)
        assert np.abs(p_i8 - own).max() < 0.25     # large random weights: sharp outputs
        assert (flt.predict(X) == i8.predict(X)).mean() >= 0.9
    else:
        np.testing.assert_array_equal(flt.predict(X), own)
        with pytest.raises(AttributeError, match="needs a classifier"):
            flt.predict_proba(X)
        assert np.abs(i8.predict(X) - own).max() < 0.05 * np.abs(own).max()


def test_cli_predict_takes_int8_as_it_takes_model_npz(saved, tmp_path):
    kind, model, params, path = saved
    X = _X(model.n_features)
    np.save(tmp_path / "X.npy", X)
    out = _export(path)
    for source in (path, out):
        for proba in ((["--proba"] if model.is_classifier else []), []):
            rc, _, err = _run("predict", source, tmp_path / "X.npy", "-o", tmp_path / "p.npy",
                              *proba)
            assert rc == 0, err
            got = np.load(tmp_path / "p.npy")
            loaded = dml.load(source)
            want = (loaded.model.predict(loaded.params, X.astype(loaded.params.dtype))
                    if proba else loaded.predict(X))
            np.testing.assert_array_equal(got, want)


# ---- bad input ----------------------------------------------------------------------------------
def _bad(*args):
    rc, out, err = _run(*args)
    assert rc == 2, (rc, out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def _listing(directory):
    return {p.name: p.read_bytes() for p in Path(directory).iterdir()}


def test_export_refuses_bad_input(tmp_path):
    model = KINDS["mlp"]()
    path = tmp_path / "model.npz"
    path.write_bytes(model_bytes(model, _params(model, 0)))
    (tmp_path / "notes.txt").write_text("not a model\n")
    np.save(tmp_path / "array.npy", np.zeros(3))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    before = _listing(tmp_path)
    assert "no such model file" in _bad("export", tmp_path / "missing.npz", "--int8")
    for name in ("notes.txt", "array.npy", "other.npz"):
        assert "not a dmlcore model file" in _bad("export", tmp_path / name, "--int8")
    assert "is a directory" in _bad("export", tmp_path, "--int8")
    assert "--int8" in _bad("export", path)                         # the format is required
    assert "must be a .npz" in _bad("export", path, "--int8", "-o", tmp_path / "m.int8")
    assert "is the input model" in _bad("export", path, "--int8", "-o", path)
    assert "no such directory" in _bad("export", path, "--int8", "-o", tmp_path / "x" / "m.npz")
    assert _listing(tmp_path) == before                             # nothing written, no temp
    out = _export(path)
    assert "already an int8 export" in _bad("export", out, "--int8", "-o", tmp_path / "b.npz")
    assert sorted(_listing(tmp_path)) == sorted([*before, out.name])


def test_export_never_overwrites_a_foreign_file(tmp_path):
    model = KINDS["softmax"]()
    path = tmp_path / "model.npz"
    path.write_bytes(model_bytes(model, _params(model, 0)))
    foreign = tmp_path / "model.int8.npz"
    np.savez(foreign, W=np.ones(4))                 # an .npz that dmlcore export did not write
    other_model = tmp_path / "old.npz"
    other_model.write_bytes(path.read_bytes())      # a float model is not an export either
    before = _listing(tmp_path)
    err = _bad("export", path, "--int8")
    assert str(foreign) in err and "was not written by dmlcore export" in err
    _bad("export", path, "--int8", "-o", other_model)
    link = tmp_path / "link.npz"
    link.symlink_to(foreign)
    _bad("export", path, "--int8", "-o", link)
    assert _listing(tmp_path) == {**before, "link.npz": foreign.read_bytes()}
    # a previous export is dmlcore's: it is replaced
    target = tmp_path / "deploy.npz"
    _export(path, "-o", target)
    path.write_bytes(model_bytes(model, _params(model, 1)))
    _export(path, "-o", target)
    np.testing.assert_allclose(dml.load(target).params, dml.load(path).params,
                               atol=np.abs(dml.load(path).params).max() / 127)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_damaged_int8_file_is_bad_input(tmp_path):
    model = KINDS["mlp"]()
    path = tmp_path / "model.npz"
    path.write_bytes(model_bytes(model, _params(model, 0)))
    out = _export(path)
    with np.load(out, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["W_int8/layer0"] = arrays["W_int8/layer0"][:-1]
    np.savez(tmp_path / "cut.npz", **arrays)
    (tmp_path / "half.npz").write_bytes(out.read_bytes()[:500])
    np.save(tmp_path / "X.npy", _X(12))
    for name in ("cut.npz", "half.npz"):
        err = _bad("predict", tmp_path / name, tmp_path / "X.npy", "-o", tmp_path / "p.npy")
        assert "not a dmlcore model file" in err
        with pytest.raises(ValueError):
            dml.load(tmp_path / name)
    assert not (tmp_path / "p.npy").exists()


def test_the_installed_command(tmp_path):
    """The real process: exit codes and messages as in this process."""
    model = KINDS["logistic"]()
    path = tmp_path / "model.npz"
    path.write_bytes(model_bytes(model, _params(model, 0)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "dmlcore.cli", "export", str(path), "--int8"]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0 and "model.int8.npz" in ok.stdout, ok.stderr
    again = subprocess.run(cmd[:4] + [str(tmp_path / "model.int8.npz"), "--int8"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


# ---- Fashion-MNIST ------------------------------------------------------------------------------
@NEEDS_FASHION_MNIST_FILES
def test_benchmark_smoke(tmp_path):
    """benchmarks/bench_export.py at a tiny size prints its sizes, accuracies and ratio."""
    import re

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_export.py"),
                          "--small", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    n = r"([\d.,]+)"
    sizes = re.search(rf"float model\.npz\s+{n} bytes\s+test accuracy {n}", run.stdout)
    int8 = re.search(rf"int8 model\.int8\.npz\s+{n} bytes\s+test accuracy {n}", run.stdout)
    ratio = re.search(rf"size int8 / float: {n}x", run.stdout)
    assert sizes and int8 and ratio, run.stdout
    assert float(ratio.group(1)) < 0.35
    assert 0.5 < float(int8.group(2)) <= 1 and 0.5 < float(sizes.group(2)) <= 1
    assert abs(float(int8.group(2)) - float(sizes.group(2))) < 0.02
