"""YAML workflows: the file, its validation, and running it on a Dask cluster.

Design
------
* One file describes one experiment (see DESIGN.md, "Workflow file")::

      name, cluster, data, model, strategy, optimizer, train, output, sweep

* Every key of ``model``, ``strategy``, ``optimizer``, ``train`` and the
  partitioning keys of ``data`` is a keyword of the Python API; ONE registry
  (``REGISTRY``) maps ``kind`` names to classes, and the allowed keys are read
  from the constructors' signatures (``inspect.signature``), so the file and
  the API cannot drift apart. Types come from the defaults (a ``bool``
  default wants a bool, an ``int`` an integer, ...) plus ``_RULES`` for the
  keywords whose default is ``None``; ranges are checked by building the
  objects themselves (they validate their arguments) — all before a cluster
  starts. Classes are imported lazily, so a workflow using one strategy
  validates even when another strategy's module is missing.
* Errors are ``WorkflowError``: one line naming the file, the YAML line (from
  the composed node tree) or the ``--set`` that put the value there, and the
  key path: ``quickstart.yaml:12: strategy.kind: 'spark' is not one of sync, ps, fedavg``.
* ``--set key.path=value`` overrides are applied to the parsed file before
  validation (values parsed as YAML; ``sweep.<key.path>=[...]`` sets a sweep).
* ``sweep: {key.path: [values], ...}`` expands into the grid of configurations;
  each is validated like a file. They run concurrently on the same client
  (one driver thread each) and are collected into ``sweep.nc``.
* Outputs (``dmlcore.outputs``) are written only once everything has
  succeeded, each file atomically; checkpoints of a run in progress live in
  ``<out>/checkpoints.partial`` and replace ``<out>/checkpoints`` at the end,
  so a failed run never touches the files of an earlier one.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import itertools
import json
import math
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

__all__ = ["WorkflowError", "REGISTRY", "load", "validate", "run", "resolve_kind",
           "Workflow", "RunSpec"]


class WorkflowError(ValueError):
    """Bad input (file, values, data, cluster address): ``str(exc)`` is the one line shown."""


# ---------------------------------------------------------------------------
# The registry: kind names -> classes ("module:attribute", imported lazily)
# ---------------------------------------------------------------------------
REGISTRY = {
    "model": {"linear": "dmlcore.models:Linear", "logistic": "dmlcore.models:Logistic",
              "softmax": "dmlcore.models:Softmax", "mlp": "dmlcore.models:MLP"},
    "strategy": {"sync": "dmlcore.strategies.sync:SyncSGD",
                 "ps": "dmlcore.strategies.ps:ParameterServer",
                 "fedavg": "dmlcore.strategies.fedavg:FedAvg"},
    "optimizer": {"sgd": "dmlcore.optim:SGD", "adam": "dmlcore.optim:Adam",
                  "lbfgs": "dmlcore.optim:LBFGS"},
    "synthetic": {"classification": "dmlcore.datasets:make_classification",
                  "regression": "dmlcore.datasets:make_regression"},
}

# Constructor arguments the runner fills in from the data (not written in the file).
_INFERRED = {"linear": {"n_features"}, "logistic": {"n_features"},
             "softmax": {"n_features", "n_classes"}, "mlp": {"sizes"}}
_OPTIONAL_INFERRED = {"softmax": {"n_classes"}, "mlp": {"sizes"}}   # may be given explicitly
_MODEL_EXTRA = {"mlp": {"hidden"}}                 # hidden: [256] -> sizes [d, 256, K]
_NESTED_OPTIMIZER = {"server_optimizer"}           # a {kind: ...} optimizer inside a strategy

# fit() keywords that are not train settings (the runner passes them itself)
_FIT_RESERVED = {"model", "data", "strategy", "optimizer", "eval_data", "init_params",
                 "client", "checkpoint_dir", "resume", "callbacks", "progress"}
# partition() keywords that are not data settings
_PARTITION_RESERVED = {"X", "y", "client", "persist", "x", "n_partitions", "sample_weight"}

# Types/ranges of keywords whose defaults do not tell (None defaults, counts).
# kind: "int" | "number" | "bool" | "str" | "strlist" | "any"; min; nullable
_RULES = {
    "epochs": ("int", 1, True), "steps": ("int", 1, True), "rounds": ("int", 1, True),
    "checkpoint_every": ("int", 1, True), "eval_every": ("int", 1, True),
    "seed": ("int", 0, False), "batch_size": ("int", 1, True),
    "partitions": ("int", 1, False), "n_workers": ("int", 1, False),
    "threads_per_worker": ("int", 1, False), "n_samples": ("int", 1, False),
    "n_features": ("int", 1, False), "n_classes": ("int", 2, False),
    "n_informative": ("int", 1, True), "trainable": ("strlist", None, True),
    "max_rows": ("int", 1, False), "timeout": ("number", 0.1, False),
    "staleness": ("int", 0, False), "hidden": ("intlist", 1, False),
    "sizes": ("intlist", 1, False), "memory_limit": ("any", None, False),
    "chunks": ("any", None, False),
}

_LENGTHS = ("epochs", "steps", "rounds")
TOP_KEYS = ("name", "cluster", "data", "model", "strategy", "optimizer", "train", "output",
            "sweep")
_SOURCE_KEYS = ("fashion_mnist", "synthetic", "path")


def _import(target):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def resolve_kind(section, kind):
    """The class (or function) registered for ``kind`` in ``section``."""
    return _import(REGISTRY[section][kind])


def _signature_params(obj):
    """Keyword parameters of a class constructor or function: {name: Parameter}."""
    sig = inspect.signature(obj)
    return {n: p for n, p in sig.parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"}


# ---------------------------------------------------------------------------
# Loading: YAML with line numbers, --set overrides
# ---------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _parse_value(text):
    return yaml.load(text, Loader=_Loader)


def _dotted(path):
    return ".".join(str(p) for p in path)


@dataclass
class Workflow:
    """A parsed workflow: the config (after ``--set``), where each key came from."""

    config: dict
    name: str                                    # the file name as given
    lines: dict = field(default_factory=dict)    # key path tuple -> YAML line
    overrides: dict = field(default_factory=dict)  # key path tuple -> the --set text
    base_dir: Path = Path(".")

    def where(self, path):
        """``file:line`` (or ``file: --set ...``) of the closest known prefix of ``path``."""
        path = tuple(path)
        for i in range(len(path), 0, -1):
            if path[:i] in self.overrides:
                return f"{self.name}: --set {self.overrides[path[:i]]}"
        for i in range(len(path), 0, -1):
            if path[:i] in self.lines:
                return f"{self.name}:{self.lines[path[:i]]}"
        return self.name

    def error(self, path, message):
        path = tuple(path)
        return WorkflowError(f"{self.where(path)}: {_dotted(path)}: {message}" if path
                             else f"{self.name}: {message}")


def _walk_lines(node, path, lines, name):
    """Record the line of every key path; reject duplicate keys."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                continue
            sub = path + (key,)
            if key in seen:
                raise WorkflowError(f"{name}:{key_node.start_mark.line + 1}: {_dotted(sub)}: "
                                    f"duplicate key")
            seen.add(key)
            lines[sub] = key_node.start_mark.line + 1
            _walk_lines(value_node, sub, lines, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.setdefault(path + (i,), item.start_mark.line + 1)
            _walk_lines(item, path + (i,), lines, name)


def parse_text(text, name="<workflow>"):
    """``(config dict, lines)`` from YAML text; malformed or empty input raises WorkflowError."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise WorkflowError(f"{where}: malformed YAML: {problem}") from None
    if node is None:
        raise WorkflowError(f"{name}: the file is empty (expected a mapping with data, "
                            f"model, strategy, train ...)")
    if not isinstance(node, yaml.MappingNode):
        raise WorkflowError(f"{name}:{node.start_mark.line + 1}: the top level must be a "
                            f"mapping of keys (data, model, strategy, ...), got "
                            f"a {'list' if isinstance(node, yaml.SequenceNode) else 'scalar'}")
    lines = {}
    _walk_lines(node, (), lines, name)
    try:
        config = _Loader("").construct_document(node)
    except yaml.YAMLError as exc:  # e.g. unhashable keys
        raise WorkflowError(f"{name}: malformed YAML: {exc}") from None
    return config, lines


def apply_overrides(config, sets, name="<workflow>"):
    """Apply ``key.path=value`` strings in place; returns {path tuple: text}."""
    overrides = {}
    for item in sets or ():
        if "=" not in item:
            raise WorkflowError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if parts[0] == "sweep" and len(parts) > 1:        # sweep keys are dotted paths
            parts = ["sweep", ".".join(parts[1:])]
        if not key or any(not p.strip() for p in parts):
            raise WorkflowError(f"--set {item!r}: the key path {key!r} is not of the form "
                                f"section.key")
        try:
            value = _parse_value(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "invalid value"
            raise WorkflowError(f"--set {item!r}: the value is not valid YAML ({problem})") \
                from None
        node = config
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise WorkflowError(f"{name}: --set {item}: {'.'.join(parts[:i + 1])} is a "
                                    f"{type(nxt).__name__}, not a mapping")
            node = nxt
        node[parts[-1]] = value
        overrides[tuple(parts)] = item
        if len(parts) == 2 and parts[0] == "train" and parts[1] in _LENGTHS \
                and value is not None:
            for other in _LENGTHS:           # the length given on the command line wins
                if other != parts[1] and ("train", other) not in overrides:
                    node.pop(other, None)
    return overrides


def load(path, sets=()):
    """Read a workflow file and apply ``--set`` overrides (no validation yet)."""
    name = str(path)
    p = Path(path)
    if not p.is_file():
        raise WorkflowError(f"{name}: no such workflow file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"{name}: cannot read the file ({exc})") from None
    config, lines = parse_text(text, name)
    overrides = apply_overrides(config, sets, name)
    return Workflow(config=config, name=name, lines=lines, overrides=overrides,
                    base_dir=p.parent)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One fully checked configuration (a sweep has one per grid point)."""

    config: dict                 # the resolved workflow (sweep removed, values applied)
    assignment: dict             # swept key path -> value ({} without a sweep)
    cluster: dict                # {"address": str | None, "timeout": s, "local": kwargs}
    data: dict                   # the data section, checked
    model_kind: str
    model_kwargs: dict
    strategy_kind: str
    strategy_kwargs: dict
    optimizer_kind: str | None
    optimizer_kwargs: dict
    train: dict                  # fit keywords
    output_dir: Path
    plots: bool

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


def _short(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


class _Checker:
    """Type/key checks that raise WorkflowError located by the workflow."""

    def __init__(self, wf, assignment=None):
        self.wf = wf
        self.assignment = assignment or {}

    def fail(self, path, message):
        path = tuple(path)
        dotted = _dotted(path)
        for key in self.assignment:
            if dotted == key or dotted.startswith(key + "."):
                where = self.wf.where(("sweep", key))
                raise WorkflowError(f"{where}: sweep {key}={_short(self.assignment[key])}: "
                                    f"{dotted}: {message}")
        raise self.wf.error(path, message)

    def mapping(self, value, path, allow_none=False):
        if value is None and allow_none:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping (key: value), got {_describe(value)}")
        for k in value:
            if not isinstance(k, str):
                self.fail(path, f"keys must be names, got {k!r}")
        return value

    def keys(self, mapping, path, allowed, required=()):
        allowed = list(allowed)
        for key in mapping:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(tuple(path) + (key,), f"unknown key{hint}; expected one of "
                          f"{', '.join(sorted(allowed))}")
        for key in required:
            if key not in mapping:
                self.fail(path, f"missing key {key!r}")

    def kind(self, mapping, path, section, what=None):
        choices = list(REGISTRY[section])
        if "kind" not in mapping:
            self.fail(path, f"missing key 'kind' (one of {', '.join(choices)})")
        kind = mapping["kind"]
        if kind not in choices:
            self.fail(tuple(path) + ("kind",),
                      f"{kind!r} is not one of {', '.join(choices)}")
        return kind

    def value(self, value, path, rule):
        """Check ``value`` against ``(kind, minimum, nullable)``."""
        kind, minimum, nullable = rule
        if value is None:
            if nullable or kind == "any":
                return
            self.fail(path, "a value is required (got null)")
        if kind == "any":
            return
        if kind == "bool":
            if not isinstance(value, bool):
                self.fail(path, f"expected true or false, got {_describe(value)}")
            return
        if kind == "str":
            if not isinstance(value, str):
                self.fail(path, f"expected a string, got {_describe(value)}")
            return
        if kind in ("strlist", "intlist"):
            want = str if kind == "strlist" else int
            if not isinstance(value, list) or any(
                    isinstance(v, bool) or not isinstance(v, want) for v in value):
                self.fail(path, f"expected a list of {'names' if want is str else 'integers'}"
                          f", got {_describe(value)}")
            if want is int and minimum is not None and any(v < minimum for v in value):
                self.fail(path, f"every entry must be >= {minimum}, got {value}")
            return
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, f"expected an integer, got {_describe(value)}")
        elif kind == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, f"expected a number, got {_describe(value)}")
            if not math.isfinite(value):
                self.fail(path, f"expected a finite number, got {value}")
        if minimum is not None and value < minimum:
            self.fail(path, f"must be >= {minimum}, got {value}")

    def arguments(self, mapping, path, params, skip=()):
        """Check a ``{keyword: value}`` mapping against a signature's parameters."""
        for key, value in mapping.items():
            if key in skip:
                continue
            rule = _RULES.get(key)
            if rule is None:
                rule = _rule_from_default(params[key].default) if key in params else None
            if rule is not None:
                self.value(value, tuple(path) + (key,), rule)


