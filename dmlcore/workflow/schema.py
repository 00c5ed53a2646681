"""Checking values against the schema: types, keys, kinds; errors located in the file.

``_Checker(wf, assignment).fail(path, message)`` raises the ``WorkflowError``
of a key path (naming the sweep value that put it there, if one did).
Allowed keys come from signatures (``_signature_params``); a keyword's type
from ``_RULES`` or else from its default; ranges from building the object
itself (``_construct``), whose error names the key it mentions.
"""
from __future__ import annotations

import difflib
import inspect
import json
import math
import re
from contextlib import contextmanager

from .. import registry
from .._util import first_line
from .parse import WorkflowError, _dotted

# Types/ranges of keywords whose defaults do not tell (None defaults, counts).
# kind: "int" | "number" | "bool" | "str" | "strlist" | "intlist" | "any"; min; nullable
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


def _signature_params(obj):
    """Keyword parameters of a class constructor or function: {name: Parameter}."""
    sig = inspect.signature(obj)
    return {n: p for n, p in sig.parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"}


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
        choices = registry.kinds(section)
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
        message = first_line(exc)
        target = tuple(path)
        mentioned = [k for k in keys_in_file if re.search(rf"\b{re.escape(k)}\b", message)]
        if mentioned:
            target = tuple(path) + (mentioned[0],)
        check.fail(target, message)




@contextmanager
def _located(check, path, prefix=""):
    """Turn ValueError/OSError raised inside into a WorkflowError located at ``path``."""
    try:
        yield
    except WorkflowError:
        raise
    except (ValueError, OSError, KeyError) as exc:
        message = first_line(exc)
        message = message.replace("pass check_finite=False", "set data.check_finite: false")
        check.fail(path, prefix + message)
