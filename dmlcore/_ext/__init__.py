"""Compiled kernels built from ``src_ext/*.pyx`` (see setup.py).

Modules: ``loss`` (fused loss+gradient for squared, logistic, softmax),
``mlp`` (dense forward/backward on BLAS), ``reduce`` (flat-vector reductions),
``optim`` (in-place optimizer updates).
"""
MODULES = ("loss", "mlp", "reduce", "optim")
