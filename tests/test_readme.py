"""The README works as written: its Python blocks run as scripts, its offline shell lines run.

Each block runs in a subprocess under a hard timeout, in a temporary directory
holding a copy of ``workflows/``. Where a block would train for minutes, the
test substitutes a smaller size (``SMALL``/``SMALL_SETS``); every substitution
must match the README exactly once, so the README and this test cannot drift.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FASHION_MNIST_SKIP, fashion_mnist_available

# Without the Fashion-MNIST files these tests are skipped, the reason saying how to install them.
NEEDS_FASHION_MNIST_FILES = pytest.mark.skipif(not fashion_mnist_available(),
                                               reason=FASHION_MNIST_SKIP)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M)
PYTHON_BLOCKS = [code for lang, code in BLOCKS if lang == "python"]

# text in a Python block -> what the test runs instead (a smaller size)
SMALL = {
    'X, y = dml.datasets.fashion_mnist("train")\n':
        'X, y = dml.datasets.fashion_mnist("train")\n    X, y = X[:3000], y[:3000]\n',
    "epochs=5,": "epochs=1,",
}
# extra --set options for `dmlcore run` lines of the README (small sizes)
SMALL_SETS = {
    "workflows/quickstart.yaml": ["data.source.synthetic.n_samples=4000",
                                  "data.test.split=500", "train.steps=20",
                                  "train.eval_every=10"],
    "workflows/fashion_mnist_sync.yaml": ["data.max_rows=3000", "data.partitions=4",
                                          "train.eval_every=20", "train.checkpoint_every=20",
                                          "cluster.local.n_workers=1"],
}
# shell lines that need more than this machine (a network, a second machine)
NOT_OFFLINE = ("pip install", "dask scheduler", "dask worker", "--scheduler tcp://HOST")


def _env():
    return dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _workdir(tmp_path):
    shutil.copytree(ROOT / "workflows", tmp_path / "workflows")
    return tmp_path


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(PYTHON_BLOCKS) == 1
    for old in SMALL:
        assert sum(code.count(old) for code in PYTHON_BLOCKS) == 1, old


@pytest.mark.slow
@NEEDS_FASHION_MNIST_FILES
@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_a_script(index, tmp_path):
    code = PYTHON_BLOCKS[index]
    for old, new in SMALL.items():
        code = code.replace(old, new)
    script = _workdir(tmp_path) / "block.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nanny failed" not in proc.stderr
    assert "eval_accuracy" in proc.stdout


def _shell_lines():
    lines = []
    for lang, code in BLOCKS:
        if lang:
            continue
        for line in code.splitlines():
            for part in line.split("&&"):
                part = part.split("#")[0].strip()
                if part.startswith((".venv/bin/dmlcore", "dmlcore")) and not any(
                        bad in part for bad in NOT_OFFLINE):
                    lines.append(part)
    return lines


def test_shell_lines_are_found():
    commands = {shlex.split(line)[1] for line in _shell_lines()}
    assert commands == {"run", "validate", "predict", "info"}


def _command(line, workdir):
    args = shlex.split(line.replace("[--proba]", ""))[1:]
    if args[0] == "run":
        args += [a for s in SMALL_SETS[args[1]] for a in ("--set", s)] + ["--no-progress"]
    if args[0] == "predict":
        np.save(workdir / "X.npy", np.random.default_rng(0).random((50, 784), np.float32))
    return [sys.executable, "-m", "dmlcore.cli", *args]


@pytest.mark.slow
@NEEDS_FASHION_MNIST_FILES
def test_shell_lines_run_offline(tmp_path):
    workdir = _workdir(tmp_path)
    for line in _shell_lines():
        proc = subprocess.run(_command(line, workdir), cwd=workdir, env=_env(),
                              capture_output=True, text=True, timeout=280)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    labels = np.load(workdir / "labels.npy")
    assert labels.shape == (50,) and set(labels) <= set(range(10))
    assert (workdir / "runs" / "quickstart" / "metrics.json").exists()
