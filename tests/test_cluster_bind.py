"""The embedded LocalCluster listens on 127.0.0.1 only, dashboard included."""
from urllib.parse import urlparse

import pytest
from distributed import Client

from dmlcore.cluster import local_cluster


def _bound_hosts(cluster):
    sched = cluster.scheduler
    hosts = {urlparse(a).hostname for a in sched.listen_address.split(",")} if isinstance(
        sched.listen_address, str) else set()
    hosts |= {urlparse(addr).hostname for addr in sched.workers}
    server = sched.http_server
    hosts |= {sock.getsockname()[0] for sock in server._sockets.values()}
    return hosts


@pytest.mark.parametrize("host", [None, "127.0.0.1"])
def test_embedded_cluster_binds_loopback(host):
    kwargs = {} if host is None else {"host": host}
    with local_cluster(n_workers=1, **kwargs) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        assert _bound_hosts(cluster) == {"127.0.0.1"}
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"
        port = cluster.scheduler.http_server.port
        assert urlparse(client.dashboard_link).port == port


def test_bad_host():
    with pytest.raises(ValueError, match="host"):
        local_cluster(n_workers=1, host="")
