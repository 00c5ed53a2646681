"""Compiled kernels built from ``src_ext/*.pyx`` (see setup.py).

Modules: ``loss`` (fused loss+gradient for squared, logistic, softmax),
``mlp`` (dense forward/backward on BLAS), ``optim`` (in-place optimizer
updates). Partial sums are added with NumPy (``aggregate.add_partials``).

A kernel module that cannot be found raises an ImportError saying why: most
often Python imported this folder from a source checkout (the current
directory is first on ``sys.path``) while the compiled modules live in the
installed copy, or the extensions were never built in place.
"""
from pathlib import Path

MODULES = ("loss", "mlp", "optim")


def __getattr__(name):
    # ``from dmlcore._ext import loss`` asks for the attribute before importing the
    # submodule (hasattr), so import it here; only a missing module gets the hint.
    if name in MODULES:
        import importlib

        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
        here = Path(__file__).resolve().parent
        raise ImportError(
            f"cannot import name {name!r} from 'dmlcore._ext': the compiled kernel "
            f"dmlcore._ext.{name} is not in {here}. If that is a source checkout (Python "
            "puts the current directory first on sys.path, so it shadows an installed "
            "dmlcore), run from another directory, or build the kernels in place with "
            "`pip install -e .` (or `python setup.py build_ext --inplace`).",
            name=name)
    raise AttributeError(f"module 'dmlcore._ext' has no attribute {name!r}")
