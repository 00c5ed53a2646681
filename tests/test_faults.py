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
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 5.0
PARALLEL = 3


def _start(action, apply_on, optimizer):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "faulty.py"), action,
                             apply_on, optimizer], env=env, cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _result(proc, deadline):
    """The JSON line ``faulty.py`` printed; the process is killed past ``deadline``."""
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate(timeout=30)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (rc {proc.returncode}): {stderr[-2000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def fault_runs(request):
    """The selected cases' fits, PARALLEL at a time, each in its own process.

    Every fit waits mostly on its deadline, so running a few side by side
    shortens the module without changing what each one measures (the seconds
    are taken inside its own process). Each is killed after 120 s.
    """
    here = request.module.__name__
    cases = []
    for item in request.session.items:
        if item.module.__name__ == here and hasattr(item, "callspec"):
            p = item.callspec.params
            case = (ACTIONS[item.originalname], p["apply_on"], p["optimizer"])
            if case not in cases:
                cases.append(case)
    results, running, pending = {}, [], list(cases)
    try:
        while pending or running:
            while pending and len(running) < PARALLEL:
                case = pending.pop(0)
                running.append((case, _start(*case), time.monotonic() + 120))
            case, proc, deadline = running.pop(0)
            results[case] = _result(proc, deadline)
    finally:
        for _, proc, _ in running:
            proc.kill()
            proc.communicate(timeout=30)
    return results


ACTIONS = {"test_a_worker_raising_ends_the_fit_with_its_error": "raise",
           "test_a_frozen_worker_ends_the_fit_after_the_deadline": "stop"}
CASES = [("workers", "sgd"), ("driver", "sgd"), ("driver", "lbfgs"), ("workers", "ps")]


@pytest.mark.parametrize("apply_on,optimizer", [     # the first case stays in the quick subset
    pytest.param(*case, marks=() if case == CASES[0] else pytest.mark.slow) for case in CASES])
def test_a_worker_raising_ends_the_fit_with_its_error(fault_runs, apply_on, optimizer):
    out = fault_runs["raise", apply_on, optimizer]
    assert out["type"] == "MemoryError", out
    assert "injected" in out["message"] and out["victim"] in out["message"], out
    assert out["seconds"] < 5.0, out


@pytest.mark.slow
@pytest.mark.parametrize("apply_on,optimizer", CASES)
def test_a_frozen_worker_ends_the_fit_after_the_deadline(fault_runs, apply_on, optimizer):
    out = fault_runs["stop", apply_on, optimizer]
    assert out["type"] == "DataPlaneTimeout", out
    assert out["victim"] in out["message"], out
    assert out["seconds"] < TIMEOUT + 5.0, out
