"""The executors' data plane: driver channels and the peer mesh, over real sockets."""
import socket
import threading
import time

import numpy as np
import pytest

from dmlcore import channel
from dmlcore.channel import Channel, ChannelServer, DataPlaneTimeout, PeerMesh, wait_all


class Target:
    CHANNEL_METHODS = ("double", "pair", "fail")

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


def connect_all(meshes, addresses=None):
    """``connect`` every mesh at once (each in a thread); returns ``meshes``."""
    addresses = addresses or [m.address for m in meshes]
    threads = [threading.Thread(target=m.connect, args=(i, addresses))
               for i, m in enumerate(meshes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return meshes


def run_all(target, args_list, timeout=30):
    """``target(*args)`` for every ``args`` of ``args_list``, each in a thread, joined."""
    threads = [threading.Thread(target=target, args=args) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def _connected_meshes(n):
    return connect_all([PeerMesh("127.0.0.1") for _ in range(n)])


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


def test_exchanges_spin_only_where_each_executor_of_the_host_has_a_core():
    assert channel.spin_seconds(2, 2) == channel.SPIN_SECONDS > 0
    assert channel.spin_seconds(1, 1) == channel.SPIN_SECONDS
    assert channel.spin_seconds(3, 2) == 0.0


@pytest.mark.parametrize("cores", [1, 2])
def test_a_mesh_spins_by_the_executors_of_its_host(monkeypatch, cores):
    """Two executors on 127.0.0.1: they spin on 2 cores, not on 1; either way a
    peer that comes before the spin ends and one that comes long after it are
    both read."""
    monkeypatch.setattr(channel, "_cores", lambda: cores)
    meshes = _connected_meshes(2)
    try:
        assert [m.spin for m in meshes] == [channel.spin_seconds(2, cores)] * 2
        for late in (0.0, 0.05):                    # seconds the second peer waits
            got = [None, None]

            def run(i):
                if i == 1:
                    time.sleep(late)
                got[i] = [v.copy() for v in meshes[i].exchange(np.full(50_000, i, np.float32))]

            run_all(run, [(0,), (1,)])
            for i in range(2):
                assert [float(v[0]) for v in got[i]] == [0.0, 1.0]
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


def test_wire_round_trips_the_values_that_travel_and_refuses_others():
    import pickle

    from dmlcore import optim, wire
    from dmlcore.channel import PeerLost

    a = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    sgd = optim.SGD(lr=0.1, momentum=0.9, schedule={"kind": "step", "every": 3, "gamma": 0.5})
    state = optim.AdamState(3, np.ones(4), np.zeros(4), None)
    value = [None, True, 7, 2.5, "s", b"\x00\x01", (1, (2,)), {"k": a, 3: [a[0]]},
             np.float32(1.5), np.int64(9), np.empty(0), state, sgd,
             MemoryError("boom"), PeerLost("gone")]
    header, buffers = wire.encode(value)
    back = wire.decode(header, [bytearray(memoryview(b).cast("B")) for b in buffers])
    assert back[:7] == value[:7]
    np.testing.assert_array_equal(back[7]["k"], a)
    assert back[7]["k"].dtype == np.float32 and back[7][3][0].shape == (4,)
    assert back[8] == np.float32(1.5) and type(back[8]) is np.float32 and back[9] == 9
    assert back[10].shape == (0,)
    assert type(back[11]) is optim.AdamState and back[11].step == 3
    assert type(back[12]) is optim.SGD and back[12].lr_at(3) == sgd.lr_at(3) == 0.05
    assert back[12].momentum == 0.9
    assert type(back[13]) is MemoryError and str(back[13]) == "boom"
    assert type(back[14]) is PeerLost
    for bad in (object(), np.array(["x"], dtype=object), lambda: 0):
        with pytest.raises(TypeError, match="cannot travel"):
            wire.encode(bad)
    with pytest.raises(ValueError):
        wire.decode(pickle.dumps([1]), [])
    with pytest.raises(ValueError, match="refused"):
        wire.decode(b'{"$n":"Popen","f":[]}', [])
    with pytest.raises(ValueError, match="bytes is not"):
        wire.decode(b'{"$a":0,"dtype":"<f8","shape":[3]}', [bytearray(8)])
    # an unknown exception type arrives as a RuntimeError carrying its name
    err = wire.decode(b'{"$e":"SystemExit","msg":"x"}', [])
    assert type(err) is RuntimeError and "SystemExit" in str(err)


def test_a_method_not_listed_is_refused():
    server = ChannelServer(Target(), "127.0.0.1")
    channel = Channel(server.address)
    try:
        with pytest.raises(AttributeError, match="not served"):
            channel.submit("channel_closed").result()
        assert channel.submit("double", 3).result() == 6
    finally:
        channel.close()


def test_a_forged_huge_header_is_refused_before_allocation():
    """A header claiming 2**40 bytes: the server closes the connection at once
    (nothing that size allocated) and its thread ends cleanly."""
    import struct
    import tracemalloc

    target = Target()
    tracemalloc.start()
    try:
        server = ChannelServer(target, "127.0.0.1", max_bytes=1 << 20)
        host, port, token = server.address
        sock = socket.create_connection((host, port))
        sock.settimeout(10)
        sock.sendall(token + struct.pack("!QI", 1 << 40, 0))
        assert sock.recv(1) == b""                           # closed on it
        sock.close()
        assert target.closed.wait(10), "the server thread did not end"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    # a buffer length above the cap is refused too
    target = Target()
    server = ChannelServer(target, "127.0.0.1", max_bytes=1 << 20)
    host, port, token = server.address
    sock = socket.create_connection((host, port))
    sock.settimeout(10)
    sock.sendall(token + struct.pack("!QI", 2, 1) + struct.pack("!Q", 1 << 40))
    assert sock.recv(1) == b""
    sock.close()
    assert target.closed.wait(10)


def test_mesh_refuses_a_message_above_its_cap():
    from dmlcore.channel import PeerLost

    meshes = _connected_meshes(2)
    for m in meshes:
        m.max_bytes = 1 << 12
    try:
        errors = []

        def run(m, obj):
            try:
                m.exchange(obj)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
            finally:
                m.close()

        threads = [threading.Thread(target=run, args=(m, np.zeros(1 << 12)))
                   for m in meshes]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert len(errors) == 2 and all(isinstance(e, PeerLost) for e in errors)
        assert any("cap" in str(e) for e in errors)
    finally:
        for m in meshes:
            m.close()


class _ActorFuture:
    """A Dask actor future's shape: done after ``after`` s, then its value or
    error; ``result(timeout)`` waits on an event loop, as ``distributed``'s does."""

    def __init__(self, after, value=None, error=None):
        self.at, self.value, self.error = time.monotonic() + after, value, error

    def done(self):
        return time.monotonic() >= self.at

    def result(self, timeout=None):
        if timeout is not None and timeout <= 0:    # asyncio.wait_for(coroutine, 0): even
            raise TimeoutError()                    # a done one has not run yet
        if not self.done():
            if timeout is not None and time.monotonic() + timeout < self.at:
                time.sleep(timeout)
                raise TimeoutError()
            time.sleep(max(0.0, self.at - time.monotonic()))
        if self.error is not None:
            raise self.error
        return self.value


def test_wait_all_takes_each_actor_future_when_it_is_done():
    """An actor call stuck on a dead worker (it fails only after the deadline)
    no longer leaves the executors after it with no time: their answers, in
    already, come back; a future never done times out."""
    stuck = _ActorFuture(after=1.0, error=ConnectionError("worker gone"))
    answered = _ActorFuture(after=0.0, value="stopped")
    silent = _ActorFuture(after=60.0, value="never")
    started = time.monotonic()
    (s_ok, s_val), (a_ok, a_val), (n_ok, n_val) = wait_all([stuck, answered, silent], 0.3)
    assert time.monotonic() - started < 0.9
    assert (a_ok, a_val) == (True, "stopped")
    assert not s_ok and isinstance(s_val, DataPlaneTimeout)
    assert not n_ok and isinstance(n_val, DataPlaneTimeout)
