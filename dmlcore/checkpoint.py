"""Atomic checkpoints: one ``.npz`` per saved step, loadable without pickle.

A checkpoint holds the flat parameters, the optimizer state's arrays and
scalars (``opt/<field>``), the step, the strategy's extra state
(``extra/<name>``), the history so far (``history/<var>``) and a JSON header
(``meta``). It is written to a temporary file in the same directory and
renamed, so a reader never sees a half-written checkpoint; ``latest`` skips
files that fail to load.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

_NAME = re.compile(r"^ckpt-(\d{9})\.npz$")


def atomic_write(path, write):
    """Call ``write(file object)`` on a temporary file next to ``path``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _state_arrays(state):
    out = {}
    if state is None:
        return out
    for name, value in state._asdict().items():
        if value is None:
            continue
        out[f"opt/{name}"] = np.asarray(value)
    return out


def save(directory, step, params, opt_state=None, history=None, extra=None, meta=None,
         keep=3):
    """Write ``ckpt-<step>.npz`` atomically in ``directory``; keep the newest ``keep``."""
    directory = Path(directory)
    arrays = {"params": params, "step": np.int64(step),
              "meta": np.array(json.dumps(meta or {}))}
    arrays.update(_state_arrays(opt_state))
    for name, value in (extra or {}).items():
        arrays[f"extra/{name}"] = np.asarray(value)
    for name, values in (history or {}).items():
        arrays[f"history/{name}"] = np.asarray(values, dtype=np.float64)
    path = directory / f"ckpt-{int(step):09d}.npz"
    atomic_write(path, lambda f: np.savez(f, **arrays))
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory):
    """Checkpoint files in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load(path):
    """Read one checkpoint into a dict (``params``, ``step``, ``opt``, ``extra``, ``history``, ``meta``)."""
    with np.load(path, allow_pickle=False) as z:
        out = {"params": z["params"], "step": int(z["step"]),
               "meta": json.loads(str(z["meta"])), "opt": {}, "extra": {}, "history": {}}
        for key in z.files:
            for group in ("opt", "extra", "history"):
                if key.startswith(group + "/"):
                    out[group][key[len(group) + 1:]] = z[key]
    return out


def latest(directory):
    """The newest checkpoint of ``directory`` that loads, or None."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load(path)
        except Exception:  # a damaged file: fall back to the previous one
            continue
    return None


def restore_state(template, arrays):
    """Rebuild an optimizer state like ``template`` from ``load(...)["opt"]``."""
    if template is None:
        return None
    fields = {}
    for name, value in template._asdict().items():
        if name in arrays:
            saved = arrays[name]
            fields[name] = saved.item() if saved.ndim == 0 else saved.astype(
                value.dtype if isinstance(value, np.ndarray) else saved.dtype)
        else:
            fields[name] = value
    return type(template)(**fields)
