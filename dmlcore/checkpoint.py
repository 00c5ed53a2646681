"""Atomic checkpoints: one ``.npz`` per saved step, loadable without pickle.

A checkpoint holds the flat parameters, the optimizer state's arrays and
scalars (``opt/<field>``), the step, the strategy's extra state
(``extra/<name>``), the history so far (``history/<var>``) and a JSON header
(``meta``). It is written to a temporary file in the same directory and
renamed, so a reader never sees a half-written checkpoint; ``latest`` skips
files that fail to load.

Each run has a ``run_id`` (``new_run_id()``), written into the file name
(``ckpt-<step>-<run id>.npz``) and ``meta``; rotation keeps the newest
``keep`` checkpoints *of that run*, ordered by step number, so two runs
sharing a directory never delete each other's files. ``latest`` picks one
run (the given id, else the run written last) and refuses a checkpoint
whose ``meta["model"]`` differs from the caller's model configuration.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from pathlib import Path

import numpy as np

_NAME = re.compile(r"^ckpt-(?P<step>\d{9,})(?:-(?P<run>[0-9a-f]{1,32}))?\.npz$")


def new_run_id():
    """A fresh run id (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def _parse(path):
    """``(step, run id or "")`` of a checkpoint file name, or None."""
    m = _NAME.match(Path(path).name)
    return None if m is None else (int(m["step"]), m["run"] or "")


def atomic_write(path, write, replace=True):
    """Call ``write(file object)`` on a temporary file next to ``path``, then rename
    it to ``path`` (mode 0666 less the umask, as ``open`` would create it).

    ``replace=False``: a file created at ``path`` meanwhile is kept and
    ``FileExistsError`` raised (a hard link, where the file system has them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = os.umask(0o022)
    os.umask(mask)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            os.fchmod(f.fileno(), 0o666 & ~mask)        # mkstemp creates 0600
            f.flush()
            os.fsync(f.fileno())
        if replace or not _link(tmp, path):
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _link(tmp, path):
    """Hard-link ``tmp`` to a new ``path``; False where the file system has no links."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        return False
    return True


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
         keep=3, run_id=None):
    """Write ``ckpt-<step>[-<run_id>].npz`` atomically; keep the run's newest ``keep`` by step."""
    directory = Path(directory)
    meta = dict(meta or {})
    if run_id is not None:
        meta["run_id"] = str(run_id)
    arrays = {"params": params, "step": np.int64(step), "meta": np.array(json.dumps(meta))}
    arrays.update(_state_arrays(opt_state))
    for name, value in (extra or {}).items():
        arrays[f"extra/{name}"] = np.asarray(value)
    for name, values in (history or {}).items():
        arrays[f"history/{name}"] = np.asarray(values, dtype=np.float64)
    suffix = "" if run_id is None else f"-{run_id}"
    path = directory / f"ckpt-{int(step):09d}{suffix}.npz"
    atomic_write(path, lambda f: np.savez(f, **arrays))
    if keep:
        for old in list_checkpoints(directory, run_id=run_id or "")[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory, run_id=None):
    """Checkpoint files in ``directory`` (of run ``run_id`` if given), by step, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(_parse(p), p) for p in directory.iterdir()]
    found = [(key, p) for key, p in found if key is not None
             and (run_id is None or key[1] == str(run_id))]
    return [p for key, p in sorted(found, key=lambda kp: (kp[0][0], kp[1].name))]


def runs(directory):
    """The run ids with checkpoints in ``directory`` ("" for files without one)."""
    return sorted({_parse(p)[1] for p in list_checkpoints(directory)})


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


def latest(directory, run_id=None, model_config=None):
    """The newest checkpoint (by step) that loads, of one run; None if there is none.

    ``run_id``: that run (ValueError if the directory holds only other runs'
    checkpoints); None: the run whose newest file was written last.
    ``model_config``: ValueError if the checkpoint was written for another model.
    """
    present = runs(directory)
    if not present:
        return None
    if run_id is not None:
        if str(run_id) not in present:
            raise ValueError(f"no checkpoint of run {run_id} in {directory} (it holds "
                             f"run{'s' if len(present) > 1 else ''} "
                             f"{', '.join(r or '(no id)' for r in present)})")
        chosen = str(run_id)
    else:
        chosen = max(present, key=lambda r: max(
            p.stat().st_mtime_ns for p in list_checkpoints(directory, run_id=r)))
    for path in reversed(list_checkpoints(directory, run_id=chosen)):
        try:
            saved = load(path)
        except Exception:  # a damaged file: fall back to the previous one
            continue
        saved["path"] = path
        saved_model = saved["meta"].get("model")
        if model_config is not None and saved_model is not None and saved_model != model_config:
            raise ValueError(f"the checkpoint {path} was written for the model {saved_model}; "
                             f"this run builds {model_config}")
        return saved
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
