"""Tree reduction of per-partition results, and the pure sums it combines.

A partial result is a tuple of numbers and flat vectors, each a SUM over rows
(e.g. ``(loss_sum, grad_sum, n_rows)``); combining two partials adds them
element-wise, so any tree shape gives the same answer up to rounding.
``tree_reduce`` combines ``fan_in`` partials per task, preferring partials
that live on the same worker, so only one partial per worker crosses the
network at the first level.
"""
from __future__ import annotations

import numpy as np


def add_partials(*partials):
    """Element-wise sum of tuples ``(scalar or vector, ...)``; vectors are not mutated.
    The result has the first partial's type (a NamedTuple stays one)."""
    first = partials[0]
    out = [np.array(v, copy=True) if isinstance(v, np.ndarray) else v for v in first]
    for partial in partials[1:]:
        for i, value in enumerate(partial):
            if isinstance(out[i], np.ndarray):
                out[i] += value
            else:
                out[i] = out[i] + value
    return type(first)(*out) if hasattr(first, "_fields") else tuple(out)


def tree_reduce(client, futures, fan_in=4, combine=add_partials, workers=None):
    """Reduce ``futures`` to one future with a tree of ``combine`` tasks of fan-in ``fan_in``.

    ``workers`` (optional, one address per future) groups siblings by worker so
    the first level runs where the partials already are. One future in, the
    same future out.
    """
    if fan_in < 2:
        raise ValueError(f"fan_in must be >= 2, got {fan_in}")
    level = list(futures)
    if not level:
        raise ValueError("tree_reduce: nothing to reduce")
    if workers is not None:
        order = sorted(range(len(level)), key=lambda i: workers[i])
        level = [level[i] for i in order]
        places = [workers[i] for i in order]
    else:
        places = [None] * len(level)
    while len(level) > 1:
        next_level, next_places = [], []
        for start in range(0, len(level), fan_in):
            group = level[start:start + fan_in]
            where = places[start]
            if len(group) == 1:
                next_level.append(group[0])
            else:
                placement = {"workers": [where], "allow_other_workers": True} if where else {}
                next_level.append(client.submit(combine, *group, pure=False, **placement))
            next_places.append(where)
        level, places = next_level, next_places
    return level[0]
