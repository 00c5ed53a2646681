"""dmlcore's benchmarks: ``bench_*.py`` scripts (each runnable alone) and the runner
(``python -m benchmarks``, see ``benchmarks/runner.py``)."""
