"""What a workflow run leaves in its output directory, written atomically.

Design
------
Every output is first rendered to bytes in memory (``config.yaml``,
``history.nc``, ``model.npz``, ``metrics.json``, the PNG plots; for sweeps
``sweep.nc`` and ``best.yaml``), so an error while producing any of them
happens before a single file is touched. ``commit`` then writes each file
with ``checkpoint.atomic_write`` (temporary name in the same directory +
rename) and swaps the run's live checkpoints (``checkpoints.partial``) into
``checkpoints``. Each run lists what it wrote in ``.dmlcore-manifest.json``;
a later run replaces or removes only names that manifest lists (folders:
also those holding a ``.dmlcore-dir`` marker) and refuses, before writing
anything, a name taken by a file it did not write: a user's file is never
touched. A reader sees the previous run's file or the new one, never a
half-written one; a failed run leaves the previous run's files as they were.

``model.npz`` holds ``params`` (the flat vector), ``config`` (the model's
``to_config()`` as JSON, rebuilt by ``dml.models.from_config``), the layout
(``layer_names``, ``layer_slices`` [start, stop) rows, ``layout`` JSON with
the W/b shapes) and ``meta`` (JSON: dmlcore version, dtype, workflow).
Everything is a plain array: ``np.load(path, allow_pickle=False)`` reads it.
``load_model`` and ``load`` (``dml.load``) also read the int8 export of such a
file (``dmlcore.quantize``).
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write
from .workflow import WorkflowError

__all__ = ["model_bytes", "load_model", "load", "SavedModel", "labels", "history_bytes",
           "run_files", "sweep_files", "commit", "sweep_dataset", "check_free", "claim_dir",
           "OutputConflict", "MANIFEST"]


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _clean(value):
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def json_bytes(obj):
    return (json.dumps(_clean(obj), indent=2, default=_json_default) + "\n").encode()


def yaml_bytes(config):
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None).encode()


# ---- model file ----------------------------------------------------------------
def model_bytes(model, params, meta=None):
    """``model.npz`` contents (see the module docstring)."""
    from . import __version__

    params = np.ascontiguousarray(params)
    views = model.views(params)
    slices = model.layer_slices
    layout = [{"name": name, "start": s.start, "stop": s.stop,
               "W": list(views[name]["W"].shape), "b": list(views[name]["b"].shape)}
              for name, s in slices.items()]
    info = {"dmlcore": __version__, "dtype": str(params.dtype), "n_params": int(params.size)}
    info.update(meta or {})
    arrays = {
        "params": params,
        "config": np.array(json.dumps(model.to_config())),
        "layer_names": np.array(list(slices), dtype=str),
        "layer_slices": np.array([[s.start, s.stop] for s in slices.values()], dtype=np.int64)
        .reshape(-1, 2),
        "layout": np.array(json.dumps(layout)),
        "meta": np.array(json.dumps(info, default=_json_default)),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_model(path):
    """``(model, params, meta)`` from a ``model.npz`` written by ``dmlcore run``, or from
    its int8 export (``dmlcore.quantize``: the weights come back dequantized).

    Raises ``FileNotFoundError``, or ``ValueError`` naming why the file is not a model.
    """
    import zipfile

    from . import quantize
    from .models import from_config

    try:
        opened = np.load(path, allow_pickle=False)
        if not isinstance(opened, np.lib.npyio.NpzFile):
            raise ValueError("a .npy array, not a .npz model file")
        with opened as z:
            int8 = quantize.is_int8(z)
            missing = [k for k in (("config",) if int8 else ("params", "config"))
                       if k not in z.files]
            if missing:
                raise ValueError(f"{path} is not a dmlcore model file (no {', '.join(missing)})")
            config = json.loads(str(z["config"]))
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            if not isinstance(config, dict) or not isinstance(meta, dict):
                raise ValueError("config and meta must be JSON objects")
            model = from_config(config)
            params = quantize.read_params(z, model, meta) if int8 else np.array(z["params"])
    except (zipfile.BadZipFile, EOFError, KeyError, TypeError) as exc:
        raise ValueError(f"damaged or foreign file ({type(exc).__name__}: {exc})") from None
    model._check_params(params)
    return model, params, meta


class SavedModel:
    """A model file loaded for prediction (``dml.load``): float ``model.npz`` or int8 export.

    ``model``, ``params`` (int8 weights dequantized), ``meta``, ``quantized``.
    ``predict(X)``: what ``dmlcore predict`` writes without ``--proba``: class
    codes 0..K-1 for classifiers (argmax; a binary logistic model: P(y=1) > 0.5),
    the model's output otherwise. ``predict_proba(X)`` (classifiers): (n, K)
    probabilities; a binary logistic model gives the columns P(y=0), P(y=1).
    X: (n, n_features) numbers, converted to the parameters' dtype.
    """

    def __init__(self, model, params, meta):
        self.model, self.params, self.meta = model, params, meta
        self.quantized = "quantization" in meta

    def _output(self, X):
        X = np.ascontiguousarray(np.asarray(X), dtype=self.params.dtype)
        return np.asarray(self.model.predict(self.params, X))

    def predict(self, X):
        return labels(self.model, self._output(X))

    def predict_proba(self, X):
        if not self.model.is_classifier:
            raise AttributeError(f"predict_proba needs a classifier; {self.model!r} "
                                 "predicts values")
        out = self._output(X)
        return np.column_stack([1.0 - out, out]) if out.ndim == 1 else out

    def __repr__(self):
        return f"SavedModel({self.model!r}{', int8' if self.quantized else ''})"


def labels(model, out):
    """Class codes from a classifier's ``predict`` output (others: ``out`` unchanged)."""
    out = np.asarray(out)
    if not model.is_classifier:
        return out
    if out.ndim == 1:                 # binary: P(y = 1)
        return (out > 0.5).astype(np.int64)
    return out.argmax(axis=1).astype(np.int64)


