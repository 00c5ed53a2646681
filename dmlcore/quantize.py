"""Per-channel int8 model files: ``dmlcore export MODEL.npz --int8``.

Contract
--------
Each layer's ``W`` of shape (n_in, n_out) (a single-output model's ``W`` of
shape (n_in,) is one column) is stored as int8 ``q`` with one float32 scale
per output unit j: ``scale[j] = max_i |W[i, j]| / 127`` (0 for a zero
column) and ``q = clip(round(W / scale), -127, 127)`` (round half to even),
so every weight is within ``scale[j] / 2`` of ``q * scale[j]``. Biases are
kept as float32.

The file holds ``format`` (``FORMAT``), the source's ``config``,
``layer_names``, ``layer_slices``, ``layout`` and ``meta`` (plus
``quantization`` and ``source_dtype``), and per layer ``W_int8/<layer>``,
``W_scale/<layer>`` and ``b/<layer>``: plain arrays that
``np.load(path, allow_pickle=False)`` reads. ``read_params`` rebuilds the
flat parameter vector (``q * scale`` in the source's dtype); predicting
then runs exactly as on a float model.

``export`` writes through a temporary file and a rename, and never replaces
a file that is not an int8 export (nor its own input).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write

__all__ = ["FORMAT", "ExportError", "quantize", "dequantize", "int8_bytes", "is_int8",
           "read_params", "export", "default_output"]

FORMAT = "dmlcore-int8-per-channel-v1"
QMAX = 127


class ExportError(ValueError):
    """Bad input to ``export``: ``str(exc)`` is the one line to show."""


# ---- the arithmetic ------------------------------------------------------------------
def _columns(W):
    """``W`` as (n_in, n_out): a 1-D weight vector is one output column."""
    W = np.asarray(W)
    return W.reshape(-1, 1) if W.ndim == 1 else W.reshape(W.shape[0], -1)


def quantize(W):
    """``(q, scale)``: int8 ``q`` shaped like ``W``, float32 ``scale`` of shape (n_out,).

    Symmetric per output unit (see the module docstring); ``W`` must be finite.
    """
    W = np.asarray(W)
    cols = _columns(W).astype(np.float64)
    scale = (np.abs(cols).max(axis=0, initial=0.0) / QMAX).astype(np.float32)
    divisor = np.where(scale > 0, scale, 1).astype(np.float64)
    q = np.clip(np.rint(cols / divisor), -QMAX, QMAX).astype(np.int8)
    return q.reshape(W.shape), scale


def dequantize(q, scale, dtype=np.float32):
    """``q * scale`` (per output unit) in ``dtype``, shaped like ``q``."""
    q = np.asarray(q)
    dtype = np.dtype(dtype)
    W = _columns(q).astype(dtype) * np.asarray(scale, dtype=dtype)
    return W.reshape(q.shape)


# ---- the file --------------------------------------------------------------------------
def int8_bytes(model, params, meta=None):
    """The int8 file's contents for ``model`` with ``params`` (see the module docstring)."""
    from . import __version__
    from .outputs import model_bytes

    params = np.ascontiguousarray(params)
    for name, s in model.layer_slices.items():
        if not np.isfinite(params[s]).all():
            raise ExportError(f"layer {name} has NaN or infinite parameters; nothing to export")
    info = dict(meta or {})
    info.update({"quantization": "int8, symmetric, one scale per output unit",
                 "source_dtype": str(params.dtype), "exported_by": __version__})
    with np.load(io.BytesIO(model_bytes(model, params, info)), allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("config", "layer_names", "layer_slices", "layout", "meta")}
    arrays["format"] = np.array(FORMAT)
    for name, view in model.views(params).items():
        q, scale = quantize(view["W"])
        arrays[f"W_int8/{name}"] = q
        arrays[f"W_scale/{name}"] = scale
        arrays[f"b/{name}"] = np.asarray(view["b"], dtype=np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def is_int8(z):
    """Whether an opened ``.npz`` (``np.load``'s ``NpzFile``) is an int8 export."""
    return "format" in z.files and str(z["format"]) == FORMAT


def read_params(z, model, meta):
    """The flat parameter vector of an opened int8 file, dequantized into the source dtype.

    Raises ``ValueError`` naming the array that is missing or has the wrong shape or dtype.
    """
    dtype = np.dtype(meta.get("source_dtype", "float32"))
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"source_dtype {dtype} is not float32 or float64")
    params = np.empty(model.n_params, dtype=dtype)
    for name, view in model.views(params).items():
        q = _array(z, f"W_int8/{name}", view["W"].shape, np.int8)
        n_out = _columns(view["W"]).shape[1]
        scale = _array(z, f"W_scale/{name}", (n_out,), np.float32)
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise ValueError(f"W_scale/{name} holds negative or non-finite scales")
        view["W"][...] = dequantize(q, scale, dtype)
        view["b"][...] = _array(z, f"b/{name}", view["b"].shape, np.float32)
    return params


