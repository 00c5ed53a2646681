"""``dml.fit``: the training loop shared by every strategy.

The strategy yields one record per step (see ``strategies.base``); this loop
times the step, evaluates on ``eval_data`` when due, writes checkpoints,
calls the callbacks, shows progress and builds the history: an
``xarray.Dataset`` with dimension ``step`` and the variables ``loss``,
``wall_time`` (seconds since the run started, continued across resumes),
``bytes_sent``, ``eval_loss``/``eval_accuracy`` (NaN where not evaluated) and
whatever else the strategy reports (``staleness``, ``participants`` ...).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import xarray as xr

from . import checkpoint as ckpt
from .cluster import get_client
from .optim import LBFGS
from .strategies.base import RunContext


@dataclass
class FitResult:
    """What ``fit`` returns: final parameters, history and what produced them."""

    model: object
    params: np.ndarray
    history: xr.Dataset
    strategy: object
    optimizer: object
    opt_state: object
    steps: int

    def predict(self, X):
        """``model.predict(params, X)``."""
        return self.model.predict(self.params, np.asarray(X, dtype=self.params.dtype))


def evaluate(model, params, X, y):
    """``(mean loss, accuracy or NaN)`` of ``model`` on ``(X, y)`` in this process."""
    import scipy.sparse as sp

    if not sp.issparse(X):                  # a sparse X goes to the GLM's predict as it is
        X = np.ascontiguousarray(X, dtype=params.dtype)
    y = np.asarray(y)
    out = np.asarray(model.predict(params, X), dtype=np.float64)
    tiny = 1e-15
    if getattr(model, "is_multilabel", False):   # per-label sigmoid: summed BCE, subset accuracy
        p = np.clip(out, tiny, 1 - tiny)
        y = y.reshape(out.shape)
        loss = -float(np.mean(np.sum(y * np.log(p) + (1 - y) * np.log1p(-p), axis=1)))
        return loss, float(np.mean(np.all((out > 0.5) == (y > 0.5), axis=1)))
    if not model.is_classifier:
        resid = out.reshape(len(y), -1) - y.reshape(len(y), -1)
        return 0.5 * float(np.mean(np.sum(resid * resid, axis=1))), float("nan")
    if out.ndim == 1:          # binary: P(y = 1)
        p = np.clip(out, tiny, 1 - tiny)
        loss = -float(np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
        return loss, float(np.mean((out > 0.5) == (y == 1)))
    labels = y.astype(np.int64)
    loss = -float(np.mean(np.log(np.clip(out[np.arange(len(labels)), labels], tiny, None))))
    return loss, float(np.mean(out.argmax(axis=1) == labels))


def _total_steps(strategy, data, epochs, steps, rounds):
    given = {k: v for k, v in (("epochs", epochs), ("steps", steps), ("rounds", rounds))
             if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of epochs, steps, rounds (got {sorted(given) or 'none'})")
    (name, value), = given.items()
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    if name == "epochs":
        return int(value) * strategy.steps_per_epoch(data)
    return int(value)


def _as_partitioned(data, client, seed):
    from .data import PartitionedData, partition

    if isinstance(data, PartitionedData):
        return data.placed(client if client is not None else False)
    if isinstance(data, tuple) and len(data) == 2:
        return partition(data[0], data[1], seed=seed, client=client if client is not None else False)
    raise ValueError("data must be a PartitionedData (dml.partition) or a tuple (X, y)")


class _Progress:
    """A tqdm bar showing the step, loss and evaluation accuracy (no-op when disabled)."""

    def __init__(self, enabled, total, initial, strategy=None):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            # FedAvg's steps are communication rounds
            unit = "round" if getattr(strategy, "name", None) == "fedavg" else "step"
            self.bar = tqdm(total=total, initial=initial, unit=unit, leave=False,
                            dynamic_ncols=True)

    def update(self, record):
        if self.bar is None:
            return
        shown = {"loss": f"{record['loss']:.4g}"}
        if np.isfinite(record.get("eval_accuracy", np.nan)):
            shown["acc"] = f"{record['eval_accuracy']:.4f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def history_dataset(records, attrs=None):
    """Records (dicts of scalars, one per step) -> Dataset with dimension ``step``."""
    names = []
    for record in records:
        names.extend(k for k in record if k not in names and k != "step")
    steps = np.array([r["step"] for r in records], dtype=np.int64)
    data = {name: ("step", np.array([r.get(name, np.nan) for r in records], dtype=np.float64))
            for name in names}
    return xr.Dataset(data, coords={"step": steps}, attrs=attrs or {})


def _sync_every(per_epoch, eval_every, checkpoint_every, callbacks):
    """Steps between the points where the driver needs current parameters:
    epoch ends, evaluations, checkpoints, and each callback's ``sync_every``
    attribute (a callback without one is called with current ``params`` at
    every step, and may stop the run at any step)."""
    every = per_epoch
    for k in (eval_every, checkpoint_every,
              *(getattr(cb, "sync_every", 1) for cb in callbacks)):
        if k:
            every = math.gcd(every, int(k))
    return max(every, 1)


def fit(model, data, strategy, optimizer=None, *, epochs=None, steps=None, rounds=None,
        eval_data=None, init_params=None, client=None, seed=0, checkpoint_dir=None,
        resume=False, callbacks=(), progress=True, checkpoint_every=None, eval_every=None,
        timeout=60.0):
    """Train ``model`` on partitioned ``data`` with ``strategy``; returns a ``FitResult``.

    Exactly one of ``epochs``, ``steps``, ``rounds`` sets the length (an epoch
    is ``strategy.steps_per_epoch(data)`` steps; a FedAvg round is a step).
    ``client=None`` uses the default client or starts an embedded
    LocalCluster (closed at the end); ``client=False`` runs in this process.
    Evaluation on ``eval_data=(X, y)`` happens every ``eval_every`` steps
    (default: once per epoch) and at the last step; checkpoints every
    ``checkpoint_every`` steps (default: once per epoch) and at the end.
    ``resume=True`` continues the newest run in ``checkpoint_dir``, a run id
    string that run (``history.attrs["run_id"]``); a checkpoint of another
    model configuration, or no checkpoint of the asked run, is a ValueError.
    ``callbacks``: callables ``f(step, record, params)``; a True return stops.
    A callback with an attribute ``sync_every = k`` promises to read
    ``params`` and to stop only at multiples of k, which lets strategies that
    keep the parameters on the workers (``SyncSGD(apply_on="workers")``)
    sync them less often; at other steps its ``params`` may be stale.
    ``timeout``: the longest any data-plane wait may take, in seconds; a
    worker that fails, freezes or is cut off ends the fit with an error
    naming it (a failure within seconds, a frozen worker after about
    ``timeout``).
    """
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    owned_close = lambda: None  # noqa: E731
    if client is False:
        client = None
    else:
        client, owned_close = get_client(client)
    try:
        return _fit(model, data, strategy, optimizer, epochs, steps, rounds, eval_data,
                    init_params, client, seed, checkpoint_dir, resume, callbacks, progress,
                    checkpoint_every, eval_every, float(timeout))
    finally:
        owned_close()


def _fit(model, data, strategy, optimizer, epochs, steps, rounds, eval_data, init_params,
         client, seed, checkpoint_dir, resume, callbacks, progress, checkpoint_every,
         eval_every, timeout=60.0):
    data = _as_partitioned(data, client, seed)
    if data.n_features != getattr(model, "n_features", data.n_features):
        raise ValueError(f"model expects {model.n_features} features, data has {data.n_features}")
    optimizer = optimizer if optimizer is not None else strategy.default_optimizer()
    total = _total_steps(strategy, data, epochs, steps, rounds)
    per_epoch = max(strategy.steps_per_epoch(data), 1)
    eval_every = int(eval_every or per_epoch)
    checkpoint_every = int(checkpoint_every or per_epoch)
    if hasattr(optimizer, "set_horizon"):
        optimizer.set_horizon(total)

    dtype = np.dtype(data.dtype)
    params = (model.init(seed, dtype=dtype) if init_params is None
              else np.array(init_params, dtype=dtype, copy=True))
    model._check_params(params)
    trainable = strategy.trainable
    idx = None if trainable is None else np.flatnonzero(model.trainable_mask(trainable))
    decay_mask = model.weight_mask() if idx is None else model.weight_mask()[idx]
    values = params if idx is None else params[idx]
    opt_state = None if isinstance(optimizer, LBFGS) else optimizer.init(values, decay_mask)

    records, start, time_offset, extra = [], 0, 0.0, {}
    run_id = ckpt.new_run_id()
    if resume and checkpoint_dir is not None:
        saved = ckpt.latest(checkpoint_dir, run_id=None if resume is True else str(resume),
                            model_config=model.to_config())
        if saved is not None:
            run_id = saved["meta"].get("run_id") or run_id
            params = saved["params"].astype(dtype)
            start = saved["step"]
            opt_state = ckpt.restore_state(opt_state, saved["opt"])
            extra = dict(saved["extra"])
            hist = saved["history"]
            if "step" in hist:
                records = [{k: float(v[i]) for k, v in hist.items()} for i in
                           range(len(hist["step"]))]
                for r in records:
                    r["step"] = int(r["step"])
                if records:
                    time_offset = records[-1].get("wall_time", 0.0)
    if start >= total:
        raise ValueError(f"resume: the checkpoint is at step {start}, the run asks for {total}")

    ctx = RunContext(model=model, data=data, optimizer=optimizer, params=params,
                     opt_state=opt_state, client=client, seed=int(seed), start_step=start,
                     total_steps=total, trainable=trainable, trainable_idx=idx, extra=extra,
                     sync_every=_sync_every(per_epoch, eval_every if eval_data is not None else 0,
                                            checkpoint_every if checkpoint_dir else 0,
                                            callbacks),
                     timeout=timeout)
    meta = {"model": model.to_config(), "strategy": repr(strategy), "seed": int(seed),
            "total_steps": total}

    def save_checkpoint(step):
        hist = {k: [r.get(k, np.nan) for r in records] for k in
                {key for r in records for key in r}}
        ckpt.save(checkpoint_dir, step, ctx.params, ctx.opt_state, hist, ctx.extra, meta,
                  run_id=run_id)

    bar = _Progress(progress, total, start, strategy)
    t0 = time.perf_counter()
    step = start
    runner = strategy.run(ctx)
    try:
        for record in runner:
            step += 1
            record = dict(record)
            record["step"] = step
            record["wall_time"] = time_offset + record.pop("_time", time.perf_counter()) - t0
            if eval_data is not None and (step % eval_every == 0 or step == total):
                record["eval_loss"], record["eval_accuracy"] = evaluate(
                    model, ctx.params, *eval_data)
            records.append(record)
            bar.update(record)
            if checkpoint_dir is not None and (step % checkpoint_every == 0 or step == total):
                save_checkpoint(step)
            if any(cb(step, record, ctx.params) for cb in callbacks):
                break
            if step >= total:
                break
    finally:
        runner.close()
        bar.close()
    if eval_data is not None and records and "eval_loss" not in records[-1]:
        records[-1]["eval_loss"], records[-1]["eval_accuracy"] = evaluate(
            model, ctx.params, *eval_data)
    if checkpoint_dir is not None and records and step % checkpoint_every and step != total:
        save_checkpoint(step)
    history = history_dataset(records, attrs={
        "model": repr(model), "strategy": repr(strategy), "optimizer": repr(optimizer),
        "seed": int(seed), "n_partitions": int(data.n_partitions), "run_id": run_id})
    return FitResult(model, ctx.params, history, strategy, optimizer, ctx.opt_state, step)
