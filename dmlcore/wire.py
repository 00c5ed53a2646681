"""The data plane's wire format: a JSON structure and raw array frames, no pickle.

``encode(obj) -> (header bytes, [buffers])`` and ``decode(header, buffers)``.
The header is UTF-8 JSON describing ``obj``; every NumPy array (and bytes
value) travels as one raw buffer that the header names by index, dtype and
shape. What may travel, and nothing else (``TypeError`` on encode,
``ValueError`` on decode):

* None, bool, int, float, str, bytes; lists, tuples, dicts (any such keys);
* NumPy arrays and scalars of boolean or numeric dtypes;
* the optimizers of ``dmlcore.optim`` (their kind and constructor keywords,
  schedule included) and their state NamedTuples, ``Call``/``Reply`` and ``messages.MESSAGES``;
* exceptions: the type name, if in ``ERRORS``, and the message; any other
  type arrives as ``RuntimeError("TypeName: message")``.
"""
from __future__ import annotations

import builtins
import functools
import json
from typing import Any, NamedTuple

import numpy as np


class Call(NamedTuple):
    """A request: ``method`` (checked against the server's list), arguments."""
    method: str
    args: tuple
    kwargs: dict


class Reply(NamedTuple):
    """The answer to a ``Call``: ``ok`` and the value, or False and the error."""
    ok: bool
    value: Any


ERRORS = {name: getattr(builtins, name) for name in (
    "ArithmeticError", "AssertionError", "AttributeError", "ConnectionError",
    "EOFError", "FloatingPointError", "IndexError", "KeyError", "LookupError",
    "MemoryError", "NotImplementedError", "OSError", "OverflowError", "RuntimeError",
    "StopIteration", "TimeoutError", "TypeError", "ValueError", "ZeroDivisionError")}
_DTYPE_KINDS = "biufc"


def _optim():
    from . import optim

    return optim


@functools.cache
def _named_tuples():
    from .messages import MESSAGES

    optim = _optim()
    return {"Call": Call, "Reply": Reply, "SGDState": optim.SGDState,
            "AdamState": optim.AdamState, **MESSAGES}


@functools.cache
def _optimizers():
    optim = _optim()
    return {"SGD": optim.SGD, "Adam": optim.Adam}


@functools.cache
def _schedules():
    optim = _optim()
    return {"Constant": optim.Constant, "StepDecay": optim.StepDecay, "Cosine": optim.Cosine}


def register_error(cls):
    """Let exceptions of type ``cls`` (built from one message) travel as themselves."""
    ERRORS[cls.__name__] = cls
    return cls


def encode(obj):
    """``(header bytes, buffers)`` for ``obj``; buffers are C-contiguous memory."""
    buffers = []
    tree = _enc(obj, buffers)
    return json.dumps(tree, separators=(",", ":")).encode(), buffers


_PLAIN = (type(None), bool, int, float, str)


def _enc(obj, buffers):
    t = type(obj)
    if t in _PLAIN:
        return obj
    if t is tuple:
        return {"$t": [_enc(v, buffers) for v in obj]}
    if t is list:
        return [_enc(v, buffers) for v in obj]
    if isinstance(obj, (np.ndarray, np.generic)):
        array = np.asarray(obj)
        if array.dtype.kind not in _DTYPE_KINDS:
            raise TypeError(f"wire: arrays of dtype {array.dtype} cannot travel")
        if not array.flags.c_contiguous:
            array = array.copy(order="C")           # (ascontiguousarray makes 0-d 1-d)
        buffers.append(array.reshape(-1).view(np.uint8) if array.size else b"")
        return {"$a": len(buffers) - 1, "dtype": array.dtype.str, "shape": list(array.shape),
                "scalar": isinstance(obj, np.generic)}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        buffers.append(bytes(obj))
        return {"$b": len(buffers) - 1}
    if _named_tuples().get(t.__name__) is t:
        return {"$n": type(obj).__name__, "f": [_enc(v, buffers) for v in obj]}
    if type(obj) is dict:
        return {"$d": [[_enc(k, buffers), _enc(v, buffers)] for k, v in obj.items()]}
    if isinstance(obj, BaseException):
        return {"$e": type(obj).__name__, "msg": str(obj)}
    if type(obj).__name__ in _optimizers() and type(obj) is _optimizers()[type(obj).__name__]:
        fields = {k: v for k, v in vars(obj).items() if k != "schedule"}
        schedule = obj.schedule
        if type(schedule).__name__ not in _schedules() or \
                type(schedule) is not _schedules()[type(schedule).__name__]:
            raise TypeError(f"wire: the schedule {schedule!r} cannot travel (use a named one)")
        return {"$o": type(obj).__name__, "kw": _enc(fields, buffers),
                "schedule": [type(schedule).__name__, _enc(dict(vars(schedule)), buffers)]}
    raise TypeError(f"wire: values of type {type(obj).__name__} cannot travel")


