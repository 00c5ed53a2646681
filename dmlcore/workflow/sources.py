"""The data section: checking its sources, and loading them.

``_check_data`` checks ``data:`` (partitioning keywords from ``partition``'s
signature, one source, an optional test set or holdout) and returns it
normalised: each source ``{"kind": "fashion_mnist" | "synthetic" | "files",
...}``, file paths absolute (relative ones are relative to the workflow
file). ``_load_source`` turns a normalised source into ``(X, y)``: numpy or
dask arrays (synthetic data are built on the workers), or CSR for ``.npz``.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from .. import datasets, registry
from ..data import SCHEMES, partition
from .schema import _describe, _signature_params

_SOURCE_KEYS = ("fashion_mnist", "synthetic", "path")
# partition() keywords that are not data settings
_PARTITION_RESERVED = {"X", "y", "client", "persist", "x", "n_partitions", "sample_weight"}


def _check_source(check, source, path, wf, test=False):
    """Check one data source; returns it normalised to {'kind': ..., ...}."""
    if isinstance(source, str):
        if source != "fashion_mnist":
            check.fail(path, f"{source!r} is not a known data set; use fashion_mnist, "
                       f"{{synthetic: {{...}}}} or {{path: X.npy, labels: y.npy}}")
        return {"kind": "fashion_mnist"}
    source = check.mapping(source, path)
    given = [k for k in _SOURCE_KEYS if k in source]
    if len(given) != 1:
        check.fail(path, "expected one of fashion_mnist, {synthetic: {...}} or "
                   "{path: ..., labels: ...}")
    if "fashion_mnist" in source:
        check.keys(source, path, ("fashion_mnist",))
        opts = check.mapping(source["fashion_mnist"], tuple(path) + ("fashion_mnist",),
                             allow_none=True)
        params = _signature_params(datasets.fashion_mnist)
        check.keys(opts, tuple(path) + ("fashion_mnist",), set(params) - {"flatten"})
        return {"kind": "fashion_mnist", **opts}
    if "synthetic" in source:
        check.keys(source, path, ("synthetic",))
        spath = tuple(path) + ("synthetic",)
        opts = check.mapping(source["synthetic"], spath)
        kind = check.kind(opts, spath, "synthetic")
        maker = registry.resolve("synthetic", kind)
        params = _signature_params(maker)
        allowed = (set(params) - {"coef"}) | {"kind"}
        required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
        check.keys(opts, spath, allowed, required)
        check.arguments(opts, spath, params, skip=("kind", "dtype"))
        if "dtype" in opts and opts["dtype"] not in ("float32", "float64"):
            check.fail(spath + ("dtype",), f"{opts['dtype']!r} is not one of float32, float64")
        if "chunks" in opts and not (isinstance(opts["chunks"], int) and opts["chunks"] > 0
                                     and not isinstance(opts["chunks"], bool)
                                     or opts["chunks"] == "auto"):
            check.fail(spath + ("chunks",), f"expected a positive row count or 'auto', got "
                       f"{_describe(opts['chunks'])}")
        return {"kind": "synthetic", "generator": kind,
                "options": {k: v for k, v in opts.items() if k != "kind"}}
    params = _signature_params(datasets.load_arrays)
    check.keys(source, path, set(params))
    for key in ("path", "labels", "x", "y"):
        if key in source and source[key] is not None and not isinstance(source[key], str):
            check.fail(tuple(path) + (key,), f"expected a string, got {_describe(source[key])}")
    # relative paths are relative to the workflow file's folder, not the current directory
    file = _resolve_path(wf, source["path"])
    if not file.exists():
        check.fail(tuple(path) + ("path",), f"data file not found: {source['path']} "
                   f"(looked for {file})")
    out = {"kind": "files", **source, "path": str(file)}
    labels = source.get("labels")
    if labels and ("/" in labels or "." in labels):
        labels_file = _resolve_path(wf, labels)
        if not labels_file.exists():
            check.fail(tuple(path) + ("labels",), f"labels file not found: {labels} "
                       f"(looked for {labels_file})")
        out["labels"] = str(labels_file)
    return out


def _check_weights_file(check, name, wf):
    """``data.weights``: a ``.npy`` file of one weight per training row."""
    path = ("data", "weights")
    if not isinstance(name, str) or not name.endswith(".npy"):
        check.fail(path, f"expected the path of a .npy file of row weights, got {_describe(name)}")
    file = _resolve_path(wf, name)
    if not file.exists():
        check.fail(path, f"weights file not found: {name} (looked for {file})")
    return str(file)


def _load_weights(file, n_rows):
    """The row weights of ``data.weights`` (float64, one per source row)."""
    w = np.load(file, mmap_mode="r", allow_pickle=False)
    if w.ndim != 1 or w.shape[0] != n_rows:
        raise ValueError(f"the weights file holds shape {w.shape}; expected one weight per "
                         f"row of the source ({n_rows})")
    return np.asarray(w, dtype=np.float64)


def _resolve_path(wf, name):
    """``name`` (a data path from the workflow) as an absolute path; relative to its folder."""
    p = Path(name).expanduser()
    if not p.is_absolute():
        p = Path(getattr(wf, "base_dir", ".") or ".") / p
    return p.absolute()


def _check_data(check, cfg, wf):
    data = check.mapping(cfg.get("data"), ("data",))
    params = {n: p for n, p in _signature_params(partition).items()
              if n not in _PARTITION_RESERVED}
    allowed = set(params) | {"source", "test", "partitions", "max_rows", "dtype", "weights"}
    check.keys(data, ("data",), allowed, required=("source",))
    check.arguments(data, ("data",), params, skip=("source", "test", "dtype", "weights"))
    if "scheme" in data and data["scheme"] not in SCHEMES:
        check.fail(("data", "scheme"), f"{data['scheme']!r} is not one of {', '.join(SCHEMES)}")
    if "dtype" in data and data["dtype"] not in ("float32", "float64"):
        check.fail(("data", "dtype"), f"{data['dtype']!r} is not one of float32, float64")
    out = dict(data)
    out["source"] = _check_source(check, data["source"], ("data", "source"), wf)
    if "weights" in data:
        out["weights"] = _check_weights_file(check, data["weights"], wf)
    if out["source"]["kind"] == "fashion_mnist" and isinstance(data["source"], str):
        out["source"]["split"] = "train"
    test = data.get("test")
    if test is not None:
        tpath = ("data", "test")
        test = check.mapping(test, tpath)
        check.keys(test, tpath, ("source", "split"))
        if "source" in test:
            src = _check_source(check, test["source"], tpath + ("source",), wf, test=True)
            if src["kind"] == "fashion_mnist":
                split = test.get("split", "test")
                if split not in ("train", "test"):
                    check.fail(tpath + ("split",), f"{split!r} is not one of train, test")
                src["split"] = split
            elif "split" in test:
                check.fail(tpath + ("split",), "split goes with source: fashion_mnist, or "
                           "alone (a holdout fraction of the training data)")
            out["test"] = {"source": src}
        else:
            if "split" not in test:
                check.fail(tpath, "expected source: ... and/or split: (a holdout fraction "
                           "such as 0.2, or a row count)")
            split = test["split"]
            ok = (not isinstance(split, bool) and isinstance(split, (int, float))
                  and (0 < split < 1 or (isinstance(split, int) and split >= 1)))
            if not ok:
                check.fail(tpath + ("split",), f"expected a fraction in (0, 1) or a row count "
                           f">= 1, got {_describe(split)}")
            out["test"] = {"holdout": split}
    return out




def _check_shapes(X, y, what="X"):
    if X.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows x features), got shape {tuple(X.shape)}")
    if y is None:
        raise ValueError("no labels: give labels: (a file or a variable name)")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but the labels have {y.shape[0]}")


# ---------------------------------------------------------------------------
# Building data, model, strategy, optimizer
# ---------------------------------------------------------------------------
def _load_files(src):
    kwargs = {k: v for k, v in src.items() if k not in ("kind",)}
    return datasets.load_arrays(**kwargs)


def _load_source(src, client):
    """``(X, y)``: numpy or dask arrays (synthetic data are built on the workers)."""
    if src["kind"] == "fashion_mnist":
        opts = {k: v for k, v in src.items() if k != "kind"}
        return datasets.fashion_mnist(**opts)
    if src["kind"] == "synthetic":
        opts = dict(src["options"])
        if "dtype" in opts:
            opts["dtype"] = np.dtype(opts["dtype"])
        return registry.resolve("synthetic", src["generator"])(**opts)
    return _load_files(src)



def _source_label(source):
    kind = source.get("kind")
    if kind == "files":
        return f"file {source.get('path')}"
    if kind == "fashion_mnist":
        return f"fashion_mnist ({source.get('split', 'train')})"
    return f"synthetic {source.get('generator', kind)}"