def load(path):
    """``SavedModel`` of the model file ``path`` (``model.npz`` or its int8 export)."""
    return SavedModel(*load_model(path))


# ---- history -------------------------------------------------------------------
def _netcdf_safe(ds):
    """A copy of ``ds`` that netCDF3 (scipy engine) can hold: scalar attrs, no bools/int64 data."""
    ds = ds.copy()
    attrs = {}
    for k, v in ds.attrs.items():
        if isinstance(v, (bool, np.bool_)):
            v = int(v)
        if v is None:
            continue
        attrs[k] = v if isinstance(v, (str, int, float, np.integer, np.floating)) else str(v)
    ds.attrs = attrs
    for name in list(ds.variables):
        var = ds[name]
        var.attrs = {k: (v if isinstance(v, (str, int, float)) else str(v))
                     for k, v in var.attrs.items() if v is not None}
        if var.dtype == bool:
            ds[name] = var.astype(np.int8)
        elif var.dtype.kind in "iu" and var.dtype.itemsize == 8 and name not in ds.dims:
            ds[name] = var.astype(np.float64)
        elif var.dtype.kind == "O":
            ds[name] = var.astype(str)
    return ds


def history_bytes(ds):
    """A Dataset as netCDF bytes (netCDF3 via scipy: no HDF5 library needed)."""
    return bytes(_netcdf_safe(ds).to_netcdf(engine="scipy"))


# ---- a run's files ---------------------------------------------------------------
def run_files(config, result, metrics, *, strategy_kind, plots=True, meta=None):
    """{file name: bytes} of a single run."""
    from . import plots as plotting

    model_meta = dict(meta or {})
    model_meta["workflow_name"] = config.get("name", "")
    files = {
        "config.yaml": yaml_bytes(config),
        "history.nc": history_bytes(result.history),
        "model.npz": model_bytes(result.model, result.params, model_meta),
        "metrics.json": json_bytes(metrics),
    }
    if plots:
        files.update(plotting.history_plots(result.history, strategy_kind=strategy_kind,
                                            title=config.get("name", "")))
    return files


