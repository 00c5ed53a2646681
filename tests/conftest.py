"""Shared pytest fixtures.

``client``: one 2-worker, process-based ``LocalCluster`` for the whole session
(1 thread per worker, no dashboard), closed at teardown. Tests that use it
must not restart or close it and should drop their futures when done.
"""
import pytest


@pytest.fixture(scope="session")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
