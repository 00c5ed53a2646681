"""Finding or starting the Dask cluster, and per-worker set-up.

``open_client(address, tls=..., timeout=...)`` is the one place a client is
created: for a scheduler address (TLS through ``security``) or, without
one, on an embedded ``LocalCluster`` bound to 127.0.0.1; it returns
``(client, close)`` and reports bad input as ``ClusterError`` (one line).
``get_client(client)``: an explicit client is used as is; ``None`` takes the
current default client or, when there is none, opens an embedded cluster.
``KernelThreads`` is a WorkerPlugin that limits BLAS/OpenMP to one thread per
worker thread (the cluster parallelises across partitions) and imports the
compiled core once.
"""
from __future__ import annotations

import os

from distributed import Client, LocalCluster, Security
from distributed.diagnostics.plugin import WorkerPlugin

from ._util import first_line, one_blas_thread
from .recovery import looks_lost


class ClusterError(ValueError):
    """Bad cluster input (address, certificates, no workers): ``str(exc)`` is the one line."""


class KernelThreads(WorkerPlugin):
    """One BLAS thread per kernel on every worker; warm import of the compiled core."""

    name = "dmlcore-kernel-threads"
    idempotent = True           # registered once per scheduler (it has no settings)

    def setup(self, worker):
        import dmlcore._ext.loss  # noqa: F401  (warm imports)
        import dmlcore._ext.mlp  # noqa: F401

        self._limits = one_blas_thread()


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
    return Security(tls_ca_file=str(tls["ca_file"]), tls_client_cert=str(tls["cert"]),
                    tls_client_key=str(tls["key"]), require_encryption=True)


def prepare(client):
    """Register the per-worker set-up on ``client``'s workers, once per scheduler.
    A worker that dies while the plugin is sent to it does not fail this: the
    scheduler keeps the plugin for every live and future worker."""
    try:
        client.register_plugin(KernelThreads(), name=KernelThreads.name)
    except Exception as exc:
        if not looks_lost(exc):
            raise
    return client


def open_client(address=None, *, tls=None, timeout=5.0, local=None, set_as_default=True,
                wait_for_workers=False):
    """``(client, close)``: a client of the scheduler at ``address``, else of a new
    embedded cluster (``local_cluster(**local)``) that ``close`` shuts down too.

    ``tls``: ``{ca_file, cert, key}`` for a ``tls://`` address. ``timeout``
    (seconds) bounds the connection and, with ``wait_for_workers``, the wait
    for a first worker. A bad TLS configuration, an unreachable scheduler or
    one without workers is a ``ClusterError`` naming it in one line.
    """
    if not address:
        cluster = local_cluster(**(local or {}))
        client = Client(cluster, set_as_default=set_as_default)

        def close():
            client.close()
            cluster.close()

        return client, close
    try:
        sec = security(address, tls)
    except ValueError as exc:
        raise ClusterError(str(exc)) from None
    try:
        client = Client(address, timeout=timeout, set_as_default=set_as_default, security=sec)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address} within "
                           f"{timeout:g} s: {first_line(exc)}") from None
    if wait_for_workers:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, OSError):
            client.close()
            raise ClusterError(f"the Dask scheduler at {address} has no workers "
                               f"(waited {timeout:g} s)") from None
    return client, client.close


def get_client(client=None):
    """``(client, close)``: the given or default client, or a new embedded cluster."""
    if client is not None:
        return prepare(client), lambda: None
    try:
        from distributed import default_client

        return prepare(default_client()), lambda: None
    except ValueError:
        pass
    new, close = open_client()
    return prepare(new), close