def _coord_values(values):
    """Sweep values as a netCDF coordinate: numbers stay numbers, anything else a string."""
    if all(isinstance(v, bool) for v in values):
        return np.array([str(v).lower() for v in values])
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.float64)
    if all(isinstance(v, str) for v in values):
        return np.array(values)
    return np.array([json.dumps(v) for v in values])


def sweep_dataset(plan, results):
    """One dimension per swept key: final metrics and history curves (NaN-padded)."""
    import xarray as xr

    keys = plan.sweep_keys
    shape = tuple(len(plan.sweep_values[k]) for k in keys)
    coords = {k: _coord_values(plan.sweep_values[k]) for k in keys}
    max_steps = max(int(r.fit.history.sizes.get("step", 0)) for r in results)
    steps = np.arange(1, max_steps + 1)
    finals = ("final_loss", "eval_loss", "eval_accuracy", "wall_time", "steps", "bytes_sent")
    final_arrays = {name: np.full(shape, np.nan) for name in finals}
    curve_names = []
    for r in results:
        for name in ("loss", "eval_loss", "eval_accuracy", "wall_time", "bytes_sent"):
            if name in r.fit.history and name not in curve_names:
                curve_names.append(name)
    curves = {name: np.full(shape + (max_steps,), np.nan) for name in curve_names}
    index_of = {k: {json.dumps(v): i for i, v in enumerate(plan.sweep_values[k])} for k in keys}
    for r in results:
        idx = tuple(index_of[k][json.dumps(r.spec.assignment[k])] for k in keys)
        for name in finals:
            value = r.metrics.get(name)
            final_arrays[name][idx] = np.nan if value is None else float(value)
        h = r.fit.history
        pos = np.asarray(h["step"].values, dtype=np.int64) - 1
        ok = (pos >= 0) & (pos < max_steps)
        for name in curve_names:
            if name in h:
                curves[name][idx + (pos[ok],)] = np.asarray(h[name].values, np.float64)[ok]
    data = {name: (keys, arr) for name, arr in final_arrays.items()}
    data.update({f"{name}_curve": (keys + ["step"], arr) for name, arr in curves.items()})
    coords["step"] = steps
    ds = xr.Dataset(data, coords=coords,
                    attrs={"swept_keys": ",".join(keys), "workflow": plan.workflow.name})
    return ds


def sweep_files(plan, results, best, best_config, *, plots=True):
    """{file name: bytes} of a sweep: sweep.nc, best.yaml, the best run's model/history."""
    from . import plots as plotting

    best_run = results[best]
    metrics = {"best": dict(best_run.spec.assignment), "best_metrics": best_run.metrics,
               "runs": [r.metrics for r in results]}
    files = {
        "config.yaml": yaml_bytes(plan.base_config),
        "sweep.nc": history_bytes(sweep_dataset(plan, results)),
        "best.yaml": yaml_bytes(best_config),
        "history.nc": history_bytes(best_run.fit.history),
        "model.npz": model_bytes(best_run.fit.model, best_run.fit.params,
                                 {"workflow": plan.workflow.name,
                                  "sweep": dict(best_run.spec.assignment)}),
        "metrics.json": json_bytes(metrics),
    }
    if plots:
        curves = [(r.spec.label, r.fit.history) for r in results]
        files.update(plotting.sweep_plots(curves, title=plan.base_config.get("name", "")))
    return files


# ---- committing ------------------------------------------------------------------
MANIFEST = ".dmlcore-manifest.json"
DIR_MARK = ".dmlcore-dir"
# Names every run writes (plots vary and are checked when committing).
FIXED_NAMES = ("config.yaml", "history.nc", "model.npz", "metrics.json")


class OutputConflict(WorkflowError):
    """A name dmlcore must write is taken by a file or folder that dmlcore did not write."""


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_manifest(out_dir):
    """``{"files": set, "dirs": set}`` that the previous run's manifest lists (empty if none)."""
    try:
        data = json.loads((Path(out_dir) / MANIFEST).read_text())
        return {"files": {str(n) for n in data.get("files", [])},
                "dirs": {str(n) for n in data.get("dirs", [])}}
    except (OSError, ValueError, AttributeError):
        return {"files": set(), "dirs": set()}


