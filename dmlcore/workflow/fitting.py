"""One fit of a checked configuration, its checkpoints and its metrics.

``_fit_one(spec, prepared, client, dirs, resume, ...)`` builds the model,
strategy and optimizer, sets up the live checkpoint folder (only folders
dmlcore wrote are emptied or replaced; the runs of a sweep claim them one at
a time) and calls ``dml.fit``; ``--resume`` of a finished run raises
``_NothingToDo``. ``_metrics`` is what ``metrics.json`` holds.
"""
from __future__ import annotations

import re
import shutil
import threading
import time
from dataclasses import dataclass

import numpy as np

from .. import checkpoint as ckpt
from .. import outputs
from .build import build_model, build_run_optimizer, build_strategy
from .prepare import PreparedData
from .schema import _Checker, _located
from .validate import RunSpec


@dataclass
class RunResult:
    spec: RunSpec
    fit: object          # FitResult
    prepared: PreparedData
    metrics: dict


def _metrics(spec, result, prepared, seconds):
    h = result.history
    out = {"name": spec.config.get("name", ""), "steps": int(result.steps),
           "final_loss": _last(h, "loss"), "eval_loss": _last(h, "eval_loss"),
           "eval_accuracy": _last(h, "eval_accuracy"),
           "wall_time": _last(h, "wall_time"),
           "bytes_sent": float(np.nansum(h["bytes_sent"].values)) if "bytes_sent" in h else 0.0,
           "run_seconds": round(seconds, 3),
           "n_partitions": int(prepared.data.n_partitions),
           "n_rows": int(prepared.data.n_rows),
           "model": repr(result.model),
           # the configuration only (kind + keywords), never the strategy's run state
           "strategy": {"kind": spec.strategy_kind, **_jsonable(spec.strategy_kwargs)},
           "optimizer": repr(result.optimizer), "n_params": int(result.model.n_params)}
    if spec.assignment:
        out["sweep"] = dict(spec.assignment)
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _last(history, name):
    if name not in history:
        return None
    values = np.asarray(history[name].values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else None


def _checkpoint_dirs(out_dir, index=None):
    live, done = out_dir / "checkpoints.partial", out_dir / "checkpoints"
    if index is not None:
        live, done = live / f"{index:03d}", done / f"{index:03d}"
    return live, done


_CLAIM_LOCK = threading.Lock()      # the runs of a sweep claim one shared folder


def _prepare_checkpoints(live, done, resume, model, check, say):
    """Set up the live checkpoint directory; returns whether fit should resume.

    Only folders dmlcore wrote are emptied or replaced (``outputs.claim_dir``);
    the fixed output names are checked here, before training, too. The runs of
    a sweep call this from parallel threads: one at a time.
    """
    with _CLAIM_LOCK:
        return _prepare_checkpoints_locked(live, done, resume, model, check, say)


def _prepare_checkpoints_locked(live, done, resume, model, check, say):
    top = live.parent if live.parent.name == "checkpoints.partial" else live
    out_dir = top.parent
    outputs.check_free(out_dir, outputs.FIXED_NAMES, dirs=[top.name, "checkpoints"])
    outputs.claim_dir(out_dir, top.name, reset=False)
    if not resume:
        if ckpt.list_checkpoints(live):
            say(f"note: discarding the checkpoints of an interrupted run in {live} "
                f"(--resume continues it)")
        if live != top and live.exists():
            shutil.rmtree(live)
        outputs.claim_dir(out_dir, top.name, reset=live == top)
        return False
    if not ckpt.list_checkpoints(live) and ckpt.list_checkpoints(done):
        live.mkdir(parents=True, exist_ok=True)
        for f in ckpt.list_checkpoints(done):
            shutil.copy2(f, live / f.name)
    try:
        saved = ckpt.latest(live, model_config=model.to_config())
    except ValueError as exc:
        check.fail(("model",), f"--resume: {exc}")
    if saved is None:
        say(f"--resume: no checkpoint in {live.parent}; starting from step 0")
        return False
    say(f"resuming from step {saved['step']} of run {saved['meta'].get('run_id')} ({live})")
    return True


def _fit_one(spec, prepared, client, dirs, resume, progress, wf, say):
    from ..train import fit     # xarray and distributed: imported when a run starts

    check = _Checker(wf, spec.assignment)
    model = build_model(spec, prepared)
    strategy = build_strategy(spec.strategy_kind, spec.strategy_kwargs)
    weights = prepared.data.partition_weights
    optimizer = build_run_optimizer(spec, float(prepared.data.n_rows if weights is None
                                                else weights.sum()))
    live, done = dirs
    resume = _prepare_checkpoints(live, done, resume, model, check, say)
    train = dict(spec.train)
    t0 = time.perf_counter()
    with _located(check, ("train",)):
        try:
            result = fit(model, prepared.data, strategy, optimizer,
                         eval_data=prepared.eval_data, client=client, checkpoint_dir=str(live),
                         resume=resume, progress=progress, **train)
        except ValueError as exc:
            finished = re.match(r"resume: the checkpoint is at step (\d+), the run asks for "
                                r"(\d+)$", str(exc))
            if resume and finished and finished.group(1) == finished.group(2):
                raise _NothingToDo(int(finished.group(1))) from None
            raise
    return result, time.perf_counter() - t0


class _NothingToDo(Exception):
    """``--resume`` of a run whose last checkpoint is its last step."""

    def __init__(self, step):
        super().__init__(step)
        self.step = step

