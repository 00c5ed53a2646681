"""Checking the cluster, model, strategy, optimizer, train and output sections.

Each ``_check_*(check, cfg)`` checks one section against the constructor
(or function) it configures, whose keywords are the allowed keys, builds a
trial object so its own range checks run (placeholder sizes for a model),
and returns the section normalised. What a kind adds or infers is read
from its registered class (``dmlcore.workflow.build``).
"""
from __future__ import annotations

from pathlib import Path

from .. import registry
from .build import build_optimizer
from .schema import _RULES, _construct, _describe, _signature_params

# fit() keywords that are not train settings (the runner passes them itself)
_FIT_RESERVED = {"model", "data", "strategy", "optimizer", "eval_data", "init_params",
                 "client", "checkpoint_dir", "resume", "callbacks", "progress"}


def _check_cluster(check, cfg):
    cluster = check.mapping(cfg.get("cluster"), ("cluster",), allow_none=True)
    check.keys(cluster, ("cluster",), ("local", "address", "timeout", "tls"))
    tls = check.mapping(cluster.get("tls"), ("cluster", "tls"), allow_none=True)
    check.keys(tls, ("cluster", "tls"), ("ca_file", "cert", "key"))
    for key in ("ca_file", "cert", "key"):
        if key not in tls:
            if tls:
                check.fail(("cluster", "tls"), f"missing {key} (TLS needs ca_file, cert, key)")
            continue
        if not isinstance(tls[key], str) or not Path(tls[key]).expanduser().is_file():
            check.fail(("cluster", "tls", key), f"no such file: {_describe(tls[key])}")
        tls[key] = str(Path(tls[key]).expanduser())
    if "local" in cluster and "address" in cluster:
        check.fail(("cluster",), "give either 'local' or 'address', not both")
    address = cluster.get("address")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        check.fail(("cluster", "address"), f"expected a scheduler address such as "
                   f"'tcp://host:8786', got {_describe(address)}")
    if "timeout" in cluster:
        check.value(cluster["timeout"], ("cluster", "timeout"), _RULES["timeout"])
    local = check.mapping(cluster.get("local"), ("cluster", "local"), allow_none=True)
    from ..cluster import local_cluster     # distributed: imported when a file is checked

    params = _signature_params(local_cluster)
    allowed = set(params) | {"memory_limit", "processes"}
    check.keys(local, ("cluster", "local"), allowed)
    check.arguments(local, ("cluster", "local"), params)
    if "processes" in local:
        check.value(local["processes"], ("cluster", "local", "processes"), ("bool", None, False))
    if address and address.startswith("tls://") and not tls:
        check.fail(("cluster", "address"), f"{address} is a TLS scheduler: give cluster.tls: "
                   f"{{ca_file, cert, key}} (or --tls-ca-file, --tls-cert, --tls-key)")
    return {"address": address, "timeout": float(cluster.get("timeout", 5.0)),
            "local": dict(local), "tls": dict(tls)}



def _check_model(check, cfg):
    """``(kind, kwargs, penalty, trial model)``; the trial has placeholder sizes;
    ``penalty``: the keys of the kind's ``penalty_keys`` given (checked), apart."""
    path = ("model",)
    model = check.mapping(cfg.get("model"), path)
    kind = check.kind(model, path, "model")
    cls = registry.resolve("model", kind)
    params = _signature_params(cls)
    penalty_keys = tuple(getattr(cls, "penalty_keys", ()))
    allowed = ((set(params) - set(cls.inferred_keys)) | set(cls.extra_keys)
               | set(penalty_keys) | {"kind"})
    check.keys(model, path, allowed)
    check.arguments(model, path, params, skip=("kind",) + penalty_keys)
    kwargs = {k: v for k, v in model.items() if k != "kind" and k not in penalty_keys}
    penalty = {k: v for k, v in model.items() if k in penalty_keys}
    if penalty:
        _construct(check, path, lambda **kw: cls.penalty(kw, 1.0), dict(penalty), list(model))
    trial = _construct(check, path, lambda **kw: cls.for_data(None, None, **kw), dict(kwargs),
                       list(model))
    return kind, kwargs, penalty, trial


def _optimizer_spec(check, opt, path):
    """Check an optimizer mapping; returns (kind, kwargs)."""
    opt = check.mapping(opt, path)
    kind = check.kind(opt, path, "optimizer")
    cls = registry.resolve("optimizer", kind)
    params = _signature_params(cls)
    check.keys(opt, path, set(params) | {"kind"})
    check.arguments(opt, path, params, skip=("kind", "schedule"))
    kwargs = {k: v for k, v in opt.items() if k != "kind"}
    if "schedule" in kwargs and not isinstance(kwargs["schedule"], (str, dict, type(None))):
        check.fail(tuple(path) + ("schedule",), f"expected a schedule name or "
                   f"{{kind: cosine, ...}}, got {_describe(kwargs['schedule'])}")
    _construct(check, path, cls, kwargs, list(opt))
    return kind, kwargs



def _check_strategy(check, cfg):
    path = ("strategy",)
    strat = check.mapping(cfg.get("strategy"), path)
    kind = check.kind(strat, path, "strategy")
    try:
        cls = registry.resolve("strategy", kind)
    except ImportError as exc:
        check.fail(path + ("kind",), f"{kind!r} is not available in this installation ({exc})")
    params = _signature_params(cls)
    check.keys(strat, path, set(params) | {"kind"})
    check.arguments(strat, path, params, skip=("kind",) + tuple(cls.optimizer_keys))
    kwargs = {k: v for k, v in strat.items() if k != "kind"}
    trial = dict(kwargs)
    for name in cls.optimizer_keys:
        if trial.get(name) is not None:
            okind, okw = _optimizer_spec(check, trial[name], path + (name,))
            trial[name] = build_optimizer(okind, okw)
    _construct(check, path, cls, trial, list(strat))
    return kind, kwargs



def _check_train(check, cfg):
    path = ("train",)
    train = check.mapping(cfg.get("train"), path)
    from ..train import fit     # xarray and distributed: imported when a file is checked

    params = {n: p for n, p in _signature_params(fit).items() if n not in _FIT_RESERVED}
    check.keys(train, path, set(params))
    check.arguments(train, path, params)
    lengths = [k for k in ("epochs", "steps", "rounds") if train.get(k) is not None]
    if len(lengths) != 1:
        check.fail(path, "give exactly one of epochs, steps, rounds"
                   + (f" (got {', '.join(lengths)})" if lengths else ""))
    return dict(train)


def _check_output(check, cfg, wf):
    path = ("output",)
    out = check.mapping(cfg.get("output"), path, allow_none=True)
    check.keys(out, path, ("dir", "plots"))
    if "dir" in out and (not isinstance(out["dir"], str) or not out["dir"].strip()):
        check.fail(path + ("dir",), f"expected a directory name, got {_describe(out['dir'])}")
    if "plots" in out:
        check.value(out["plots"], path + ("plots",), ("bool", None, False))
    name = cfg.get("name") or Path(wf.name).stem
    directory = Path(out.get("dir") or Path("runs") / name).expanduser()
    if directory.exists() and not directory.is_dir():
        check.fail(path + ("dir",), f"{directory} exists and is not a directory")
    return directory, bool(out.get("plots", True))

