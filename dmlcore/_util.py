"""Small helpers shared across modules (no dmlcore imports here)."""
from __future__ import annotations


def is_dask(a) -> bool:
    """Whether ``a`` is a ``dask.array.Array``."""
    import dask.array as da

    return isinstance(a, da.Array)


def one_blas_thread(user_api=None):
    """threadpoolctl's limit to one thread (``user_api``: e.g. "blas"; None: all
    pools), scipy's BLAS loaded first: the MLP kernels (``cython_blas``) and
    L-BFGS-B call scipy's OpenBLAS, a library apart from numpy's, and a limit
    covers only the libraries loaded when it is set."""
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api=user_api)


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type name when it has none."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__