def _array(z, key, shape, dtype):
    if key not in z.files:
        raise ValueError(f"no {key} array")
    a = z[key]
    if a.shape != tuple(shape) or a.dtype != dtype:
        raise ValueError(f"{key} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} "
                         f"{tuple(shape)}")
    return a


# ---- export ------------------------------------------------------------------------------
def default_output(src):
    """``model.npz`` -> ``model.int8.npz``, next to the input."""
    src = Path(src)
    return src.with_name(f"{src.stem}.int8.npz")


def _is_export(path):
    """Whether ``path`` is a regular file holding an int8 export (so dmlcore may replace it)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return isinstance(z, np.lib.npyio.NpzFile) and is_int8(z)
    except Exception:  # noqa: BLE001 - unreadable means: not ours
        return False


def _read_source(src):
    from .outputs import load_model

    if not src.exists():
        raise ExportError(f"{src}: no such model file")
    if src.is_dir():
        raise ExportError(f"{src} is a directory, not a model file")
    if _is_export(src):
        raise ExportError(f"{src} is already an int8 export; export the float model it "
                          f"came from")
    try:
        return load_model(src)
    except (ValueError, OSError) as exc:
        from ._util import first_line

        raise ExportError(f"{src}: not a dmlcore model file ({first_line(exc)})") from None


def _check_output(src, dst):
    """Whether ``dst`` exists and may be replaced; raises ``ExportError`` if it may not."""
    if dst.suffix != ".npz":
        raise ExportError(f"-o {dst}: the output must be a .npz file")
    if dst.exists() or dst.is_symlink():
        if dst.resolve() == src.resolve():
            raise ExportError(f"-o {dst} is the input model; choose another output")
        if dst.is_dir():
            raise ExportError(f"-o {dst} is a directory")
        if not _is_export(dst):
            raise ExportError(f"{dst} exists and was not written by dmlcore export; move it "
                              f"away or choose another -o")
        return True
    if not dst.parent.is_dir():
        raise ExportError(f"-o {dst}: no such directory {dst.parent}")
    return False


def export(src, dst=None):
    """Write the int8 export of the model file ``src`` to ``dst`` (default: ``default_output``).

    Returns ``(dst, bytes written)``. Raises ``ExportError`` (nothing written) when
    ``src`` is missing, not a dmlcore model or already int8, or ``dst`` is taken by a
    file that is not an int8 export; a replaced export is swapped in by a rename.
    """
    src = Path(src)
    dst = default_output(src) if dst is None else Path(dst)
    model, params, meta = _read_source(src)
    replace = _check_output(src, dst)
    meta = dict(meta, source=src.name)
    content = int8_bytes(model, params, meta)
    try:
        atomic_write(dst, lambda f: f.write(content), replace=replace)
    except FileExistsError:
        raise ExportError(f"{dst} appeared while exporting; it was left as it is") from None
    except OSError as exc:
        raise ExportError(f"cannot write {dst}: {exc.strerror or exc}") from None
    return dst, len(content)

