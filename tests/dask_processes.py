"""Real `dask scheduler` / `dask worker` processes for the tests that need them."""
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path


class DaskProcesses:
    """A `dask scheduler` and single-threaded `dask worker` processes, each logging
    to ``logdir/<name>.log``; ``close`` ends them all (SIGTERM, then SIGKILL
    after 5 s: a survivor's graceful close can hang).
    ``scheduler_args``/``worker_args`` are appended to the commands (e.g.
    ``--protocol tls --tls-cert ...``, ``--no-nanny``)."""

    def __init__(self, logdir, scheduler_host="127.0.0.1", memory_limit="2GiB", env=None,
                 scheduler_args=(), worker_args=()):
        self.logdir, self.env = Path(logdir), env
        self.scheduler_host, self.memory_limit = scheduler_host, memory_limit
        self.scheduler_args, self.worker_args = list(scheduler_args), list(worker_args)
        self.procs, self.address, self.n_workers = [], None, 0

    def _start(self, cmd, name):
        log = open(self.logdir / f"{name}.log", "ab")   # O_APPEND: readers never move it
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env, cwd=self.logdir)
        self.procs.append((proc, log))
        return proc

    def start_scheduler(self):
        """Start the scheduler; its address once it has written it (90 s at most)."""
        info = self.logdir / "scheduler.json"
        self._start([_dask(), "scheduler", "--host", self.scheduler_host, "--port", "0",
                     "--dashboard-address", ":0", "--scheduler-file", str(info),
                     *self.scheduler_args], "scheduler")
        deadline = time.time() + 90
        while self.address is None and time.time() < deadline:
            try:
                self.address = json.loads(info.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.2)
        assert self.address, "the dask scheduler did not start"
        return self.address

    def start_worker(self, prefix=(), host=None):
        """One more worker (``prefix``: e.g. ``["ip", "netns", "exec", ns]``)."""
        i, self.n_workers = self.n_workers, self.n_workers + 1
        return self._start([*prefix, _dask(), "worker", self.address, "--nthreads", "1",
                            "--nworkers", "1", "--memory-limit", self.memory_limit,
                            "--no-dashboard", "--name", f"w{i}",
                            *(["--host", host] if host else []), *self.worker_args],
                           f"worker{i}")

    def close(self, grace=5.0):
        """The workers first, then the scheduler (the first process started: a
        worker whose scheduler dies while it closes can hang in its shutdown);
        each group gets SIGTERM and ``grace`` seconds in all, then SIGKILL."""
        procs, self.procs = self.procs, []
        for group in (procs[1:], procs[:1]):
            for proc, _ in group:
                proc.terminate()
            deadline = time.monotonic() + grace
            for proc, log in group:
                try:
                    proc.wait(timeout=max(0.01, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()


def _dask():
    return str(Path(sys.executable).parent / "dask")


@contextlib.contextmanager
def dask_processes(logdir, workers, security=None, **options):
    """``DaskProcesses(logdir, **options)`` with its scheduler and one worker per
    entry of ``workers`` (``(command prefix, host or None)``), yielded once every
    worker has joined (``security``: the ``distributed.Security`` of that check);
    all ended on exit."""
    procs = DaskProcesses(logdir, **options)
    try:
        procs.start_scheduler()
        for prefix, host in workers:
            procs.start_worker(prefix, host)
        from distributed import Client

        with Client(procs.address, timeout=30, security=security) as client:
            client.wait_for_workers(len(workers), timeout=60)
        yield procs
    finally:
        procs.close()


@contextlib.contextmanager
def dask_cluster(logdir, workers, **options):
    """The scheduler's address of ``dask_processes(logdir, workers, **options)``:
    e.g. ``workers=[(["ip", "netns", "exec", ns], "10.0.0.2")]``."""
    with dask_processes(logdir, workers, **options) as procs:
        yield procs.address
