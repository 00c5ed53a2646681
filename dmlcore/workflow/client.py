"""The client a run uses: ``cluster.open_client`` for the run's cluster section.

``open_client(spec, address, say)`` is a context manager yielding a client
of ``address`` (else ``cluster.address``; it waits ``cluster.timeout`` for a
first worker), or of an embedded LocalCluster (``cluster.local``), which it
closes at the end. Bad addresses and certificates are ``WorkflowError``.
"""
from __future__ import annotations

from contextlib import contextmanager

from .parse import WorkflowError


@contextmanager
def open_client(spec, address=None, say=print):
    """A client for ``address`` (or ``cluster.address``), else an embedded LocalCluster."""
    from .. import cluster   # distributed: imported when a run starts

    address = address or spec.cluster.get("address")
    try:
        client, close = cluster.open_client(
            address, tls=spec.cluster.get("tls"), timeout=spec.cluster.get("timeout", 5.0),
            local=spec.cluster.get("local", {}), set_as_default=True, wait_for_workers=True)
    except cluster.ClusterError as exc:
        raise WorkflowError(str(exc)) from None
    try:
        say(f"dashboard: {client.dashboard_link}")
        yield client
    finally:
        close()
