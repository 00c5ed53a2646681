"""The workflow file: YAML with the line of every key, and ``--set`` overrides.

``load(path, sets)`` reads a file into a ``Workflow`` (config dict, key path
-> YAML line, key path -> the ``--set`` that put it there); nothing is
validated yet. ``Workflow.error(path, message)`` is the ``WorkflowError`` of
one key: ``file:line: key.path: message``. ``1e-3`` (no dot) reads as a
float; a duplicate key, malformed YAML or an empty file is a WorkflowError.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .._util import first_line

_LENGTHS = ("epochs", "steps", "rounds")


class WorkflowError(ValueError):
    """Bad input (file, values, data, cluster address): ``str(exc)`` is the one line shown."""


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
        problem = getattr(exc, "problem", None) or first_line(exc)
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
