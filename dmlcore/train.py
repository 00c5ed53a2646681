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

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from . import checkpoint as ckpt
from ._util import one_blas_thread
from .cluster import get_client
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
    # what the strategy reported that is not in the history: ``solver_result``
    # (a batch solver's final result: scipy's for L-BFGS), ``loop_endings`` (PS)
    info: dict = field(default_factory=dict)

    @property
    def solver_result(self):
        return self.info.get("solver_result")

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


def _sync_periods(per_epoch, eval_every, checkpoint_every, callbacks):
    """Periods (in steps) of the points where the driver needs current
    parameters: epoch ends, evaluations, checkpoints, and each callback's
    ``sync_every`` attribute (a callback without one is called with current
    ``params`` at every step, and may stop the run at any step). A run of
    steps ends at the first multiple of any of them (``RunContext.next_sync``)."""
    periods = {per_epoch, eval_every, checkpoint_every,
               *(getattr(cb, "sync_every", 1) for cb in callbacks)}
    return tuple(sorted({max(int(k), 1) for k in periods if k}))


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
    worker that raises, freezes or is cut off ends the fit with an error
    naming it (a failure within seconds, a frozen worker after about
    ``timeout``). A worker that dies (leaves the cluster) is recovered from:
    its partitions are made again on a live worker and the work since the
    last sync point is redone (``dmlcore.recovery``; ``events`` in the history).
    While a cluster trains, this process's BLAS runs one thread (callbacks
    included); the caller's setting is restored at the end.
    """
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    owned_close = lambda: None  # noqa: E731
    if client is False:
        client = None
    else:
        client, owned_close = get_client(client)
    try:
        data = _as_partitioned(data, client, seed)
        if data.n_features != getattr(model, "n_features", data.n_features):
            raise ValueError(f"model expects {model.n_features} features, "
                             f"data has {data.n_features}")
        optimizer = optimizer if optimizer is not None else strategy.default_optimizer()
        total = _total_steps(strategy, data, epochs, steps, rounds)
        per_epoch = max(strategy.steps_per_epoch(data), 1)
        eval_every = int(eval_every or per_epoch)
        checkpoint_every = int(checkpoint_every or per_epoch)
        if hasattr(optimizer, "set_horizon"):
            optimizer.set_horizon(total)
        ctx = _start(model, data, strategy, optimizer, client, seed, init_params, total,
                     checkpoint_dir, resume)
        ctx.timeout = float(timeout)
        ctx.sync_periods = _sync_periods(per_epoch,
                                         eval_every if eval_data is not None else 0,
                                         checkpoint_every if checkpoint_dir else 0, callbacks)
        loop = _Loop(ctx, strategy, eval_data, eval_every, checkpoint_dir, checkpoint_every,
                     callbacks, progress)
        with _driver_blas(client):
            return loop.run()
    finally:
        owned_close()


def _driver_blas(client):
    """One BLAS thread in this (the driver's) process while a cluster computes.

    The driver's share of a fit is vector arithmetic (optimizer steps, L-BFGS);
    an OpenBLAS pool left idle busy-waits after every call, and on a host the
    workers share, that spinning took a core from a worker at every step.
    In-process fits (``client=False``) keep the caller's setting."""
    return contextlib.nullcontext() if client is None else one_blas_thread("blas")


def _start(model, data, strategy, optimizer, client, seed, init_params, total, checkpoint_dir,
           resume):
    """The run's ``RunContext`` at its first step: fresh, or restored from a checkpoint
    (``ctx.extra["_records"]`` and ``["_run_id"]`` carry the restored history and id)."""
    dtype = np.dtype(data.dtype)
    params = (model.init(seed, dtype=dtype) if init_params is None
              else np.array(init_params, dtype=dtype, copy=True))
    model._check_params(params)
    view = model.trainable_view(strategy.trainable)
    opt_state = (None if optimizer.batch_solver
                 else optimizer.init(view.gather(params), view.decay_mask))
    ctx = RunContext(model=model, data=data, optimizer=optimizer, params=params,
                     opt_state=opt_state, client=client, seed=int(seed), start_step=0,
                     total_steps=total, view=view)
    records, run_id = [], ckpt.new_run_id()
    saved = None
    if resume and checkpoint_dir is not None:
        saved = ckpt.latest(checkpoint_dir, run_id=None if resume is True else str(resume),
                            model_config=model.to_config())
    if saved is not None:
        run_id = saved["meta"].get("run_id") or run_id
        ctx.params = saved["params"].astype(dtype)
        ctx.start_step = saved["step"]
        ctx.opt_state = ckpt.restore_state(opt_state, saved["opt"])
        ctx.extra = dict(saved["extra"])
        hist = saved["history"]
        if "step" in hist:
            records = [{k: float(v[i]) for k, v in hist.items()} for i in
                       range(len(hist["step"]))]
            for r in records:
                r["step"] = int(r["step"])
    if ctx.start_step >= total:
        raise ValueError(f"resume: the checkpoint is at step {ctx.start_step}, "
                         f"the run asks for {total}")
    ctx.outputs["_records"], ctx.outputs["_run_id"] = records, run_id
    return ctx


class _Loop:
    """The step loop of one fit: records, evaluation, checkpoints, callbacks, progress."""

    def __init__(self, ctx, strategy, eval_data, eval_every, checkpoint_dir, checkpoint_every,
                 callbacks, progress):
        self.ctx, self.strategy, self.eval_data = ctx, strategy, eval_data
        self.eval_every, self.callbacks = eval_every, callbacks
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.progress = progress
        self.records = ctx.outputs.pop("_records")
        self.run_id = ctx.outputs.pop("_run_id")
        self.meta = {"model": ctx.model.to_config(), "strategy": repr(strategy),
                     "seed": ctx.seed, "total_steps": ctx.total_steps}

    def save_checkpoint(self, step):
        ctx, records = self.ctx, self.records
        hist = {k: [r.get(k, np.nan) for r in records] for k in
                {key for r in records for key in r}}
        ckpt.save(self.checkpoint_dir, step, ctx.params, ctx.opt_state, hist, ctx.extra,
                  self.meta, run_id=self.run_id)

    def evaluate_into(self, record):
        record["eval_loss"], record["eval_accuracy"] = evaluate(
            self.ctx.model, self.ctx.params, *self.eval_data)

    def run(self):
        ctx, total, records = self.ctx, self.ctx.total_steps, self.records
        time_offset = records[-1].get("wall_time", 0.0) if records else 0.0
        step = ctx.start_step
        bar = _Progress(self.progress, total, step, self.strategy)
        runner = None
        t0 = time.perf_counter()
        try:
            runner = self.strategy.run(ctx)
            for record in runner:
                step += 1
                record = dict(record)
                record["step"] = step
                record["wall_time"] = time_offset + record.pop("_time", time.perf_counter()) - t0
                if self.eval_data is not None and (step % self.eval_every == 0 or step == total):
                    self.evaluate_into(record)
                records.append(record)
                bar.update(record)
                if self.checkpoint_dir is not None and (step % self.checkpoint_every == 0
                                                        or step == total):
                    self.save_checkpoint(step)
                if any(cb(step, record, ctx.params) for cb in self.callbacks):
                    break
                if step >= total:
                    break
        finally:
            if runner is not None:
                runner.close()
            bar.close()
        if self.eval_data is not None and records and "eval_loss" not in records[-1]:
            self.evaluate_into(records[-1])
        if (self.checkpoint_dir is not None and records and step % self.checkpoint_every
                and step != total):
            self.save_checkpoint(step)
        history = history_dataset(records, attrs={
            "model": repr(ctx.model), "strategy": repr(self.strategy),
            "optimizer": repr(ctx.optimizer), "seed": ctx.seed,
            "n_partitions": int(ctx.data.n_partitions), "run_id": self.run_id})
        history = _with_outputs(history, ctx)
        info = {k: v for k, v in ctx.outputs.items() if not isinstance(v, xr.DataArray)}
        return FitResult(ctx.model, ctx.params, history, self.strategy, ctx.optimizer,
                         ctx.opt_state, step, info)


def _with_outputs(history, ctx):
    """The history with what the strategy reported beyond per-step scalars:
    ``ctx.outputs`` DataArrays (their own dimensions, a ``step`` one aligned
    with the history's) and ``ctx.events`` as variables over ``event``."""
    for name, value in ctx.outputs.items():
        if isinstance(value, xr.DataArray):
            steps = history["step"].values
            if "step" in value.dims and not np.array_equal(value["step"].values, steps):
                value = value.reindex(step=steps)
            history[name] = value
    if ctx.events:
        keys = sorted({k for e in ctx.events for k in e})
        for key in keys:
            values = [e.get(key) for e in ctx.events]
            if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
                column = np.array(values, dtype=np.float64)
            else:
                column = np.array(["" if v is None else str(v) for v in values], dtype=str)
            history[f"event_{key}"] = ("event", column)
    return history
