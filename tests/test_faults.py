"""Faults on the data plane end the fit with an error naming the worker; never a hang.

Each fit runs in a fresh process (``tests/faulty.py``) under a hard timeout,
on a 2-process LocalCluster with ``timeout=5``: a worker whose step raises
MemoryError (the fit raises it within 5 s), and a SIGSTOPped worker (the fit
raises within timeout + 5 s), for the replicated path, the driver path,
L-BFGS and the parameter server's worker loops.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 5.0


def run_fault(action, apply_on, optimizer):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "faulty.py"), action, apply_on,
                           optimizer], env=env, cwd=HERE, capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(lines[-1])


CASES = [("workers", "sgd"), ("driver", "sgd"), ("driver", "lbfgs"), ("workers", "ps")]


@pytest.mark.parametrize("apply_on,optimizer", [     # the first case stays in the quick subset
    pytest.param(*case, marks=() if case == CASES[0] else pytest.mark.slow) for case in CASES])
def test_a_worker_raising_ends_the_fit_with_its_error(apply_on, optimizer):
    out = run_fault("raise", apply_on, optimizer)
    assert out["type"] == "MemoryError", out
    assert "injected" in out["message"] and out["victim"] in out["message"], out
    assert out["seconds"] < 5.0, out


@pytest.mark.slow
@pytest.mark.parametrize("apply_on,optimizer", CASES)
def test_a_frozen_worker_ends_the_fit_after_the_deadline(apply_on, optimizer):
    out = run_fault("stop", apply_on, optimizer)
    assert out["type"] == "DataPlaneTimeout", out
    assert out["victim"] in out["message"], out
    assert out["seconds"] < TIMEOUT + 5.0, out
