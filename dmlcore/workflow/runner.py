"""Running a workflow file: one run, or a sweep, on one client.

``run(path, scheduler=, sets=, resume=, progress=, say=)`` loads and
validates the file, opens the client (``--scheduler``, else
``cluster.address``, else an embedded LocalCluster), prepares the data,
fits and, only once everything has succeeded, writes the outputs
(``dmlcore.outputs``, each file atomically; checkpoints of a run in
progress live in ``<out>/checkpoints.partial``). It returns the metrics
dict (a sweep: the best run's, plus ``runs``); bad input is a
``WorkflowError`` and leaves no half-written output.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from contextlib import ExitStack

from .. import outputs, registry
from .client import open_client
from .fitting import _checkpoint_dirs, _fit_one, _metrics, _NothingToDo
from .parse import WorkflowError, load
from .prepare import prepare_data
from .sweep import _run_sweep
from .validate import validate


def run(path, *, scheduler=None, sets=(), resume=False, progress=True, say=print):
    """Run a workflow file; returns the metrics dict (a sweep: the best run's, plus ``runs``)."""
    wf = load(path, sets)
    plan = validate(wf)
    spec0 = plan.runs[0]
    out_dir = spec0.output_dir
    t_start = time.perf_counter()
    where = scheduler or spec0.cluster.get("address")
    if where:
        say(f"connecting to the Dask scheduler at {where} ...")
    else:
        n = spec0.cluster.get("local", {}).get("n_workers")
        say(f"starting an embedded LocalCluster ({n if n else 'default'} workers) ...")
    with ExitStack() as stack:
        try:
            client = stack.enter_context(open_client(spec0, scheduler, say))
        except WorkflowError as exc:
            # an address from the file: name its YAML line (--scheduler has none)
            if not scheduler and spec0.cluster.get("address") and not str(exc).startswith(
                    wf.name):
                raise wf.error(("cluster", "address"), str(exc)) from None
            raise
        if not plan.is_sweep:
            prepared = prepare_data(spec0, client, wf, say)
            dirs = _checkpoint_dirs(out_dir)
            try:
                result, seconds = _fit_one(spec0, prepared, client, dirs, resume, progress,
                                           wf, say)
            except _NothingToDo as done:
                return _nothing_to_do(out_dir, dirs, done.step, wf, say)
            metrics = _metrics(spec0, result, prepared, time.perf_counter() - t_start)
            files = outputs.run_files(_resolved_config(plan), result, metrics,
                                      strategy_kind=spec0.strategy_kind, plots=spec0.plots,
                                      meta={"workflow": wf.name})
            outputs.commit(out_dir, files, checkpoints=[dirs])
            say(_summary(metrics, out_dir, files, _unit(spec0)))
            return metrics
        return _run_sweep(plan, client, out_dir, resume, say, t_start)


def _unit(spec):
    return registry.resolve("strategy", spec.strategy_kind).unit


def _nothing_to_do(out_dir, dirs, step, wf, say):
    """``--resume`` of a finished run: its outputs stay as they are; returns its metrics."""
    live, done = dirs
    metrics_file = out_dir / "metrics.json"
    if not metrics_file.is_file():
        raise wf.error(("train",), f"--resume: the checkpoints in {live} are at the run's last "
                       f"step ({step}) but {metrics_file} is missing; run without --resume")
    if done.is_dir() and live.is_dir():
        shutil.rmtree(live)      # the copy of checkpoints/ that resuming made
    say(f"nothing to do: the run in {out_dir} is finished (step {step} of {step})")
    return json.loads(metrics_file.read_text())


def _resolved_config(plan):
    """The workflow as run (``--set`` applied), its data files as absolute paths,
    so the written ``config.yaml`` reruns the experiment from any folder."""
    cfg = copy.deepcopy(plan.base_config)
    data, spec_data = cfg.get("data"), plan.runs[0].data
    if not isinstance(data, dict):
        return cfg
    pairs = [(data, spec_data)]
    if isinstance(data.get("test"), dict) and "source" in spec_data.get("test", {}):
        pairs.append((data["test"], spec_data["test"]))
    for given, checked in pairs:
        source, resolved = given.get("source"), checked["source"]
        if isinstance(source, dict) and resolved.get("kind") == "files":
            for key in ("path", "labels"):
                if key in source and key in resolved:
                    source[key] = resolved[key]
    if "weights" in data:
        data["weights"] = spec_data["weights"]
    return cfg


def _summary(metrics, out_dir, files, unit="steps"):
    parts = [f"{metrics['steps']} {unit}", f"final loss {metrics['final_loss']:.4g}"]
    if metrics.get("eval_accuracy") is not None:
        parts.append(f"eval accuracy {metrics['eval_accuracy']:.4f}")
    elif metrics.get("eval_loss") is not None:
        parts.append(f"eval loss {metrics['eval_loss']:.4g}")
    parts.append(f"{metrics['wall_time']:.1f} s training")
    return f"{', '.join(parts)}\nwrote {out_dir}/: {' '.join(sorted(files))}"

