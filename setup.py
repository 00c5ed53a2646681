"""Build the compiled core: every ``src_ext/<name>.pyx`` becomes ``dmlcore._ext.<name>``.

BLAS comes from ``scipy.linalg.cython_blas`` (no other native dependency); the
Cython sources may include the C helpers in ``src_ext/*.h``.
"""
import os
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
SOURCES = sorted((HERE / "src_ext").glob("*.pyx"))
# DMLCORE_BUILD_ONLY=loss,mlp builds just those modules (parallel development).
_only = os.environ.get("DMLCORE_BUILD_ONLY")
if _only:
    SOURCES = [p for p in SOURCES if p.stem in _only.split(",")]

extensions = [
    Extension(
        f"dmlcore._ext.{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        depends=[str(h.relative_to(HERE)) for h in (HERE / "src_ext").glob("*.h")],
        include_dirs=[np.get_include(), "src_ext"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
        extra_compile_args=["-O3", "-fno-math-errno"],
    )
    for pyx in SOURCES
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
