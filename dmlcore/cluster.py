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


TLS_KEYS = ("ca_file", "cert", "key")


def security(address, tls=None):
    """``distributed.Security`` for ``address`` from ``tls = {ca_file, cert, key}``, or None.

    A ``tls://`` address without the three files, or files with a plain
    address, is a ValueError naming what to give.
    """
    tls = {k: v for k, v in (tls or {}).items() if v is not None}
    is_tls = str(address or "").startswith("tls://")
    if not tls:
        if is_tls:
            raise ValueError(f"{address} is a TLS scheduler: give cluster.tls: {{ca_file, cert, "
                             f"key}} or --tls-ca-file, --tls-cert and --tls-key")
        return None
    missing = [k for k in TLS_KEYS if not tls.get(k)]
    if missing:
        raise ValueError(f"TLS needs ca_file, cert and key; missing {', '.join(missing)}")
    if address and not is_tls:
        raise ValueError(f"certificates were given but the scheduler address {address} is not "
                         f"tls://")
    from distributed import Security

    return Security(tls_ca_file=str(tls["ca_file"]), tls_client_cert=str(tls["cert"]),
                    tls_client_key=str(tls["key"]), require_encryption=True)


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
