"""Every benchmark script runs end to end at a tiny size (its figures are not checked here)."""
# Fashion-MNIST: tests marked ``fashion_mnist`` are skipped (conftest.py) with an install
# hint when the files are absent, so this file passes on a machine without them.
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

SMALL_ARGS = {
    "bench_kernels.py": ["--rows", "20000", "--cols", "20", "--repeat", "2"],
    "bench_mlp_optim.py": ["--small"],
    "bench_convex.py": ["--rows", "20000", "--cols", "10", "--chunks", "4"],
    "bench_estimator.py": ["--rows", "20000", "--cols", "10", "--chunks", "4", "--weighted"],
    "bench_sync_step.py": ["--rows", "20000", "--cols", "10", "--steps", "20"],
    "bench_fashion_mlp.py": ["--small", "--skip-sklearn"],
    "bench_fedavg.py": ["--small"],
    "bench_partial.py": ["--small"],
    "bench_ps.py": ["--small"],
    "bench_tls.py": ["--small", "--steps", "20", "--repeat", "1"],
    "bench_sparse.py": ["--rows", "20000", "--cols", "2000", "--repeat", "2", "--fit",
                        "--fit-rows", "5000"],
}


def test_every_benchmark_has_a_smoke_run():
    assert sorted(p.name for p in BENCH.glob("bench_*.py")) == sorted(SMALL_ARGS)


NEEDS_FASHION_MNIST = {"bench_fashion_mlp.py", "bench_fedavg.py", "bench_partial.py", "bench_ps.py"}


@pytest.mark.parametrize("script", [
    pytest.param(s, marks=pytest.mark.fashion_mnist) if s in NEEDS_FASHION_MNIST else s
    for s in sorted(SMALL_ARGS)])
def test_benchmark_smoke(script, tmp_path):
    root = str(BENCH.parent)
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(BENCH / script), *SMALL_ARGS[script]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip(), "a benchmark prints its figures"
