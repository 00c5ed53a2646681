"""Finding or starting the Dask cluster, and per-worker set-up.

``get_client(client)``: an explicit client is used as is; ``None`` takes the
current default client or, when there is none, starts an embedded
``LocalCluster`` bound to 127.0.0.1 that the caller closes with the returned
``close``.
``KernelThreads`` is a WorkerPlugin that limits BLAS/OpenMP to one thread per
worker thread (the cluster parallelises across partitions) and imports the
compiled core once.
"""
from __future__ import annotations

import os

from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin


class KernelThreads(WorkerPlugin):
    """One BLAS thread per kernel on every worker; warm import of the compiled core."""

    name = "dmlcore-kernel-threads"

    def setup(self, worker):
        from threadpoolctl import threadpool_limits

        import dmlcore._ext.loss  # noqa: F401  (warm import)

        self._limits = threadpool_limits(limits=1)


def local_cluster(n_workers=None, threads_per_worker=1, host="127.0.0.1", **kwargs):
    """An embedded LocalCluster with one-thread workers (default: one per core, at most 8).

    The scheduler, the workers and the dashboard listen on ``host`` only
    (default 127.0.0.1: nothing is reachable from another machine); the
    dashboard on a free port of that host unless ``dashboard_address`` is given.
    """
    if n_workers is None:
        n_workers = max(1, min(os.cpu_count() or 1, 8))
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"host: expected an interface address such as '127.0.0.1', got {host!r}")
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    kwargs.setdefault("dashboard_address", f"{bracketed}:0")
    kwargs.setdefault("processes", True)
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, host=host,
                        env=env, **kwargs)


def prepare(client):
    """Register the per-worker set-up on ``client``'s workers (idempotent)."""
    client.register_plugin(KernelThreads(), name=KernelThreads.name)
    return client


def get_client(client=None):
    """``(client, close)``: the given or default client, or a new embedded cluster."""
    if client is not None:
        return prepare(client), lambda: None
    try:
        from distributed import default_client

        return prepare(default_client()), lambda: None
    except ValueError:
        pass
    cluster = local_cluster()
    new = Client(cluster)

    def close():
        new.close()
        cluster.close()

    return prepare(new), close
