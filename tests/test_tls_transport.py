"""The data plane on a TLS cluster: the channel and the mesh run under the
standard library's ``ssl`` with the cluster's certificates, nothing travels in
clear, and SyncSGD keeps its direct path (same bits as the actor calls)."""
import logging
import shutil
import socket
import threading

import numpy as np
import pytest

from dmlcore.channel import Channel, ChannelServer, PeerLost, PeerMesh
from test_channel import Target, connect_all, run_all
from tls_certs import cluster_security, tls_local_cluster

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def security(tmp_path_factory):
    return cluster_security(tmp_path_factory.mktemp("tls-certs"))


def _contexts(security, role):
    return (security.get_listen_args(role)["ssl_context"],
            security.get_connection_args(role)["ssl_context"])


class _Relay:
    """A TCP relay between a client and ``address``, recording every byte."""

    def __init__(self, address):
        self.seen = bytearray()
        self._upstream = address
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = ("127.0.0.1", self._listener.getsockname()[1], address[2])
        threading.Thread(target=self._serve, daemon=True).start()

    def _pipe(self, a, b):
        try:
            while data := a.recv(1 << 16):
                self.seen += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve(self):
        down, _ = self._listener.accept()
        up = socket.create_connection(self._upstream[:2])
        threading.Thread(target=self._pipe, args=(down, up), daemon=True).start()
        self._pipe(up, down)


def test_channel_over_tls_carries_nothing_in_clear(security):
    server_ctx, _ = _contexts(security, "worker")
    _, client_ctx = _contexts(security, "client")
    server = ChannelServer(Target(), "127.0.0.1", ssl_context=server_ctx)
    relay = _Relay(server.address)
    channel = Channel(relay.address, ssl_context=client_ctx, timeout=10)
    marker = np.frombuffer(b"PARAMETERS-IN-CLEAR!" * 5000, dtype=np.uint8).copy()
    try:
        a, back = channel.submit("pair", np.zeros(3), marker).result()
        np.testing.assert_array_equal(back, marker[::-1])
        assert channel.submit("double", 21).result() == 42
    finally:
        channel.close()
    assert len(relay.seen) > 2 * marker.nbytes            # the payload went through the relay
    assert b"PARAMETERS-IN-CLEAR!" not in relay.seen
    assert b"!RAELC-NI-SRETEMARAP" not in relay.seen      # nor the reversed reply
    assert server.token not in relay.seen


def test_tls_server_refuses_a_plain_connection_and_a_foreign_certificate(security, tmp_path):
    server_ctx, _ = _contexts(security, "worker")
    server = ChannelServer(Target(), "127.0.0.1", ssl_context=server_ctx, accept_timeout=20)
    with pytest.raises((PeerLost, ConnectionError, OSError)):
        plain = Channel(server.address, timeout=5)        # the token in clear: not served
        plain.submit("double", 1).result()
    other = cluster_security(tmp_path)                   # another CA
    with pytest.raises((PeerLost, ConnectionError, OSError)):
        foreign = Channel(server.address, ssl_context=_contexts(other, "client")[1], timeout=5)
        foreign.submit("double", 1).result()
    good = Channel(server.address, ssl_context=_contexts(security, "client")[1], timeout=5)
    try:
        assert good.submit("double", 2).result() == 4      # still serving the right client
    finally:
        good.close()


def test_tls_mesh_exchanges_in_lockstep(security):
    """Many rounds of small and 280 KB messages over non-blocking TLS sockets:
    every read and write that must wait for a TLS record (SSLWantRead/Write)
    waits and resumes; a regression fails with PeerLost or times out in 5 s."""
    contexts = _contexts(security, "worker")
    meshes = [PeerMesh("127.0.0.1", timeout=5, ssl_contexts=contexts) for _ in range(3)]
    connect_all(meshes)
    errors, results = [], [[] for _ in range(3)]

    def run(i):
        try:
            for r in range(40):
                n = [7, 70_001, 3][(i + r) % 3]
                got = meshes[i].exchange(np.full(n, 10 * r + i, np.float32))
                results[i].append([float(g[0]) for g in got])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for i in range(3):
            assert results[i] == [[10.0 * r, 10.0 * r + 1, 10.0 * r + 2] for r in range(40)]
    finally:
        for m in meshes:
            m.close()


def test_a_tls_mesh_on_one_host_sends_its_arrays_through_lanes(security):
    """Executors on one host: the arrays go through shared memory, only the
    encrypted headers cross the socket (relayed here to see every byte)."""
    contexts = _contexts(security, "worker")
    meshes = [PeerMesh("127.0.0.1", timeout=10, ssl_contexts=contexts) for _ in range(2)]
    relay = _Relay(meshes[0].address)
    connect_all(meshes, [relay.address, meshes[1].address])   # 1 dials 0 via the relay
    marker = np.frombuffer(b"GRADIENT-IN-CLEAR!" * 20_000, dtype=np.uint8).copy()
    results = [None, None]

    def run(i):
        everyone = meshes[i].exchange((float(i), marker[::1 - 2 * i].copy()))
        results[i] = [(loss, vec.copy()) for loss, vec in everyone]

    try:
        assert [m.lane_peers for m in meshes] == [[1], [0]]
        run_all(run, [(0,), (1,)])
        for i in range(2):
            assert [loss for loss, _ in results[i]] == [0.0, 1.0]
            np.testing.assert_array_equal(results[i][0][1], marker)
            np.testing.assert_array_equal(results[i][1][1], marker[::-1])
    finally:
        for m in meshes:
            m.close()
    assert 0 < len(relay.seen) < marker.nbytes          # headers only on the socket
    assert b"GRADIENT-IN-CLEAR!" not in relay.seen
    assert b"!RAELC-NI-TNEIDARG" not in relay.seen


