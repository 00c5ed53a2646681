"""A sweep: the grid's runs fitted concurrently on one client, collected into one output.

``_run_sweep(plan, client, out_dir, resume, say, t_start)`` prepares each
distinct data set once, fits every run in its own driver thread (at most
8 at a time; the first error is raised once all have stopped), picks the
best run (``_score``: eval accuracy, else eval loss, else training loss)
and writes ``sweep.nc``, the per-run files and ``best/``.
"""
from __future__ import annotations

import copy
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

from .. import outputs, registry
from .fitting import RunResult, _checkpoint_dirs, _fit_one, _metrics
from .prepare import prepare_data


def _score(metrics):
    """Sort key of a run: higher eval accuracy, else lower eval loss, else lower loss."""
    if metrics.get("eval_accuracy") is not None:
        return (0, -metrics["eval_accuracy"])
    if metrics.get("eval_loss") is not None:
        return (1, metrics["eval_loss"])
    loss = metrics.get("final_loss")
    return (2, loss if loss is not None and math.isfinite(loss) else math.inf)


def _run_sweep(plan, client, out_dir, resume, say, t_start):
    wf = plan.workflow
    prepared_by_data = {}

    def data_key(spec):      # the prepared data depend on the data section and the model kind
        fixed = registry.resolve("model", spec.model_kind).fixed_classes(spec.model_kwargs)
        return json.dumps([spec.data, spec.classifier, spec.model_kind, fixed],
                          sort_keys=True, default=str)

    for spec in plan.runs:
        if data_key(spec) not in prepared_by_data:
            prepared_by_data[data_key(spec)] = prepare_data(spec, client, wf, say)
    n = len(plan.runs)
    say(f"sweep: {n} configurations over {', '.join(plan.sweep_keys)}")
    results = [None] * n
    lock = threading.Lock()
    finished = [0]

    def one(i):
        spec = plan.runs[i]
        prepared = prepared_by_data[data_key(spec)]
        result, seconds = _fit_one(spec, prepared, client, _checkpoint_dirs(out_dir, i), resume,
                                   False, wf,
                                   lambda m: None)
        metrics = _metrics(spec, result, prepared, seconds)
        with lock:
            finished[0] += 1
            acc = metrics.get("eval_accuracy")
            shown = (f"eval accuracy {acc:.4f}" if acc is not None
                     else f"loss {metrics['final_loss']:.4g}")
            say(f"[{finished[0]}/{n}] {spec.label}: {shown} ({seconds:.1f} s)")
        results[i] = RunResult(spec, result, prepared, metrics)

    with ThreadPoolExecutor(max_workers=min(n, 8), thread_name_prefix="dmlcore-sweep") as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        errors = []
        for f in futures:
            try:
                f.result()
            except BaseException as exc:  # first error wins, after all have stopped
                errors.append(exc)
        if errors:
            raise errors[0]
    best = min(range(n), key=lambda i: _score(results[i].metrics))
    best_spec = results[best].spec
    best_cfg = copy.deepcopy(best_spec.config)
    best_cfg.setdefault("output", {})
    best_cfg["output"] = dict(best_cfg["output"] or {})
    best_cfg["output"]["dir"] = str(out_dir / "best")
    say(f"best: {best_spec.label} ({_describe_score(results[best].metrics)})")
    files = outputs.sweep_files(plan, results, best, best_cfg, plots=best_spec.plots)
    live_done = [_checkpoint_dirs(out_dir)]
    outputs.commit(out_dir, files, checkpoints=live_done)
    say(f"wrote {out_dir}/: {' '.join(sorted(files))}")
    summary = dict(results[best].metrics)
    summary["runs"] = [r.metrics for r in results]
    summary["best"] = dict(best_spec.assignment)
    return summary


def _describe_score(metrics):
    if metrics.get("eval_accuracy") is not None:
        return f"eval accuracy {metrics['eval_accuracy']:.4f}"
    if metrics.get("eval_loss") is not None:
        return f"eval loss {metrics['eval_loss']:.4g}"
    return f"final loss {metrics['final_loss']:.4g}"

