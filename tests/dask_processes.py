"""Real `dask scheduler` / `dask worker` processes for the tests that need them."""
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path


@contextlib.contextmanager
def dask_cluster(logdir, workers, scheduler_host="127.0.0.1", memory_limit="2GiB", env=None,
                 scheduler_args=(), worker_args=(), security=None):
    """Start a `dask scheduler` on ``scheduler_host`` and one single-threaded
    `dask worker` per entry of ``workers``: ``(command prefix, host or None)``,
    e.g. ``(["ip", "netns", "exec", ns], "10.0.0.2")``. Yields the scheduler's
    address once every worker has joined; terminates them all on exit. Each
    process logs to ``logdir/<name>.log``. ``scheduler_args``/``worker_args``
    are appended to the commands (e.g. ``--protocol tls --tls-cert ...``);
    ``security`` is the ``distributed.Security`` of the readiness check."""
    bindir = Path(sys.executable).parent
    procs = []

    def start(cmd, name):
        log = open(Path(logdir) / f"{name}.log", "ab")   # O_APPEND: readers never move it
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=logdir), log))

    try:
        info = Path(logdir) / "scheduler.json"
        start([str(bindir / "dask"), "scheduler", "--host", scheduler_host, "--port", "0",
               "--dashboard-address", ":0", "--scheduler-file", str(info), *scheduler_args],
              "scheduler")
        address, deadline = None, time.time() + 90
        while address is None and time.time() < deadline:
            try:
                address = json.loads(info.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.2)
        assert address, "the dask scheduler did not start"
        for i, (prefix, host) in enumerate(workers):
            start([*prefix, str(bindir / "dask"), "worker", address, "--nthreads", "1",
                   "--nworkers", "1", "--memory-limit", memory_limit, "--no-dashboard",
                   "--name", f"w{i}", *(["--host", host] if host else []), *worker_args],
                  f"worker{i}")
        from distributed import Client

        with Client(address, timeout=30, security=security) as client:
            client.wait_for_workers(len(workers), timeout=60)
        yield address
    finally:
        for proc, _ in reversed(procs):
            proc.terminate()
        for proc, log in reversed(procs):
            try:
                proc.wait(timeout=5)    # a graceful close can hang on a dead peer
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