def decode(header, buffers):
    """The object ``encode`` described; arrays are views of ``buffers``."""
    try:
        tree = json.loads(bytes(header).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"wire: the header is not JSON ({exc})") from None
    return _dec(tree, buffers)


def _buffer(buffers, index):
    if not isinstance(index, int) or not 0 <= index < len(buffers):
        raise ValueError(f"wire: buffer {index!r} does not exist")
    return buffers[index]


def _dec(tree, buffers):
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [_dec(v, buffers) for v in tree]
    if not isinstance(tree, dict) or len(tree) == 0:
        raise ValueError("wire: malformed header")
    if "$a" in tree:
        dtype = np.dtype(str(tree["dtype"]))
        if dtype.kind not in _DTYPE_KINDS:
            raise ValueError(f"wire: dtype {dtype} refused")
        shape = tuple(int(n) for n in tree["shape"])
        raw = _buffer(buffers, tree["$a"])
        if any(n < 0 for n in shape) or int(np.prod(shape)) * dtype.itemsize != len(raw):
            raise ValueError(f"wire: buffer of {len(raw)} bytes is not {dtype}{list(shape)}")
        array = np.frombuffer(raw, dtype=dtype).reshape(shape) if len(raw) \
            else np.empty(shape, dtype)
        return array[()] if tree.get("scalar") else array
    if "$b" in tree:
        return bytes(_buffer(buffers, tree["$b"]))
    if "$t" in tree:
        return tuple(_dec(v, buffers) for v in tree["$t"])
    if "$d" in tree:
        return {_hashable(_dec(k, buffers)): _dec(v, buffers) for k, v in tree["$d"]}
    if "$n" in tree:
        cls = _named_tuples().get(tree["$n"])
        if cls is None:
            raise ValueError(f"wire: named tuple {tree['$n']!r} refused")
        return cls(*[_dec(v, buffers) for v in tree["f"]])
    if "$e" in tree:
        name, msg = str(tree["$e"]), str(tree.get("msg", ""))
        cls = ERRORS.get(name)
        return cls(msg) if cls is not None else RuntimeError(f"{name}: {msg}")
    if "$o" in tree:
        cls = _optimizers().get(tree["$o"])
        kind, fields = tree["schedule"]
        schedule_cls = _schedules().get(kind)
        if cls is None or schedule_cls is None:
            raise ValueError(f"wire: optimizer {tree['$o']!r} / schedule {kind!r} refused")
        schedule = schedule_cls(**_kwargs(_dec(fields, buffers)))
        return cls(**_kwargs(_dec(tree["kw"], buffers)), schedule=schedule)
    raise ValueError(f"wire: unknown node {sorted(tree)[:3]}")


def _hashable(key):
    if isinstance(key, list):
        raise ValueError("wire: a dict key is a list")
    return key


def _kwargs(fields):
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise ValueError("wire: constructor keywords must be a dict of names")
    return fields