@pytest.mark.slow
def test_mesh_refuses_a_plain_peer(security):
    tls = PeerMesh("127.0.0.1", timeout=3, ssl_contexts=_contexts(security, "worker"))
    plain = PeerMesh("127.0.0.1", timeout=3)
    addresses = [tls.address, plain.address]
    errors = []

    def connect(mesh, i):
        try:
            mesh.connect(i, addresses)
        except Exception as exc:  # noqa: BLE001
            errors.append((i, exc))

    threads = [threading.Thread(target=connect, args=(m, i)) for i, m in enumerate([tls, plain])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    tls.close()
    plain.close()
    assert any(i == 0 for i, _ in errors), "the TLS mesh accepted a plain peer"


def _problem(n=800, d=6):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d))
    return X, (X @ rng.normal(size=d) > 0).astype(np.int64)


@pytest.mark.parametrize("apply_on", [pytest.param("workers", marks=pytest.mark.slow), "driver"])
def test_sync_sgd_keeps_the_direct_path_on_a_tls_cluster(tmp_path, caplog, apply_on):
    import dmlcore as dml
    from dmlcore.executors import ExecutorPool

    X, y = _problem()
    opened = []
    original = ExecutorPool._open_channels

    def spy(self, ssl_context=None):
        opened.append(ssl_context)
        return original(self, ssl_context)

    ExecutorPool._open_channels = spy
    try:
        with tls_local_cluster(tmp_path) as client:
            data = dml.partition(X, y, 4, client=client)
            runs = {}
            with caplog.at_level(logging.WARNING, logger="dmlcore"):
                for transport in ("actors", "actor-calls"):
                    strategy = dml.SyncSGD(batch_size=32, apply_on=apply_on, transport=transport)
                    runs[transport] = dml.fit(dml.models.Logistic(6), data, strategy,
                                              dml.optim.SGD(lr=0.1, momentum=0.9), steps=30,
                                              client=client, progress=False, timeout=30)
    finally:
        ExecutorPool._open_channels = original
    assert opened and opened[0] is not None             # TLS channels were opened
    assert not [r for r in caplog.records if "actor calls" in r.getMessage()
                and "tls" in r.getMessage()]
    np.testing.assert_array_equal(np.asarray(runs["actors"].params),
                                  np.asarray(runs["actor-calls"].params))


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_parameter_server_loops_exchange_over_sockets(tmp_path, tls):
    """The loop on the server's own worker calls it in-process; the other
    worker's loop over a socket of its own (TLS on a TLS cluster), not Dask
    actor calls; the fit trains either way."""
    import contextlib

    import dmlcore as dml
    from dask.distributed import Client, LocalCluster

    X, y = _problem(n=1200)
    if tls:
        cluster = tls_local_cluster(tmp_path)
    else:
        @contextlib.contextmanager
        def cluster():
            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                              host="127.0.0.1", dashboard_address=None) as c, Client(c) as cl:
                yield cl
        cluster = cluster()
    with cluster as client:
        data = dml.partition(X, y, 2, client=client)
        model = dml.models.Logistic(6)
        result = dml.fit(model, data, dml.ParameterServer("async", batch_size=16),
                         dml.optim.SGD(lr=0.2), steps=200, client=client, progress=False,
                         timeout=30)
    endings = result.info["loop_endings"]
    assert sorted(e["via"] for e in endings) == ["in-process", "tls socket" if tls else "socket"]
    assert all(e["ended"] == "stopped" for e in endings)
    params = np.asarray(result.params, dtype=np.float64)
    loss = model.loss_grad(params, X, y, np.empty_like(params)) / len(y)
    assert result.steps == 200 and loss < 0.9 * np.log(2)


@pytest.mark.slow
def test_a_fit_uses_its_own_client_when_another_is_the_default(tmp_path, client):
    """A TLS client made after the session's TCP client becomes Dask's default;
    a fit on the TCP client must still call its actors through the TCP client
    (they used to bind to the default client and be refused: "encryption
    required"), for the executors and for the parameter server's actor."""
    import dmlcore as dml

    X, y = _problem()
    data = dml.partition(X, y, 4, client=client)
    with tls_local_cluster(tmp_path):                    # now the default client
        for strategy in (dml.SyncSGD(batch_size=32, transport="actor-calls"),
                         dml.ParameterServer(batch_size=32)):
            result = dml.fit(dml.models.Logistic(6), data, strategy, dml.optim.SGD(lr=0.1),
                             steps=20, client=client, progress=False, timeout=20)
            assert np.isfinite(np.asarray(result.params)).all()
