"""The executors' data plane: driver channels and the peer mesh, over real sockets."""
import socket
import threading

import numpy as np
import pytest

from dmlcore.channel import Channel, ChannelServer, PeerMesh


class Target:
    def __init__(self):
        self.closed = threading.Event()

    def double(self, x, *, plus=0):
        return 2 * x + plus

    def pair(self, a, b):
        return a.sum(), b[::-1].copy()

    def fail(self):
        raise ValueError("no such thing")

    def channel_closed(self):
        self.closed.set()


def test_calls_return_values_and_arrays_exactly():
    target = Target()
    server = ChannelServer(target, "127.0.0.1")
    channel = Channel(server.address)
    try:
        assert channel.submit("double", 21, plus=1).result() == 43
        a = np.random.default_rng(0).normal(size=300_000).astype(np.float32)   # 1.2 MB
        b = np.arange(10, dtype=np.int64)
        total, reversed_b = channel.submit("pair", a, b).result()
        assert total == a.sum()
        np.testing.assert_array_equal(reversed_b, b[::-1])
        with pytest.raises(RuntimeError, match="outstanding"):
            pending = channel.submit("double", 1)
            channel.submit("double", 2)
        assert pending.result() == 2
    finally:
        channel.close()
    assert target.closed.wait(10), "the server thread did not end when the driver hung up"


def test_errors_come_back_as_the_raised_exception():
    server = ChannelServer(Target(), "127.0.0.1")
    channel = Channel(server.address)
    try:
        with pytest.raises(ValueError, match="no such thing"):
            channel.submit("fail").result()
        with pytest.raises(AttributeError):
            channel.submit("missing").result()
        assert channel.submit("double", 1).result() == 2      # still serving
    finally:
        channel.close()


def test_a_wrong_token_is_refused_and_the_right_one_still_served():
    server = ChannelServer(Target(), "127.0.0.1")
    host, port, token = server.address
    intruder = socket.create_connection((host, port))
    intruder.sendall(bytes(len(token)))
    intruder.settimeout(10)
    assert intruder.recv(1) == b""                           # closed on it
    intruder.close()
    channel = Channel(server.address)
    try:
        assert channel.submit("double", 5).result() == 10
    finally:
        channel.close()


def test_a_dead_server_raises_connection_error():
    target = Target()
    server = ChannelServer(target, "127.0.0.1")
    channel = Channel(server.address)
    channel.submit("double", 1).result()
    channel._sock.shutdown(socket.SHUT_WR)       # the server sees EOF and ends
    assert target.closed.wait(10)
    with pytest.raises(ConnectionError):
        channel.submit("double", 1).result()
    channel.close()


def _connected_meshes(n):
    meshes = [PeerMesh("127.0.0.1") for _ in range(n)]
    addresses = [m.address for m in meshes]
    threads = [threading.Thread(target=m.connect, args=(i, addresses)) for i, m in enumerate(meshes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return meshes


def test_mesh_exchange_gives_everyone_the_same_ordered_list():
    meshes = _connected_meshes(3)
    try:
        for round_ in range(3):                     # buffers are reused across rounds
            sent = [(float(i), np.full(200_000 + round_, i + round_, np.float64), i)
                    for i in range(3)]
            got = [None] * 3

            def run(i):
                everyone = meshes[i].exchange(sent[i])
                got[i] = [(loss, vec.copy(), rows) for loss, vec, rows in everyone]

            threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            for i in range(3):
                assert [g[0] for g in got[i]] == [0.0, 1.0, 2.0]
                assert [g[2] for g in got[i]] == [0, 1, 2]
                for j in range(3):
                    np.testing.assert_array_equal(got[i][j][1], sent[j][1])
    finally:
        for m in meshes:
            m.close()


def test_mesh_peer_death_raises_connection_error():
    meshes = _connected_meshes(2)
    try:
        meshes[1].close()
        with pytest.raises(ConnectionError, match="peer"):
            meshes[0].exchange((0.0, np.zeros(10), 1))
    finally:
        meshes[0].close()


def test_mesh_refuses_a_wrong_token():
    meshes = [PeerMesh("127.0.0.1") for _ in range(2)]
    host, port, _ = meshes[0].address
    intruder = socket.create_connection((host, port))
    intruder.sendall(bytes(16) + (1).to_bytes(4, "big"))
    addresses = [m.address for m in meshes]
    t = threading.Thread(target=meshes[1].connect, args=(1, addresses))
    t.start()
    try:
        assert meshes[0].connect(0, addresses)           # skipped the intruder
        t.join(30)
        intruder.settimeout(10)
        assert intruder.recv(1) == b""
        result = [None]
        t = threading.Thread(target=lambda: result.__setitem__(0, meshes[1].exchange("b")))
        t.start()
        assert meshes[0].exchange("a") == ["a", "b"]
        t.join(30)
        assert result[0] == ["a", "b"]
    finally:
        intruder.close()
        for m in meshes:
            m.close()
