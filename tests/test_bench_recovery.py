"""benchmarks/bench_recovery.py runs end to end at its smoke size (``--small``).

The values are not judged (speed lives in the benchmark): each part prints
its line with finite figures, a killed SyncSGD worker is detected and
recovered from with the parameters bit-identical, and the figures returned
pass the runner's ``check_figures``. The script starts real dask processes
and ends them; the subprocess has a deadline and its process group is
killed past it.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_recovery.py"
N = r"(nan|inf|[-+]?\d[\d,]*(?:\.\d*)?(?:e[-+]?\d+)?)"


def _run(tmp_path, *args, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--small", "--json", str(out), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return stdout, json.loads(out.read_text())


def _finite(text):
    value = float(text)
    assert math.isfinite(value), f"{text!r} is not finite"
    return value


def test_a_killed_sync_worker_is_recovered_from(tmp_path):
    stdout, results = _run(tmp_path, "--parts", "sync", "--sync-cases", "replicas")
    m = re.search(rf"^sync replicas\s*: undisturbed\s+{N} s, killed\s+{N} s \({N}x\); detect "
                  rf"{N} s, recover {N} s; bit-identical True; test acc {N} / {N}$",
                  stdout, re.MULTILINE)
    assert m, stdout[-3000:]
    assert all(_finite(g) >= 0 for g in m.groups())
    row = results["sync"]["replicas"]
    assert row["killed"] and row["events"] == 1 and row["identical"]


@pytest.mark.slow
def test_fedavg_ps_and_elastic_parts_print_their_figures(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.runner import check_figures

    stdout, results = _run(tmp_path, "--parts", "fedavg,ps,elastic", timeout=400)
    for pattern in (rf"^fedavg: test acc undisturbed {N}, killed {N}; client updates dropped "
                    rf"{N}; detect {N} s$",
                    rf"^parameter server: test acc undisturbed {N}, server killed at update "
                    rf"{N}: {N} \(restarted from update {N}, {N} updates lost\)$",
                    rf"^elastic SyncSGD: epoch {N} s on 2 workers, {N} s after a third joined",
                    rf"^elastic parameter server: {N} updates/s on 2 workers, {N} after a third "
                    rf"joined \(loops moved: True\)$"):
        m = re.search(pattern, stdout, re.MULTILINE)
        assert m, f"{pattern} not in:\n{stdout[-3000:]}"
        assert all(_finite(g) >= 0 for g in m.groups())
    assert results["ps"]["restarted"] == 1
    assert results["fedavg"]["dropped"] > 0
    assert results["elastic"]["sync"]["events"] == ["partitions regrouped over the live workers"]
    assert check_figures(results["figures"]) == []
