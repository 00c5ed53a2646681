"""Validation: a ``Workflow`` into a ``Plan`` of fully checked ``RunSpec``s.

``validate(wf)`` checks everything that can be checked without a cluster:
every section, the rules across sections, the sweep grid (one ``RunSpec``
per grid point, each checked like a file) and the shapes and labels of
file sources. The first problem is a ``WorkflowError`` naming its file,
line and key path (and the sweep value that caused it).
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from .. import registry
from .build import is_batch_solver
from .labels import _preflight_files
from .parse import Workflow, WorkflowError, set_path
from .schema import _Checker, _describe, _short
from .sections import (_check_cluster, _check_model, _check_output, _check_strategy,
                       _check_train, _optimizer_spec)
from .sources import _check_data

TOP_KEYS = ("name", "cluster", "data", "model", "strategy", "optimizer", "train", "output",
            "sweep")


@dataclass
class RunSpec:
    """One fully checked configuration (a sweep has one per grid point)."""

    config: dict                 # the resolved workflow (sweep removed, values applied)
    assignment: dict             # swept key path -> value ({} without a sweep)
    cluster: dict                # {"address": str | None, "timeout": s, "local": kwargs}
    data: dict                   # the data section, checked
    model_kind: str
    model_kwargs: dict           # the model's keywords (its penalty keys apart)
    penalty: dict                # the model section's penalty keys ({}: none given)
    strategy_kind: str
    strategy_kwargs: dict
    optimizer_kind: str | None
    optimizer_kwargs: dict
    train: dict                  # fit keywords
    output_dir: Path
    plots: bool
    classifier: bool = False     # the model trains on class labels

    @property
    def label(self):
        return ", ".join(f"{k}={_short(v)}" for k, v in self.assignment.items()) or "run"


@dataclass
class Plan:
    workflow: Workflow
    runs: list                    # [RunSpec]
    sweep_keys: list              # [key path str]
    sweep_values: dict            # key path -> [values]
    base_config: dict             # config after --set, sweep included

    @property
    def is_sweep(self):
        return bool(self.sweep_keys)


def _check_run(wf, cfg, assignment):
    check = _Checker(wf, assignment)
    check.keys(cfg, (), TOP_KEYS, required=("data", "model", "strategy", "train"))
    if "name" in cfg and not isinstance(cfg["name"], str):
        check.fail(("name",), f"expected a string, got {_describe(cfg['name'])}")
    cluster = _check_cluster(check, cfg)
    data = _check_data(check, cfg, wf)
    model_kind, model_kwargs, penalty, trial_model = _check_model(check, cfg)
    strategy_kind, strategy_kwargs = _check_strategy(check, cfg)
    optimizer_kind, optimizer_kwargs = None, {}
    if cfg.get("optimizer") is not None:
        optimizer_kind, optimizer_kwargs = _optimizer_spec(check, cfg["optimizer"],
                                                           ("optimizer",))
    train = _check_train(check, cfg)
    output_dir, plots = _check_output(check, cfg, wf)
    # cross-section rules
    strategy_cls = registry.resolve("strategy", strategy_kind)
    classifier = bool(trial_model.is_classifier)
    if optimizer_kind and is_batch_solver(optimizer_kind) \
            and not strategy_cls.full_batch(strategy_kwargs):
        check.fail(("optimizer", "kind"), f"{optimizer_kind} is a full-batch solver: it needs "
                   "strategy {kind: sync, batch_size: null} (without local_steps)")
    if penalty:
        _check_penalty(check, model_kind, penalty, strategy_cls.full_batch(strategy_kwargs),
                       optimizer_kind, optimizer_kwargs)
    if strategy_cls.unit != "rounds" and train.get("rounds") is not None:
        check.fail(("train", "rounds"), "rounds are FedAvg rounds; use steps or epochs for "
                   f"strategy kind {strategy_kind!r}")
    src = data["source"]
    if src["kind"] == "synthetic":
        opts = src["options"]
        if src["generator"] == "regression" and classifier:
            check.fail(("model", "kind"), f"{model_kind} is a classifier; the synthetic data "
                       f"are a regression problem")
        if src["generator"] == "classification" and type(trial_model).binary \
                and int(opts.get("n_classes", 2)) != 2:
            check.fail(("model", "kind"), f"{model_kind} is binary; the data have "
                       f"{opts['n_classes']} classes (use softmax or mlp)")
    return RunSpec(config=cfg, assignment=dict(assignment), cluster=cluster, data=data,
                   model_kind=model_kind, model_kwargs=model_kwargs, penalty=penalty,
                   strategy_kind=strategy_kind, strategy_kwargs=strategy_kwargs,
                   optimizer_kind=optimizer_kind, optimizer_kwargs=optimizer_kwargs,
                   train=train, output_dir=output_dir, plots=plots, classifier=classifier)


def _check_penalty(check, model_kind, penalty, full_batch, optimizer_kind, optimizer_kwargs):
    """A model-section penalty is solved by the batch solver it sets (OWL-QN with an L1
    share, else L-BFGS): full batch, and no optimizer that it cannot configure."""
    where = ("model", "penalty" if "penalty" in penalty else next(iter(penalty)))
    l1, _ = registry.resolve("model", model_kind).penalty(penalty, 1.0)
    if not full_batch:
        check.fail(where, "a model penalty is solved by a full-batch solver: it needs "
                   "strategy {kind: sync, batch_size: null} (without local_steps)")
    if optimizer_kind is None:
        return
    if optimizer_kind not in ("lbfgs", "owlqn") or (l1 and optimizer_kind != "owlqn"):
        need = "owlqn" if l1 else "lbfgs or owlqn"
        check.fail(("optimizer", "kind"), f"model.{where[1]} asks for a penalty "
                   f"{'with an L1 term ' if l1 else ''}that {optimizer_kind} cannot solve: "
                   f"use kind {need}, or leave the optimizer section out")
    for key in ("l1", "weight_decay"):
        if key in optimizer_kwargs:
            check.fail(("optimizer", key), f"the model's penalty sets {key}; give the "
                       "penalty in one place (model.penalty or the optimizer)")


def _check_sweep(wf, cfg):
    sweep = cfg.get("sweep")
    check = _Checker(wf)
    if sweep is None:
        return [], {}
    sweep = check.mapping(sweep, ("sweep",))
    if not sweep:
        check.fail(("sweep",), "empty sweep; give key.path: [values, ...]")
    for key, values in sweep.items():
        path = ("sweep", key)
        root = key.split(".")[0]
        if root not in TOP_KEYS or root in ("sweep", "name", "output", "cluster"):
            check.fail(path, f"cannot sweep over {key!r}; sweep keys are paths such as "
                       f"optimizer.lr, model.hidden, strategy.batch_size, data.partitions")
        if any(not p for p in key.split(".")) or "." not in key:
            check.fail(path, "expected a key path such as optimizer.lr")
        if not isinstance(values, list) or not values:
            check.fail(path, f"expected a non-empty list of values, got {_describe(values)}")
        labels = [_short(v) for v in values]
        if len(set(labels)) != len(labels):
            check.fail(path, f"repeated values in {values}")
    n = math.prod(len(v) for v in sweep.values())
    if n > 1000:
        check.fail(("sweep",), f"the grid has {n} configurations (at most 1000)")
    return list(sweep), {k: list(v) for k, v in sweep.items()}


def validate(wf):
    """Check everything that can be checked without a cluster; returns a ``Plan``."""
    cfg = wf.config
    if not isinstance(cfg, dict):
        raise WorkflowError(f"{wf.name}: the top level must be a mapping")
    keys, values = _check_sweep(wf, cfg)
    base = {k: v for k, v in cfg.items() if k != "sweep"}
    runs = []
    for combo in itertools.product(*(values[k] for k in keys)):
        assignment = dict(zip(keys, combo))
        run_cfg = copy.deepcopy(base)
        for key, value in assignment.items():
            set_path(run_cfg, key, copy.deepcopy(value))
        runs.append(_check_run(wf, run_cfg, assignment))
    if keys and len({str(r.output_dir) for r in runs}) > 1:
        raise wf.error(("sweep",), "output.dir cannot be swept")
    _preflight_files(wf, runs[0])
    return Plan(workflow=wf, runs=runs, sweep_keys=keys, sweep_values=values,
                base_config=copy.deepcopy(cfg))



def describe(plan):
    """A short human summary of a validated plan (``dmlcore validate``)."""
    spec = plan.runs[0]
    src = spec.data["source"]
    source = {"fashion_mnist": "fashion_mnist", "files": f"file {src.get('path')}"}.get(
        src["kind"], f"synthetic {src.get('generator')}")
    where = spec.cluster.get("address") or "an embedded LocalCluster"
    lines = [f"{plan.workflow.name}: valid",
             f"  data: {source}, {spec.data.get('partitions', 'default')} partitions, "
             f"scheme {spec.data.get('scheme', 'iid')}",
             f"  model: {spec.model_kind}, strategy: {spec.strategy_kind}, optimizer: "
             f"{spec.optimizer_kind or ('set by model.penalty' if spec.penalty else 'default')}",
             f"  cluster: {where}; output: {spec.output_dir}"]
    if plan.is_sweep:
        lines.append(f"  sweep: {len(plan.runs)} configurations over "
                     f"{', '.join(plan.sweep_keys)}")
    return "\n".join(lines)

