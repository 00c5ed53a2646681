"""Small helpers shared across modules (no dmlcore imports here)."""
from __future__ import annotations


def is_dask(a) -> bool:
    """Whether ``a`` is a ``dask.array.Array``."""
    import dask.array as da

    return isinstance(a, da.Array)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type name when it has none."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__