def _write_manifest(out_dir, files, dirs):
    from . import __version__

    body = json_bytes({"dmlcore": __version__, "files": sorted(files), "dirs": sorted(dirs)})
    atomic_write(Path(out_dir) / MANIFEST, lambda f: f.write(body))


def owns_dir(out_dir, name):
    """Whether ``out_dir/name`` is a folder dmlcore wrote (listed in the manifest or marked)."""
    path = Path(out_dir) / name
    if path.is_symlink() or not path.is_dir():
        return False
    return name in read_manifest(out_dir)["dirs"] or (path / DIR_MARK).is_file()


def check_free(out_dir, files=(), dirs=()):
    """Raise ``OutputConflict`` if a name of ``files``/``dirs`` exists and is not dmlcore's.

    A file is dmlcore's when the previous run's manifest lists it; a folder when
    the manifest lists it or it holds the ``DIR_MARK`` file. Nothing is touched.
    """
    out_dir = Path(out_dir)
    owned = read_manifest(out_dir)
    for name in files:
        path = out_dir / name
        if (path.exists() or path.is_symlink()) and not (
                name in owned["files"] and path.is_file() and not path.is_symlink()):
            raise OutputConflict(f"{path} exists and was not written by dmlcore (no {MANIFEST} "
                                 f"lists it); move it away or choose another output.dir")
    for name in dirs:
        path = out_dir / name
        if (path.exists() or path.is_symlink()) and not owns_dir(out_dir, name):
            raise OutputConflict(f"{path} exists and was not written by dmlcore (no {DIR_MARK} "
                                 f"in it); move it away or choose another output.dir")


def claim_dir(out_dir, name, *, reset):
    """Make ``out_dir/name`` a marked dmlcore folder; ``reset`` empties one dmlcore wrote.

    Raises ``OutputConflict`` (touching nothing) when the folder exists and is not dmlcore's.
    """
    out_dir = Path(out_dir)
    check_free(out_dir, dirs=[name])
    path = out_dir / name
    if reset and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / DIR_MARK).touch()
    return path


def commit(out_dir, files, checkpoints=()):
    """Write ``files`` atomically into ``out_dir``; swap live checkpoint dirs into place.

    ``checkpoints``: ``[(live dir, final dir)]``, both directly in ``out_dir``:
    the final dir is replaced by the live one. Only names that the previous
    run's manifest (``MANIFEST``) lists are replaced or removed; if any name
    this run writes is taken by something dmlcore did not write,
    ``OutputConflict`` is raised before anything is written. The new manifest
    lists what this run wrote.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    swaps = [(Path(live), Path(final)) for live, final in checkpoints if Path(live).exists()]
    new_dirs = {final.name for _, final in swaps}
    check_free(out_dir, files=list(files), dirs=sorted(new_dirs))
    for live, _ in swaps:
        if not owns_dir(out_dir, live.name):
            raise OutputConflict(f"{live} was not written by dmlcore (no {DIR_MARK} in it)")
    prev = read_manifest(out_dir)
    # Until the end, the manifest lists both runs' names: an interrupted commit
    # leaves nothing that a later run would take for a user's file.
    _write_manifest(out_dir, prev["files"] | set(files), prev["dirs"] | new_dirs)
    mode = 0o666 & ~_umask()
    for name, content in files.items():
        def write(f, c=content):
            f.write(c)
            os.fchmod(f.fileno(), mode)     # temporary files are created 0600
        atomic_write(out_dir / name, write)
    for name in prev["files"] - set(files):
        path = out_dir / name
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
    for live, final in swaps:
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=out_dir))
            final.rename(old / final.name)
        (live / DIR_MARK).touch()
        live.rename(final)
        if old is not None:
            shutil.rmtree(old)
    kept = set(new_dirs)
    for name in prev["dirs"] - new_dirs:
        if owns_dir(out_dir, name):
            kept.add(name)          # an earlier run's folder this run did not replace
    _write_manifest(out_dir, set(files), kept)