def _rule_from_default(default):
    if default is inspect.Parameter.empty or default is None:
        return None
    if isinstance(default, bool):
        return ("bool", None, False)
    if isinstance(default, int):
        return ("int", None, False)
    if isinstance(default, float):
        return ("number", None, False)
    if isinstance(default, str):
        return ("str", None, False)
    return None


def _describe(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (list, tuple)):
        return f"a list {json.dumps(value, default=str)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _construct(check, path, factory, kwargs, keys_in_file):
    """Build an object to let its constructor check ranges; errors point at the key named."""
    try:
        return factory(**kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        target = tuple(path)
        mentioned = [k for k in keys_in_file if re.search(rf"\b{re.escape(k)}\b", message)]
        if mentioned:
            target = tuple(path) + (mentioned[0],)
        check.fail(target, message)


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
    from .cluster import local_cluster

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


def _check_source(check, source, path, wf, test=False):
    """Check one data source; returns it normalised to {'kind': ..., ...}."""
    if isinstance(source, str):
        if source != "fashion_mnist":
            check.fail(path, f"{source!r} is not a known data set; use fashion_mnist, "
                       f"{{synthetic: {{...}}}} or {{path: X.npy, labels: y.npy}}")
        return {"kind": "fashion_mnist"}
    source = check.mapping(source, path)
    given = [k for k in _SOURCE_KEYS if k in source]
    if len(given) != 1:
        check.fail(path, "expected one of fashion_mnist, {synthetic: {...}} or "
                   "{path: ..., labels: ...}")
    if "fashion_mnist" in source:
        check.keys(source, path, ("fashion_mnist",))
        opts = check.mapping(source["fashion_mnist"], tuple(path) + ("fashion_mnist",),
                             allow_none=True)
        from .datasets import fashion_mnist

        params = _signature_params(fashion_mnist)
        check.keys(opts, tuple(path) + ("fashion_mnist",), set(params) - {"flatten"})
        return {"kind": "fashion_mnist", **opts}
    if "synthetic" in source:
        check.keys(source, path, ("synthetic",))
        spath = tuple(path) + ("synthetic",)
        opts = check.mapping(source["synthetic"], spath)
        kind = check.kind(opts, spath, "synthetic")
        maker = resolve_kind("synthetic", kind)
        params = _signature_params(maker)
        allowed = (set(params) - {"coef"}) | {"kind"}
        required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
        check.keys(opts, spath, allowed, required)
        check.arguments(opts, spath, params, skip=("kind", "dtype"))
        if "dtype" in opts and opts["dtype"] not in ("float32", "float64"):
            check.fail(spath + ("dtype",), f"{opts['dtype']!r} is not one of float32, float64")
        if "chunks" in opts and not (isinstance(opts["chunks"], int) and opts["chunks"] > 0
                                     and not isinstance(opts["chunks"], bool)
                                     or opts["chunks"] == "auto"):
            check.fail(spath + ("chunks",), f"expected a positive row count or 'auto', got "
                       f"{_describe(opts['chunks'])}")
        return {"kind": "synthetic", "generator": kind,
                "options": {k: v for k, v in opts.items() if k != "kind"}}
    from .datasets import load_arrays

    params = _signature_params(load_arrays)
    check.keys(source, path, set(params))
    for key in ("path", "labels", "x", "y"):
        if key in source and source[key] is not None and not isinstance(source[key], str):
            check.fail(tuple(path) + (key,), f"expected a string, got {_describe(source[key])}")
    # relative paths are relative to the workflow file's folder, not the current directory
    file = _resolve_path(wf, source["path"])
    if not file.exists():
        check.fail(tuple(path) + ("path",), f"data file not found: {source['path']} "
                   f"(looked for {file})")
    out = {"kind": "files", **source, "path": str(file)}
    labels = source.get("labels")
    if labels and ("/" in labels or "." in labels):
        labels_file = _resolve_path(wf, labels)
        if not labels_file.exists():
            check.fail(tuple(path) + ("labels",), f"labels file not found: {labels} "
                       f"(looked for {labels_file})")
        out["labels"] = str(labels_file)
    return out


def _check_weights_file(check, name, wf):
    """``data.weights``: a ``.npy`` file of one weight per training row."""
    path = ("data", "weights")
    if not isinstance(name, str) or not name.endswith(".npy"):
        check.fail(path, f"expected the path of a .npy file of row weights, got {_describe(name)}")
    file = _resolve_path(wf, name)
    if not file.exists():
        check.fail(path, f"weights file not found: {name} (looked for {file})")
    return str(file)


def _load_weights(file, n_rows):
    """The row weights of ``data.weights`` (float64, one per source row)."""
    w = np.load(file, mmap_mode="r", allow_pickle=False)
    if w.ndim != 1 or w.shape[0] != n_rows:
        raise ValueError(f"the weights file holds shape {w.shape}; expected one weight per "
                         f"row of the source ({n_rows})")
    return np.asarray(w, dtype=np.float64)


def _resolve_path(wf, name):
    """``name`` (a data path from the workflow) as an absolute path; relative to its folder."""
    p = Path(name).expanduser()
    if not p.is_absolute():
        p = Path(getattr(wf, "base_dir", ".") or ".") / p
    return p.absolute()


def _check_data(check, cfg, wf):
    data = check.mapping(cfg.get("data"), ("data",))
    from .data import partition

    params = {n: p for n, p in _signature_params(partition).items()
              if n not in _PARTITION_RESERVED}
    allowed = set(params) | {"source", "test", "partitions", "max_rows", "dtype", "weights"}
    check.keys(data, ("data",), allowed, required=("source",))
    check.arguments(data, ("data",), params, skip=("source", "test", "dtype", "weights"))
    from .data import SCHEMES

    if "scheme" in data and data["scheme"] not in SCHEMES:
        check.fail(("data", "scheme"), f"{data['scheme']!r} is not one of {', '.join(SCHEMES)}")
    if "dtype" in data and data["dtype"] not in ("float32", "float64"):
        check.fail(("data", "dtype"), f"{data['dtype']!r} is not one of float32, float64")
    out = dict(data)
    out["source"] = _check_source(check, data["source"], ("data", "source"), wf)
    if "weights" in data:
        out["weights"] = _check_weights_file(check, data["weights"], wf)
    if out["source"]["kind"] == "fashion_mnist" and isinstance(data["source"], str):
        out["source"]["split"] = "train"
    test = data.get("test")
    if test is not None:
        tpath = ("data", "test")
        test = check.mapping(test, tpath)
        check.keys(test, tpath, ("source", "split"))
        if "source" in test:
            src = _check_source(check, test["source"], tpath + ("source",), wf, test=True)
            if src["kind"] == "fashion_mnist":
                split = test.get("split", "test")
                if split not in ("train", "test"):
                    check.fail(tpath + ("split",), f"{split!r} is not one of train, test")
                src["split"] = split
            elif "split" in test:
                check.fail(tpath + ("split",), "split goes with source: fashion_mnist, or "
                           "alone (a holdout fraction of the training data)")
            out["test"] = {"source": src}
        else:
            if "split" not in test:
                check.fail(tpath, "expected source: ... and/or split: (a holdout fraction "
                           "such as 0.2, or a row count)")
            split = test["split"]
            ok = (not isinstance(split, bool) and isinstance(split, (int, float))
                  and (0 < split < 1 or (isinstance(split, int) and split >= 1)))
            if not ok:
                check.fail(tpath + ("split",), f"expected a fraction in (0, 1) or a row count "
                           f">= 1, got {_describe(split)}")
            out["test"] = {"holdout": split}
    return out


def _check_model(check, cfg):
    path = ("model",)
    model = check.mapping(cfg.get("model"), path)
    kind = check.kind(model, path, "model")
    cls = resolve_kind("model", kind)
    params = _signature_params(cls)
    inferred = _INFERRED.get(kind, set())
    allowed = (set(params) - inferred) | _OPTIONAL_INFERRED.get(kind, set()) \
        | _MODEL_EXTRA.get(kind, set()) | {"kind"}
    check.keys(model, path, allowed)
    check.arguments(model, path, params, skip=("kind",))
    kwargs = {k: v for k, v in model.items() if k != "kind"}
    if kind == "mlp":
        if "sizes" in kwargs and "hidden" in kwargs:
            check.fail(path + ("hidden",), "give hidden (sizes inferred from the data) or "
                       "sizes, not both")
        trial = dict(kwargs)
        hidden = trial.pop("hidden", [])
        if "sizes" not in trial:
            trial["sizes"] = [4, *hidden, 3]
        _construct(check, path, cls, trial, list(model))
    else:
        trial = {k: v for k, v in kwargs.items()}
        for name in inferred:
            trial.setdefault(name, 3 if name == "n_classes" else 4)
        _construct(check, path, cls, trial, list(model))
    return kind, kwargs


def _optimizer_spec(check, opt, path):
    """Check an optimizer mapping; returns (kind, kwargs)."""
    opt = check.mapping(opt, path)
    kind = check.kind(opt, path, "optimizer")
    cls = resolve_kind("optimizer", kind)
    params = _signature_params(cls)
    check.keys(opt, path, set(params) | {"kind"})
    check.arguments(opt, path, params, skip=("kind", "schedule"))
    kwargs = {k: v for k, v in opt.items() if k != "kind"}
    if "schedule" in kwargs and not isinstance(kwargs["schedule"], (str, dict, type(None))):
        check.fail(tuple(path) + ("schedule",), f"expected a schedule name or "
                   f"{{kind: cosine, ...}}, got {_describe(kwargs['schedule'])}")
    _construct(check, path, cls, kwargs, list(opt))
    return kind, kwargs


def build_optimizer(kind, kwargs):
    return resolve_kind("optimizer", kind)(**kwargs)


def _check_strategy(check, cfg):
    path = ("strategy",)
    strat = check.mapping(cfg.get("strategy"), path)
    kind = check.kind(strat, path, "strategy")
    try:
        cls = resolve_kind("strategy", kind)
    except ImportError as exc:
        check.fail(path + ("kind",), f"{kind!r} is not available in this installation ({exc})")
    params = _signature_params(cls)
    check.keys(strat, path, set(params) | {"kind"})
    check.arguments(strat, path, params, skip=("kind",) + tuple(_NESTED_OPTIMIZER))
    kwargs = {k: v for k, v in strat.items() if k != "kind"}
    trial = dict(kwargs)
    for name in _NESTED_OPTIMIZER:
        if trial.get(name) is not None:
            okind, okw = _optimizer_spec(check, trial[name], path + (name,))
            trial[name] = build_optimizer(okind, okw)
    _construct(check, path, cls, trial, list(strat))
    return kind, kwargs


def build_strategy(kind, kwargs):
    kwargs = dict(kwargs)
    for name in _NESTED_OPTIMIZER:
        if isinstance(kwargs.get(name), dict):
            okw = dict(kwargs[name])
            kwargs[name] = build_optimizer(okw.pop("kind"), okw)
    return resolve_kind("strategy", kind)(**kwargs)


def _check_train(check, cfg):
    path = ("train",)
    train = check.mapping(cfg.get("train"), path)
    from .train import fit

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


def _check_run(wf, cfg, assignment):
    check = _Checker(wf, assignment)
    check.keys(cfg, (), TOP_KEYS, required=("data", "model", "strategy", "train"))
    if "name" in cfg and not isinstance(cfg["name"], str):
        check.fail(("name",), f"expected a string, got {_describe(cfg['name'])}")
    cluster = _check_cluster(check, cfg)
    data = _check_data(check, cfg, wf)
    model_kind, model_kwargs = _check_model(check, cfg)
    strategy_kind, strategy_kwargs = _check_strategy(check, cfg)
    optimizer_kind, optimizer_kwargs = None, {}
    if cfg.get("optimizer") is not None:
        optimizer_kind, optimizer_kwargs = _optimizer_spec(check, cfg["optimizer"],
                                                           ("optimizer",))
    train = _check_train(check, cfg)
    output_dir, plots = _check_output(check, cfg, wf)
    # cross-section rules
    if optimizer_kind == "lbfgs" and (strategy_kind != "sync"
                                      or strategy_kwargs.get("batch_size", None) is not None
                                      or strategy_kwargs.get("local_steps", 1) != 1):
        check.fail(("optimizer", "kind"), "lbfgs is a full-batch solver: it needs strategy "
                   "{kind: sync, batch_size: null} (without local_steps)")
    if strategy_kind != "fedavg" and train.get("rounds") is not None:
        check.fail(("train", "rounds"), "rounds are FedAvg rounds; use steps or epochs for "
                   f"strategy kind {strategy_kind!r}")
    src = data["source"]
    if src["kind"] == "synthetic":
        opts = src["options"]
        if src["generator"] == "regression" and (model_kind in ("logistic", "softmax") or (
                model_kind == "mlp" and model_kwargs.get("output", "softmax") == "softmax")):
            check.fail(("model", "kind"), f"{model_kind} is a classifier; the synthetic data "
                       f"are a regression problem")
        if src["generator"] == "classification" and model_kind == "logistic" \
                and int(opts.get("n_classes", 2)) != 2:
            check.fail(("model", "kind"), f"logistic is binary; the data have "
                       f"{opts['n_classes']} classes (use softmax or mlp)")
    return RunSpec(config=cfg, assignment=dict(assignment), cluster=cluster, data=data,
                   model_kind=model_kind, model_kwargs=model_kwargs,
                   strategy_kind=strategy_kind, strategy_kwargs=strategy_kwargs,
                   optimizer_kind=optimizer_kind, optimizer_kwargs=optimizer_kwargs,
                   train=train, output_dir=output_dir, plots=plots)


def set_path(config, dotted, value):
    """Set ``a.b.c`` in a nested dict (creating mappings)."""
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


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


def _preflight_files(wf, spec):
    """Shapes of file sources (read lazily): X 2-D, y 1-D, equal lengths — before any cluster."""
    check = _Checker(wf)
    items = [(("data", "source"), spec.data["source"])]
    if "test" in spec.data and "source" in spec.data["test"]:
        items.append((("data", "test", "source"), spec.data["test"]["source"]))
    classify = _is_classifier_spec(spec)
    classes = {}
    for path, src in items:
        if src["kind"] == "fashion_mnist":
            from .datasets import fashion_mnist_files

            with _located(check, path):
                fashion_mnist_files(src.get("split", "train"))
            classes[path] = np.arange(10)
            continue
        if src["kind"] != "files":
            continue
        with _located(check, path):
            X, y = _load_files(src)
            _check_shapes(X, y)
            # labels are small (8 bytes a row): check them here, before any cluster
            labels = y.compute(scheduler="sync") if _is_dask(y) else np.asarray(y)
            labels = _labels_for(labels, classify, spec.model_kind,
                                 "the test labels" if "test" in path else "the labels")
            if classify:
                classes[path] = np.unique(labels)
    train, test = classes.get(("data", "source")), classes.get(("data", "test", "source"))
    if classify and train is not None and test is not None and "max_rows" not in spec.data:
        n_classes = _n_classes(spec, train, check)      # as run computes it
        outside = np.setdiff1d(test, np.arange(n_classes))
        if outside.size:
            check.fail(("data", "test", "source"), f"the test labels hold "
                       f"{outside[:5].tolist()}, outside the classes 0..{n_classes - 1} "
                       f"of the training data")


@contextmanager
def _located(check, path, prefix=""):
    """Turn ValueError/OSError raised inside into a WorkflowError located at ``path``."""
    try:
        yield
    except WorkflowError:
        raise
    except (ValueError, OSError, KeyError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        message = message.replace("pass check_finite=False", "set data.check_finite: false")
        check.fail(path, prefix + message)


def _check_shapes(X, y, what="X"):
    if X.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows x features), got shape {tuple(X.shape)}")
    if y is None:
        raise ValueError("no labels: give labels: (a file or a variable name)")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but the labels have {y.shape[0]}")


# ---------------------------------------------------------------------------
# Building data, model, strategy, optimizer
# ---------------------------------------------------------------------------
def _load_files(src):
    from .datasets import load_arrays

    kwargs = {k: v for k, v in src.items() if k not in ("kind",)}
    return load_arrays(**kwargs)


def _load_source(src, client):
    """``(X, y)``: numpy or dask arrays (synthetic data are built on the workers)."""
    from . import datasets

    if src["kind"] == "fashion_mnist":
        opts = {k: v for k, v in src.items() if k != "kind"}
        return datasets.fashion_mnist(**opts)
    if src["kind"] == "synthetic":
        opts = dict(src["options"])
        if "dtype" in opts:
            opts["dtype"] = np.dtype(opts["dtype"])
        return resolve_kind("synthetic", src["generator"])(**opts)
    return _load_files(src)


def _is_dask(a):
    import dask.array as da

    return isinstance(a, da.Array)


def _to_numpy(a, client):
    import scipy.sparse as sp

    if sp.issparse(a):
        return a.tocsr()
    if _is_dask(a):
        return np.asarray(client.compute(a).result() if client is not None else a.compute())
    return np.asarray(a)


def _is_classifier_spec(spec):
    return spec.model_kind in ("logistic", "softmax") or (
        spec.model_kind == "mlp" and spec.model_kwargs.get("output", "softmax") == "softmax")


@dataclass
class PreparedData:
    data: object                  # PartitionedData
    eval_data: tuple | None       # (X, y) numpy, or None
    n_features: int
    n_outputs: int                # classes (classifiers) or targets (regression)


def prepare_data(spec, client, wf, say=None):
    """Load, check and partition the data of ``spec`` on ``client``.

    ``say`` (a print-like callable, optional) gets one line before loading, one
    before partitioning and a one-line summary of the partitions' skew.
    """
    import scipy.sparse as sp

    from .data import partition

    say = say or (lambda message: None)
    check = _Checker(wf, spec.assignment)
    d = spec.data
    classify = _is_classifier_spec(spec)
    say(f"loading data: {_source_label(d['source'])} ...")
    with _located(check, ("data", "source")):
        X, y = _load_source(d["source"], client)
        _check_shapes(X, y)
    weights = None
    if "weights" in d:
        with _located(check, ("data", "weights")):
            weights = _load_weights(d["weights"], int(X.shape[0]))
    with _located(check, ("data", "source")):
        if "max_rows" in d:
            X, y = X[:d["max_rows"]], y[:d["max_rows"]]
            weights = None if weights is None else weights[:d["max_rows"]]
    eval_data = None
    test = d.get("test")
    if test is not None and "holdout" in test:
        n = int(X.shape[0])
        k = test["holdout"]
        k = int(round(k * n)) if isinstance(k, float) else int(k)
        if not 1 <= k < n:
            check.fail(("data", "test", "split"), f"a holdout of {k} rows leaves no training "
                       f"data (the source has {n} rows)")
        if _is_dask(X):     # synthetic and file data sets: the last rows are the holdout
            Xt, yt = X[n - k:], y[n - k:]
            X, y = X[:n - k], y[:n - k]
            weights = None if weights is None else weights[:n - k]
        else:
            order = np.random.default_rng(d.get("seed", 0)).permutation(n)
            Xt, yt = X[order[n - k:]], y[order[n - k:]]
            keep = np.sort(order[:n - k])
            X, y = X[keep], y[keep]
            weights = None if weights is None else weights[keep]
        with _located(check, ("data", "test")):
            eval_data = (_to_numpy(Xt, client), _to_numpy(yt, client))
    elif test is not None:
        with _located(check, ("data", "test", "source")):
            Xt, yt = _load_source(test["source"], client)
            _check_shapes(Xt, yt, "the test X")
            eval_data = (_to_numpy(Xt, client), _to_numpy(yt, client))

    if sp.issparse(X) and spec.model_kind not in ("linear", "logistic", "softmax"):
        check.fail(("model", "kind"), f"the data are sparse (a CSR .npz); model kind "
                   f"{spec.model_kind!r} takes dense data: use linear, logistic or softmax")
    with _located(check, ("data", "source")):
        y = _to_numpy(y, client)
        y = _labels_for(y, classify, spec.model_kind, "the labels")
        dtype = d.get("dtype")
        if dtype is not None and np.dtype(X.dtype) != np.dtype(dtype):
            X = X.astype(dtype)
    n_outputs = 1
    if classify:
        classes = np.unique(y)
        n_outputs = _n_classes(spec, classes, check)
    elif y.ndim == 2:
        n_outputs = y.shape[1]
    if eval_data is not None:
        with _located(check, ("data", "test")):
            Xt, yt = eval_data
            if Xt.shape[1] != X.shape[1]:
                raise ValueError(f"the test set has {Xt.shape[1]} features, the training "
                                 f"data {X.shape[1]}")
            values = Xt.data if sp.issparse(Xt) else Xt
            if values.dtype.kind != "f" or not np.isfinite(values).all():
                bad = int((~np.isfinite(np.asarray(values, dtype=np.float64))).sum())
                raise ValueError(f"the test X contains {bad} NaN or infinite value(s)")
            yt = _labels_for(yt, classify, spec.model_kind, "the test labels")
            if classify:
                outside = np.setdiff1d(np.unique(yt), np.arange(n_outputs))
                if outside.size:
                    raise ValueError(f"the test labels hold {outside[:5].tolist()}, outside "
                                     f"the classes 0..{n_outputs - 1} of the training data")
            dtype = np.dtype(X.dtype) if np.dtype(X.dtype).kind == "f" else np.float64
            eval_data = (Xt.astype(dtype) if sp.issparse(Xt)
                         else np.ascontiguousarray(Xt, dtype=dtype), yt)
    kwargs = {k: v for k, v in d.items()
              if k not in ("source", "test", "partitions", "max_rows", "dtype", "weights")}
    if weights is not None:
        kwargs["sample_weight"] = weights
    if "partitions" in d:
        kwargs["n_partitions"] = d["partitions"]
    say(f"partitioning {int(X.shape[0])} rows x {int(X.shape[1])} features into "
        f"{d.get('partitions', 'the default number of')} partitions "
        f"(scheme {d.get('scheme', 'iid')}) ...")
    with _located(check, ("data",)):
        data = partition(X, y, client=client, **kwargs)
    say(_skew_summary(data))
    if eval_data is not None and eval_data[0].dtype != data.dtype:
        eval_data = (eval_data[0].astype(data.dtype), eval_data[1])
    return PreparedData(data=data, eval_data=eval_data, n_features=data.n_features,
                        n_outputs=int(n_outputs))


def _source_label(source):
    kind = source.get("kind")
    if kind == "files":
        return f"file {source.get('path')}"
    if kind == "fashion_mnist":
        return f"fashion_mnist ({source.get('split', 'train')})"
    return f"synthetic {source.get('generator', kind)}"


def _skew_summary(data):
    """One line: rows per partition (min/mean/max) and, for labels, the largest skew."""
    rows = np.asarray(data.partition_sizes)
    line = (f"partitions: {data.n_partitions}, rows per partition {int(rows.min())}/"
            f"{rows.mean():.0f}/{int(rows.max())} (min/mean/max, imbalance "
            f"{rows.max() / rows.mean():.2f})")
    counts = getattr(data, "_class_count", None)
    if data.classes is not None and counts is not None:
        counts = np.asarray(counts, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            local = counts / counts.sum(axis=1, keepdims=True)
        tv = 0.5 * np.abs(local - counts.sum(axis=0) / counts.sum()).sum(axis=1)
        line += (f", label skew (total variation from the global mix) max "
                 f"{float(np.nanmax(tv)):.2f}")
    return line


def _labels_for(y, classify, model_kind, what):
    """Check/convert labels for the model: integer classes >= 0, or float targets."""
    y = np.asarray(y)
    if classify:
        if y.dtype.kind == "f":
            if not np.isfinite(y).all():
                raise ValueError(f"{what} contain NaN or infinite values")
            if not np.all(y == np.round(y)):
                raise ValueError(f"{what} are not integer class ids (e.g. "
                                 f"{y[y != np.round(y)][0]}); model kind {model_kind} is a "
                                 f"classifier")
            y = y.astype(np.int64)
        elif y.dtype.kind == "b":
            y = y.astype(np.int64)
        elif y.dtype.kind not in "iu":
            raise ValueError(f"{what} must be integer class ids, got dtype {y.dtype}")
        if y.size and y.min() < 0:
            raise ValueError(f"{what} hold negative values ({int(y.min())}); classes must be "
                             f"0, 1, ..., K-1")
        if model_kind == "logistic" and y.size and y.max() > 1:
            raise ValueError(f"{what} hold {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}, "
                             f"outside the classes 0, 1 of model kind logistic")
        return y.astype(np.int64, copy=False)
    if y.dtype.kind not in "fiub":
        raise ValueError(f"{what} must be numbers, got dtype {y.dtype}")
    return y.astype(np.float64) if y.dtype.kind != "f" else y


def _n_classes(spec, classes, check):
    top = int(classes.max()) + 1 if classes.size else 2
    given = None
    if spec.model_kind == "softmax":
        given = spec.model_kwargs.get("n_classes")
    elif spec.model_kind == "mlp" and "sizes" in spec.model_kwargs:
        given = spec.model_kwargs["sizes"][-1]
    elif spec.model_kind == "logistic":
        return 2
    if given is not None:
        if top > given:
            check.fail(("model",), f"the labels go up to {top - 1}, outside the "
                       f"{given} classes of the model")
        return given
    return max(top, 2)


def build_model(spec, prepared):
    """The model of ``spec`` with sizes inferred from the data."""
    kind, kwargs = spec.model_kind, dict(spec.model_kwargs)
    d, k = prepared.n_features, prepared.n_outputs
    if kind in ("linear", "logistic"):
        kwargs["n_features"] = d
    elif kind == "softmax":
        kwargs["n_features"] = d
        kwargs.setdefault("n_classes", k)
    elif kind == "mlp":
        hidden = kwargs.pop("hidden", [])
        if "sizes" not in kwargs:
            kwargs["sizes"] = [d, *hidden, k]
        elif kwargs["sizes"][0] != d:
            raise WorkflowError(f"model.sizes starts with {kwargs['sizes'][0]} inputs, the "
                                f"data have {d} features")
    return resolve_kind("model", kind)(**kwargs)


# ---------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------
@contextmanager
def open_client(spec, address=None, say=print):
    """A client for ``address`` (or ``cluster.address``), else an embedded LocalCluster."""
    from distributed import Client

    address = address or spec.cluster.get("address")
    timeout = spec.cluster.get("timeout", 5.0)
    cluster = None
    if address:
        from .cluster import security

        try:
            sec = security(address, spec.cluster.get("tls"))
        except ValueError as exc:
            raise WorkflowError(str(exc)) from None
        try:
            client = Client(address, timeout=timeout, set_as_default=True, security=sec)
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise WorkflowError(f"cannot reach the Dask scheduler at {address} "
                                f"within {timeout:g} s: {first}") from None
        try:
            client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, OSError):
            client.close()
            raise WorkflowError(f"the Dask scheduler at {address} has no workers "
                                f"(waited {timeout:g} s)") from None
    else:
        from .cluster import local_cluster

        cluster = local_cluster(**spec.cluster.get("local", {}))
        client = Client(cluster, set_as_default=True)
    try:
        say(f"dashboard: {client.dashboard_link}")
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------
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
    from . import checkpoint as ckpt
    from . import outputs

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
    from .train import fit

    check = _Checker(wf, spec.assignment)
    model = build_model(spec, prepared)
    strategy = build_strategy(spec.strategy_kind, spec.strategy_kwargs)
    optimizer = (build_optimizer(spec.optimizer_kind, spec.optimizer_kwargs)
                 if spec.optimizer_kind else None)
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


def run(path, *, scheduler=None, sets=(), resume=False, progress=True, say=print):
    """Run a workflow file; returns the metrics dict (a sweep: the best run's, plus ``runs``)."""
    from . import outputs

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
    return "rounds" if spec.strategy_kind == "fedavg" else "steps"


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


def _score(metrics):
    """Sort key of a run: higher eval accuracy, else lower eval loss, else lower loss."""
    if metrics.get("eval_accuracy") is not None:
        return (0, -metrics["eval_accuracy"])
    if metrics.get("eval_loss") is not None:
        return (1, metrics["eval_loss"])
    loss = metrics.get("final_loss")
    return (2, loss if loss is not None and math.isfinite(loss) else math.inf)


def _run_sweep(plan, client, out_dir, resume, say, t_start):
    from . import outputs

    wf = plan.workflow
    prepared_by_data = {}

    def data_key(spec):      # the prepared data depend on the data section and the model kind
        return json.dumps([spec.data, _is_classifier_spec(spec), spec.model_kind,
                           spec.model_kwargs.get("n_classes"), spec.model_kwargs.get("sizes")],
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
             f"{spec.optimizer_kind or 'default'}",
             f"  cluster: {where}; output: {spec.output_dir}"]
    if plan.is_sweep:
        lines.append(f"  sweep: {len(plan.runs)} configurations over "
                     f"{', '.join(plan.sweep_keys)}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the dmlcore command: dmlcore run WORKFLOW.yaml")
