"""benchmarks/bench_soak.py runs end to end at its smoke size (``--small``).

The values are not judged (a shared host moves them): every check line is
printed with its figures and a PASS or FAIL, the printed figures parse as
finite numbers, and the figures recorded in ``--json`` pass the runner's
``check_figures`` (finite values, ratios with a peer) and hold every
process's start / end counts. The script starts its own LocalCluster and
closes it before it exits; the subprocess has a deadline.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_soak.py"
N = r"(nan|inf|[-+]?\d[\d,]*(?:\.\d*)?(?:e[-+]?\d+)?)"
PROCS = ("driver", "worker0", "worker1")


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soak")
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--json", str(tmp / "f.json")],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads((tmp / "f.json").read_text())


def _finite(text):
    value = float(text.replace(",", ""))
    assert math.isfinite(value), f"{text!r} is not finite"
    return value


@pytest.mark.timeout(240)
def test_check_lines_printed_with_finite_figures(soak):
    stdout, _ = soak
    for p in PROCS:
        m = re.search(rf"^  {p} RSS\s+cold start {N} MB, start {N} MB, after 100 steps {N} MB, "
                      rf"after SyncSGD {N} MB, end {N} MB, peak {N} MB, end / after 100 steps "
                      rf"{N}x \(limit 1.1x\); growth {N} MB/1000 steps, {N} MB/1000 updates: "
                      rf"(PASS|FAIL)$", stdout, re.MULTILINE)
        assert m, f"no RSS check line for {p} in:\n{stdout[-3000:]}"
        *sizes, slope_sync, slope_ps, _ = m.groups()
        assert all(_finite(g) > 0 for g in sizes)           # MB and the ratio
        _finite(slope_sync), _finite(slope_ps)               # growth may be negative
        for what in ("threads", "sockets"):
            m = re.search(rf"^  {p} {what}\s+cold start {N}, start {N}, peak {N}, after SyncSGD "
                          rf"{N}, end {N} \({N}\): (PASS|FAIL)$", stdout, re.MULTILINE)
            assert m, f"no {what} check line for {p} in:\n{stdout[-3000:]}"
            cold, start, peak, _, end, diff = map(_finite, m.groups()[:-1])
            assert cold > 0 and start > 0 and peak >= max(start, end)
            assert diff == end - start
    m = re.search(rf"^  scheduler tasks\s+cold start {N}, start {N}, peak {N}, after SyncSGD "
                  rf"{N}, end {N} \({N}\): (PASS|FAIL)$", stdout, re.MULTILINE)
    assert m, f"no scheduler tasks check line in:\n{stdout[-3000:]}"
    assert _finite(m.group(2)) >= 128            # 64 partitions: X and y futures each
    m = re.search(rf"^  scheduler tasks, no gc\s+start {N}, end before any gc.collect\(\) {N} "
                  rf"\({N}\): (PASS|FAIL)$", stdout, re.MULTILINE)
    assert m, f"no scheduler tasks (no gc) check line in:\n{stdout[-3000:]}"
    assert all(math.isfinite(_finite(g)) for g in m.groups()[:-1])
    for pattern in (rf"SyncSGD: 200 steps in {N} s \({N} ms/step\), final loss {N}",
                    rf"parameter server: 1000 updates in {N} s \({N} updates/s\), "
                    rf"final loss {N}",
                    rf"soak wall time {N} s; all checks: (PASS|FAIL)"):
        m = re.search(pattern, stdout)
        assert m, f"no line matching {pattern!r} in:\n{stdout[-3000:]}"
        for g in m.groups():
            if g not in ("PASS", "FAIL"):
                assert _finite(g) > 0


@pytest.mark.timeout(240)
def test_recorded_figures_complete_and_finite(soak):
    sys.path.insert(0, str(ROOT))
    from benchmarks.runner import check_figures

    _, recorded = soak
    figures = recorded["figures"]
    assert check_figures(figures) == []
    names = {f["name"]: f["value"] for f in figures}
    for p in PROCS:
        for name in (f"{p} RSS after 100 steps", f"{p} RSS at end", f"{p} RSS growth, SyncSGD",
                     f"{p} RSS end / after 100 steps", f"{p} threads at start",
                     f"{p} threads at end", f"{p} sockets at start", f"{p} sockets at end"):
            assert name in names, f"{name!r} not recorded"
            assert math.isfinite(names[name])
    for name in ("scheduler tasks at start", "scheduler tasks at end",
                 "scheduler tasks at end, no gc", "SyncSGD step",
                 "parameter-server updates/s", "soak wall time"):
        assert name in names and math.isfinite(names[name])
    assert isinstance(recorded["passed"], bool)
    # the samples cover both phases, the reference step included
    phases = {s["phase"] for s in recorded["samples"]}
    assert {"start", "sync", "ps", "end"} <= phases
    assert any(s["phase"] == "sync" and s["step"] == 100 for s in recorded["samples"])
