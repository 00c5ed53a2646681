"""Direct sockets for the training step's data plane: driver <-> executor
(``Channel``/``ChannelServer``) and executor <-> executor (``PeerMesh``).
Dask stays the control plane (placement, actors, failures).

* Opening: the server thread listens on the worker's host (OS-chosen port)
  and accepts ONE connection whose first 16 bytes are the random token it
  handed out through the authenticated actor call that opened it.
* Message: header ``!QI`` (JSON length, buffer count), one ``!Q`` length per
  raw buffer, the JSON structure (``wire``: no pickle), the raw buffers
  (arrays rebuilt over the received bytes). Request ``wire.Call(method,
  args, kwargs)`` with ``method`` in the server's allow-list; reply
  ``wire.Reply(ok, value or exception)``; one outstanding call per channel.
* TLS (``tls://`` clusters): every socket is wrapped by ``ssl`` with the
  cluster's ``distributed.Security`` contexts (both ends verified against its
  CA) before the token is sent; nothing travels in clear. Executors of a TLS
  mesh on one host pass their arrays through shared memory instead
  (``lanes``: no cipher for bytes that never leave the host); the headers
  still go, encrypted, over their socket.
* Limits: a header declaring more than ``max_bytes`` is refused before any
  allocation (``MessageTooLarge``) and the connection closed; every wait has
  a deadline (``DataPlaneTimeout``); sockets keep alive; a failed peer is
  ``PeerLost``, so callers tell an original error from its consequences.
* ``bytes_sent``/``bytes_received``: the message frames written and read.
"""
from __future__ import annotations

import hmac
import os
import secrets
import select
import socket
import ssl
import struct
import threading
import time

from . import wire
from .lanes import InLane, OutLane, fits_slot, lanes_available

_HEADER = struct.Struct("!QI")
# flags in the header's buffer count: the buffers are in the lane's slot 0 or 1
_IN_LANE, _SLOT_ONE = 1 << 31, 1 << 30
_COUNT = _SLOT_ONE - 1
_INDEX = struct.Struct("!I")
_LENGTH = struct.Struct("!Q")
_TOKEN_BYTES = 16
DEFAULT_TIMEOUT = 60.0
# a non-blocking socket that cannot go on now (plain, or TLS waiting for a record)
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
# How long an exchange polls without sleeping before it blocks: a peer that
# arrives within it is read without the wake-up of a core gone idle
# (benchmarks/HISTORY.md, 2026-12-08); only where each executor of the host can
# have a core of its own (``spin_seconds``), so that no spinner takes a peer's.
SPIN_SECONDS = 200e-6


def spin_seconds(executors_here, cores):
    """The exchanges' spin (``SPIN_SECONDS``) for an executor sharing its host
    with ``executors_here - 1`` others on ``cores`` cores, else 0."""
    return SPIN_SECONDS if executors_here <= cores else 0.0


def _cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class PeerLost(ConnectionError):
    """A peer (executor or driver) closed its end or died: a consequence of
    another failure, reported when nothing more specific is known."""


class DataPlaneTimeout(TimeoutError):
    """A data-plane wait exceeded its deadline (a frozen or cut-off peer)."""


class MessageTooLarge(ConnectionError):
    """A message header declared more bytes than the connection's cap."""


for _error in (PeerLost, DataPlaneTimeout, MessageTooLarge):
    wire.register_error(_error)


def _frames(obj):
    """``obj`` as the byte strings of one message (header + JSON, raw buffers)."""
    payload, raws = wire.encode(obj)
    return [_head(payload, raws), *raws]


def _head(payload, raws, lane_slot=None):
    """The first frame of a message: header, buffer lengths, JSON. With
    ``lane_slot``, the buffers are not sent after it: they are in that slot
    of the connection's lane."""
    count = len(raws) if lane_slot is None else len(raws) | _IN_LANE | (
        _SLOT_ONE if lane_slot else 0)
    return _HEADER.pack(len(payload), count) + b"".join(
        _LENGTH.pack(memoryview(r).nbytes) for r in raws) + payload


def call_frames(method, *args, **kwargs):
    """The frames of ``wire.Call(method, args, kwargs)`` (for ``Channel.submit_frames``)."""
    return _frames(wire.Call(method, args, kwargs))


def _recv_exact(sock, n):
    """Exactly ``n`` bytes from a blocking socket (a bytearray)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("channel closed by the other end")
        got += k
    return buf


def _nbytes(frames):
    return sum(memoryview(f).nbytes for f in frames)


def _recv(sock, max_bytes=None):
    """One message from a blocking socket (``_Incoming`` reads it in one pump)."""
    return _recv_counted(sock, max_bytes)[0]


def _recv_counted(sock, max_bytes=None):
    """``(message, bytes it took on the wire)`` from a blocking socket."""
    message = _Incoming([], max_bytes)
    message.pump(sock)
    return message.value(), message.nbytes


def _listen(host):
    """A listening socket on ``host`` (IPv4, IPv6 or a host name), port chosen by the OS."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, 0), family=family)


def _pending(sock):
    """Bytes already decrypted inside a TLS socket, which ``poll`` cannot see
    (0 for a plain socket)."""
    return sock.pending() if isinstance(sock, ssl.SSLSocket) else 0


def _wrap(sock, context, server_side):
    """``sock`` under TLS with ``context`` (handshake done), or ``sock`` when
    ``context`` is None. The contexts come from ``distributed.Security``,
    which verifies certificates against the cluster's CA, not host names."""
    if context is None:
        return sock
    try:
        return context.wrap_socket(sock, server_side=server_side)
    except BaseException:
        sock.close()
        raise


def _tune(sock, timeout=DEFAULT_TIMEOUT):
    """No Nagle delay; keepalive probes so a dead host is noticed within
    about ``timeout`` even on an idle connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(timeout) // 2)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(1, idle // 3)),
                        ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class ChannelServer:
    """Serve ``target``'s methods to one driver connection, in a daemon thread.

    ``address`` = (host, port, token) to hand to ``Channel``. ``methods``:
    the names that may be called (default: ``target.CHANNEL_METHODS``);
    ``max_bytes``: the largest request accepted (None = no cap). A request
    that is malformed or too large closes the connection. ``ssl_context``: a
    server-side context (TLS clusters); the driver must then speak TLS with a
    certificate the context trusts.

    The listener accepts ONE connection that presents the token, then closes
    (or closes unused after ``accept_timeout`` s); when that connection
    closes, the thread ends.
    """

    def __init__(self, target, host, accept_timeout=120.0, max_bytes=None,
                 timeout=DEFAULT_TIMEOUT, methods=None, ssl_context=None):
        self.target = target
        self.ssl_context = ssl_context
        self.methods = frozenset(getattr(target, "CHANNEL_METHODS", ())
                                 if methods is None else methods)
        self.max_bytes, self.timeout = max_bytes, timeout
        self.token = secrets.token_bytes(_TOKEN_BYTES)
        self._listener = _listen(host)
        self._listener.settimeout(accept_timeout)
        self.address = (host, self._listener.getsockname()[1], self.token)
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name="dmlcore-channel")
        self._thread.start()

    def _accept(self):
        """The first connection that presents the token, or None on timeout."""
        try:
            while True:
                sock, _ = self._listener.accept()
                sock.settimeout(10.0)
                try:
                    sock = _wrap(sock, self.ssl_context, server_side=True)
                    token = bytes(_recv_exact(sock, _TOKEN_BYTES))
                except (OSError, ConnectionError):      # ssl.SSLError is an OSError
                    token = b""
                if hmac.compare_digest(token, self.token):
                    # waiting for the next call is not a data-plane wait (the
                    # driver may be evaluating); a dead driver is noticed by
                    # keepalive
                    sock.settimeout(None)
                    return sock
                sock.close()
        except OSError:                     # timeout, or the listener was closed
            return None
        finally:
            self._listener.close()

    def _serve(self):
        try:
            self._serve_connection()
        finally:
            closed = getattr(self.target, "channel_closed", None)
            if closed is not None:
                closed()

    def _serve_connection(self):
        sock = self._accept()
        if sock is None:
            return
        _tune(sock, self.timeout)
        with sock:
            while True:
                try:
                    call = _recv(sock, self.max_bytes)
                    if not isinstance(call, wire.Call):
                        return
                except (ConnectionError, OSError, ValueError, TypeError, KeyError):
                    return
                try:
                    if call.method not in self.methods:
                        raise AttributeError(f"method {call.method!r} is not served "
                                             f"(one of {', '.join(sorted(self.methods))})")
                    reply = wire.Reply(True, getattr(self.target, call.method)(
                        *call.args, **call.kwargs))
                except Exception as exc:  # noqa: BLE001 — returned to the caller
                    reply = wire.Reply(False, exc)
                try:
                    try:
                        frames = _frames(reply)
                    except TypeError as exc:
                        frames = _frames(wire.Reply(False, TypeError(
                            f"the reply to {call.method} cannot travel: {exc}")))
                    for frame in frames:
                        sock.sendall(frame)
                except OSError:
                    return


class Channel:
    """Driver end: ``submit(method, *args, **kwargs)`` sends the call and returns
    a future-like whose ``result()`` waits for the reply (value, or the raised
    exception; ``ConnectionError`` when the executor's process is gone).

    ``name``: how errors name the other end (its worker's address);
    ``timeout``: the deadline of every send and of ``result()`` unless the
    call gives its own; ``ssl_context``: a client-side context (TLS clusters)."""

    def __init__(self, address, timeout=DEFAULT_TIMEOUT, name=None, max_bytes=None,
                 ssl_context=None):
        host, port, token = address
        self.name = name or f"{host}:{port}"
        self.timeout, self.max_bytes = float(timeout), max_bytes
        self._sock = _wrap(socket.create_connection((host, port), timeout=self.timeout),
                           ssl_context, server_side=False)
        _tune(self._sock, self.timeout)
        self._sock.sendall(token)
        self._pending = None
        # bytes of calls written and of replies read (the message frames; TLS
        # records add their own overhead below this count)
        self.bytes_sent = self.bytes_received = 0

    def fileno(self):
        return -1 if self._sock is None else self._sock.fileno()

    def pending(self):
        """Reply bytes already decrypted (TLS), which ``select`` does not report."""
        return 0 if self._sock is None else _pending(self._sock)

    def submit(self, method, *args, **kwargs):
        return self.submit_frames(method, call_frames(method, *args, **kwargs))

    def submit_frames(self, method, frames):
        """``submit`` with the call already encoded (``call_frames``): one
        encoding serves every channel that gets the same call."""
        if self._pending is not None:
            raise RuntimeError(f"channel {self.name}: a call is still outstanding")
        if self._sock is None:
            raise ConnectionError(f"channel {self.name} is closed")
        try:
            self._sock.settimeout(self.timeout)
            for frame in frames:
                self._sock.sendall(frame)
        except OSError as exc:
            self.close()
            raise PeerLost(f"worker {self.name}: sending {method} failed: {exc}") from exc
        self.bytes_sent += _nbytes(frames)
        self._pending = _Reply(self, method)
        return self._pending

    def _receive(self, method, timeout=None):
        self._pending = None
        timeout = self.timeout if timeout is None else float(timeout)
        if self._sock is None:
            raise PeerLost(f"worker {self.name}: channel closed before the reply to {method}")
        try:
            self._sock.settimeout(timeout)
            (ok, value), nbytes = _recv_counted(self._sock, self.max_bytes)
            self.bytes_received += nbytes
        except ValueError as exc:           # a malformed reply
            self.close()
            raise PeerLost(f"worker {self.name}: malformed reply to {method} ({exc})") from exc
        except socket.timeout as exc:
            self.close()
            raise DataPlaneTimeout(f"worker {self.name}: no reply to {method} within "
                                   f"{timeout:g} s; the worker may be frozen or cut off") from exc
        except (OSError, ConnectionError, EOFError) as exc:
            self.close()
            raise PeerLost(f"worker {self.name}: no reply to {method} ({exc}); "
                           "the executor's worker may have died") from exc
        if not ok:
            raise value
        return value

    def close(self):
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


class _Reply:
    def __init__(self, channel, method):
        self._channel, self._method = channel, method
        self._done, self._value, self._error = False, None, None

    def fileno(self):
        return self._channel.fileno()

    def pending(self):
        return self._channel.pending()

    def result(self, timeout=None):
        if not self._done:
            self._done = True
            try:
                self._value = self._channel._receive(self._method, timeout)
            except BaseException as exc:
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._value


class _Outgoing:
    """One message being written to a non-blocking socket."""

    def __init__(self, frames):
        self.views = [memoryview(f).cast("B") for f in frames if len(f)]

    def pump(self, sock):
        """Write what the socket takes now; True once everything is sent."""
        while self.views:
            try:
                sent = sock.send(self.views[0])
            except _WOULD_BLOCK:        # TLS: retried later with the same buffer
                return False
            if sent == len(self.views[0]):
                self.views.pop(0)
            else:
                self.views[0] = self.views[0][sent:]
        return True


class _Incoming:
    """One message being read (the ``_frames`` format), out-of-band buffers
    received into the reusable ``inbox`` list (copied from ``lane``, the
    connection's ``lanes.InLane``, when the header says they are there). On
    a non-blocking socket ``pump`` returns False when it must wait; on a
    blocking one it returns once the message is complete."""

    def __init__(self, inbox, max_bytes=None, lane=None):
        self.inbox, self.max_bytes, self.lane = inbox, max_bytes, lane
        self.lane_slot = None
        self.head = bytearray(_HEADER.size)
        self.targets = [self.head]          # buffers still to fill, in order
        self.pos = 0
        self.stage = 0                      # 0 header, 1 lengths, 2 payload + buffers
        self.payload = self.lengths = None

    def _next_stage(self):
        if self.stage == 0:
            size, n_buffers = _HEADER.unpack(self.head)
            if n_buffers & _IN_LANE:
                if self.lane is None:
                    raise ValueError("a message in a lane on a connection without one")
                self.lane_slot = 1 if n_buffers & _SLOT_ONE else 0
                n_buffers &= _COUNT
            if self.max_bytes is not None and (size > self.max_bytes
                                               or n_buffers * _LENGTH.size > self.max_bytes):
                raise MessageTooLarge(f"message of {size} bytes and {n_buffers} buffers "
                                      f"refused (cap {self.max_bytes} bytes)")
            self.payload = bytearray(size)
            self.lengths = bytearray(_LENGTH.size * n_buffers)
            self.stage = 1
            self.targets = [self.lengths] if n_buffers else []
            if not n_buffers:
                self._next_stage()
        elif self.stage == 1:
            lengths = [_LENGTH.unpack_from(self.lengths, i * _LENGTH.size)[0]
                       for i in range(len(self.lengths) // _LENGTH.size)]
            if self.max_bytes is not None and len(self.payload) + sum(lengths) > self.max_bytes:
                raise MessageTooLarge(f"message of {len(self.payload) + sum(lengths)} bytes "
                                      f"refused (cap {self.max_bytes} bytes)")
            del self.inbox[len(lengths):]
            for i, n in enumerate(lengths):
                if i == len(self.inbox):
                    self.inbox.append(bytearray(n))
                elif len(self.inbox[i]) != n:
                    self.inbox[i] = bytearray(n)
            self.stage = 2
            if self.lane_slot is None:
                self.targets = [self.payload, *self.inbox]
            else:
                self.targets = [self.payload]
                self.lane_lengths = lengths

    def pump(self, sock):
        """Read what has arrived; True once the message is complete."""
        while True:
            while self.targets and self.pos == len(self.targets[0]):
                self.targets.pop(0)
                self.pos = 0
            if not self.targets:
                if self.stage == 2:
                    if self.lane_slot is not None:
                        self.lane.read(self.lane_slot, self.lane_lengths, self.inbox)
                    return True
                self._next_stage()
                continue
            view = memoryview(self.targets[0])[self.pos:]
            try:
                k = sock.recv_into(view)
            except _WOULD_BLOCK:
                return False
            if k == 0:
                raise ConnectionError("peer closed the connection")
            self.pos += k

    def value(self):
        return wire.decode(self.payload, self.inbox)

    @property
    def nbytes(self):
        """The message's size on the wire (once complete)."""
        return (_HEADER.size + len(self.lengths) + len(self.payload)
                + sum(len(b) for b in self.inbox))


class PeerMesh:
    """Sockets between the executors of one run, every pair connected once.

    ``address`` (host, port, token) goes to the others through the driver;
    ``connect(index, addresses)`` (called on every executor at the same
    time) dials the lower indices and accepts the higher ones, checking the
    token; ``exchange(obj)`` sends ``obj`` to every peer while receiving
    theirs and returns all objects in executor order, its own included. Each
    executor thus ends a step with the same list, in the same order.

    ``timeout``: the deadline of ``connect`` and of each exchange (a peer that
    sends nothing for that long raises ``DataPlaneTimeout``); ``max_bytes``:
    the largest message accepted from a peer. ``close()`` tells the peers at
    once (they see ``PeerLost``). ``ssl_contexts``: (server context, client
    context) on TLS clusters; every pair then talks TLS.

    ``lanes``: whether peers on this host exchange arrays through shared
    memory (``dmlcore.lanes``), each lane's slot holding ``lane_bytes``;
    None (default) = on TLS meshes, where they spare both ends the cipher.
    Headers still cross the socket; messages larger than a slot go by socket.

    ``spin``: seconds an exchange polls before it sleeps on its sockets, set
    by ``connect`` (``spin_seconds`` of the executors on this host).
    """

    def __init__(self, host, timeout=DEFAULT_TIMEOUT, max_bytes=None, ssl_contexts=None,
                 lanes=None, lane_bytes=8 << 20):
        self.server_context, self.client_context = ssl_contexts or (None, None)
        self.lanes_wanted = (ssl_contexts is not None if lanes is None else bool(lanes)) \
            and lanes_available()
        self.lane_bytes = int(lane_bytes)
        self._out_lanes, self._in_lanes = {}, {}
        self.token = secrets.token_bytes(_TOKEN_BYTES)
        self.timeout, self.max_bytes = float(timeout), max_bytes
        self._listener = _listen(host)
        self.address = (host, self._listener.getsockname()[1], self.token)
        self.index, self.size, self._socks = 0, 1, {}
        self._names = {}
        self._inbox = {}
        self.bytes_sent = self.bytes_received = 0     # message frames, all peers
        self.spin = 0.0                 # seconds an exchange polls before it blocks

    def connect(self, index, addresses, timeout=None):
        timeout = self.timeout if timeout is None else float(timeout)
        self.index, self.size = int(index), len(addresses)
        self._names = {j: f"{a[0]}:{a[1]}" for j, a in enumerate(addresses)}
        try:
            for j in range(self.index):
                host, port, token = addresses[j]
                sock = _wrap(socket.create_connection((host, port), timeout=timeout),
                             self.client_context, server_side=False)
                sock.sendall(token + _INDEX.pack(self.index))
                self._socks[j] = sock
            self._listener.settimeout(timeout)
            while len(self._socks) < self.size - 1:
                sock, _ = self._listener.accept()
                sock.settimeout(timeout)
                try:
                    sock = _wrap(sock, self.server_context, server_side=True)
                except (OSError, ConnectionError):      # not TLS, or a wrong certificate
                    continue
                token = bytes(_recv_exact(sock, _TOKEN_BYTES))
                j = _INDEX.unpack(bytes(_recv_exact(sock, _INDEX.size)))[0]
                if (not hmac.compare_digest(token, self.token) or not self.index < j < self.size
                        or j in self._socks):
                    sock.close()
                    continue
                self._socks[j] = sock
            self._open_lanes()
        except BaseException:
            self.close()
            raise
        finally:
            self._listener.close()
        for sock in self._socks.values():
            _tune(sock, timeout)
            sock.setblocking(False)
        here = sum(a[0] == addresses[self.index][0] for a in addresses)
        self.spin = spin_seconds(here, _cores())
        return True

    def _open_lanes(self):
        """Offer every peer a lane (or None) over its socket, map the peers'
        offers that check out, say which; then the lanes' files are unlinked
        (the peers that accepted have mapped them). Small blocking messages:
        every end sends before it reads, so none waits for another."""
        for j, sock in self._socks.items():
            lane = None
            if self.lanes_wanted:
                try:
                    lane = self._out_lanes[j] = OutLane(self.lane_bytes)
                except OSError:             # /dev/shm full or not writable: sockets
                    lane = None
            sock.sendall(b"".join(_frames(lane and lane.offer())))
        for j, sock in self._socks.items():
            offer = _recv(sock, 1 << 16)
            lane = InLane.open(offer) if self.lanes_wanted and isinstance(offer, dict) \
                else None
            if lane is not None:
                self._in_lanes[j] = lane
            sock.sendall(b"".join(_frames(lane is not None)))
        for j, sock in self._socks.items():
            accepted = _recv(sock, 1 << 16) is True
            lane = self._out_lanes.get(j)
            if lane is not None:
                lane.unlink()
                if not accepted:
                    del self._out_lanes[j]
                    lane.close()

    @property
    def lane_peers(self):
        """The peers this executor sends to through shared memory."""
        return sorted(self._out_lanes)

    def _peer(self, j):
        return f"peer executor {j} ({self._names.get(j, '?')})"

    def exchange(self, obj, tag="all"):
        """Everyone's ``obj``, in executor order (see ``alltoall``)."""
        return self.alltoall([obj] * self.size, tag)

    def alltoall(self, objs, tag="all"):
        """Send ``objs[j]`` to peer j while receiving what each peer sends this
        executor; returns the received objects in executor order, with
        ``objs[self.index]`` at this executor's place. A peer's death raises
        ``PeerLost``, a silence longer than ``timeout`` ``DataPlaneTimeout``.

        One thread writes to and reads from every peer at once (non-blocking
        sockets and ``poll``), so no message waits for another. The peers'
        arrays are received into buffers kept per ``tag`` and reused by the
        next call with that tag: use them before then."""
        encoded = {}
        for j in self._socks:                   # serialise each distinct object once
            if id(objs[j]) not in encoded:
                encoded[id(objs[j])] = wire.encode(objs[j])
        by_sock = {sock: j for j, sock in self._socks.items()}
        outgoing = {}
        for sock, j in by_sock.items():
            payload, raws = encoded[id(objs[j])]
            lane = self._out_lanes.get(j)
            if lane is not None and raws and fits_slot(raws, lane.slot_bytes):
                frames = [_head(payload, raws, lane.write(raws))]
            else:
                frames = [_head(payload, raws), *raws]
            outgoing[sock] = _Outgoing(frames)
            self.bytes_sent += _nbytes(frames[:1]) + _nbytes(raws)
        inbox = self._inbox.setdefault(tag, {})
        incoming = {sock: _Incoming(inbox.setdefault(j, []), self.max_bytes,
                                    self._in_lanes.get(j))
                    for sock, j in by_sock.items()}
        got = {self.index: objs[self.index]}
        by_fd = {sock.fileno(): sock for sock in by_sock}
        broken = select.POLLHUP | select.POLLERR | select.POLLNVAL
        deadline = time.monotonic() + self.timeout
        sock = None
        try:
            while outgoing or incoming:
                for sock in [s for s in incoming if _pending(s)]:  # decrypted, unseen by poll
                    if incoming[sock].pump(sock):
                        got[by_sock[sock]] = self._received(incoming.pop(sock))
                if not (outgoing or incoming):
                    break
                poller = select.poll()
                for fd, s in by_fd.items():
                    mask = (select.POLLIN if s in incoming else 0) | \
                        (select.POLLOUT if s in outgoing else 0)
                    if mask:
                        poller.register(fd, mask)
                events = self._spin(poller)
                if not events:
                    left = deadline - time.monotonic()
                    events = poller.poll(max(0, int(left * 1000) + 1)) if left > 0 else []
                if not events:
                    late = sorted({by_sock[s] for s in (*outgoing, *incoming)})
                    raise DataPlaneTimeout(
                        f"executor {self.index}: nothing from "
                        f"{', '.join(self._peer(j) for j in late)} within {self.timeout:g} s; "
                        "a worker may be frozen or cut off")
                for fd, event in events:
                    sock = by_fd[fd]
                    if sock in outgoing and event & (select.POLLOUT | select.POLLERR):
                        if outgoing[sock].pump(sock):
                            del outgoing[sock]
                    if sock in incoming and event & (select.POLLIN | broken):
                        if incoming[sock].pump(sock):
                            got[by_sock[sock]] = self._received(incoming.pop(sock))
                    elif event & broken and sock not in incoming:
                        raise PeerLost("connection closed")
        except DataPlaneTimeout:
            raise
        except (OSError, ConnectionError, ValueError) as exc:
            who = self._peer(by_sock[sock]) if sock in by_sock else "a peer"
            raise PeerLost(f"executor {self.index}: {who} failed or closed the exchange "
                           f"({exc})") from exc
        return [got[j] for j in range(self.size)]

    def _spin(self, poller):
        """``poller``'s events, polled without sleeping for up to ``spin`` s
        (none when ``spin`` is 0: the caller's blocking poll does it all)."""
        events, until = [], time.perf_counter() + self.spin
        while not events and time.perf_counter() < until:
            events = poller.poll(0)
        return events

    def _received(self, message):
        self.bytes_received += message.nbytes
        return message.value()

    def close(self):
        self._listener.close()
        for sock in self._socks.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)     # the peers see EOF now
            except OSError:
                pass
            sock.close()
        self._socks = {}
        for lane in (*self._out_lanes.values(), *self._in_lanes.values()):
            lane.close()
        self._out_lanes, self._in_lanes = {}, {}


def wait_all(futures, timeout, grace=2.0):
    """``[(ok, value or exception), ...]`` of ``futures`` (``Channel`` replies,
    Dask actor futures or finished in-process calls), waited on together.

    The first outcome is awaited up to ``timeout`` seconds; once one executor
    has answered, the others get ``timeout`` more if it succeeded (the
    executors run in lockstep), ``grace`` more if it failed (its peers are
    told at once). A future still silent then counts as ``DataPlaneTimeout``.
    """
    outcomes = [None] * len(futures)
    channel = [i for i, f in enumerate(futures) if isinstance(f, _Reply)]
    other = [i for i, f in enumerate(futures) if not isinstance(f, _Reply)]
    start = time.monotonic()
    deadline, answered = start + timeout, False

    def silent(i, exc=None):            # a Dask actor future's timeout
        return DataPlaneTimeout(f"executor {i}: no reply within {timeout:g} s"
                                + (f" ({exc})" if exc is not None and str(exc) else ""))

    def settle(i, wait):
        """``outcomes[i]`` from future i; the first outcome sets the others' deadline."""
        nonlocal answered, deadline
        try:
            outcomes[i] = (True, futures[i].result(wait))
        except TimeoutError as exc:
            outcomes[i] = (False, exc if isinstance(exc, DataPlaneTimeout) else silent(i, exc))
        except Exception as exc:  # noqa: BLE001 — sorted out by the caller
            outcomes[i] = (False, exc)
        if not answered:
            answered = True
            ok = outcomes[i][0]
            deadline = min(deadline, time.monotonic() + (timeout if ok else grace))

    # actor futures: each as soon as it is done, so that one stuck on a dead
    # worker delays none of the others
    waiting = list(other)
    while waiting:
        done = [i for i in waiting if getattr(futures[i], "done", lambda: True)()]
        if not done:
            if time.monotonic() >= deadline:
                for i in waiting:
                    outcomes[i] = (False, silent(i))
                break
            time.sleep(0.002)
            continue
        for i in done:
            settle(i, 1.0)
            waiting.remove(i)
    pending = {i: futures[i] for i in channel}
    while pending:
        left = deadline - time.monotonic()
        ready = []
        if left > 0:
            closed = [i for i, f in pending.items() if f.fileno() < 0 or f.pending()]
            if not closed:
                readable = select.select(list(pending.values()), [], [], left)[0]
            ready = closed or [i for i, f in pending.items() if f in readable]
        if not ready:
            for i, f in pending.items():
                name = f._channel.name
                f._channel.close()
                outcomes[i] = (False, DataPlaneTimeout(
                    f"worker {name}: no reply to {f._method} after "
                    f"{time.monotonic() - start:.1f} s (deadline {timeout:g} s, or "
                    f"{grace:g} s after another executor failed); the worker may be "
                    "frozen or cut off"))
            break
        for i in ready:
            settle(i, max(1.0, deadline - time.monotonic()))
            del pending[i]
    return outcomes


def first_error(outcomes, names):
    """The exception to raise for failed ``outcomes``, or None: an original
    error first, then the driver's own timeout or lost connection to a worker,
    then what the peers saw (the consequences); re-raised with the name of the
    worker it came from."""
    failed = [(i, v) for i, (ok, v) in enumerate(outcomes) if not ok]
    if not failed:
        return None
    def rank(item):
        i, exc = item
        if not isinstance(exc, (PeerLost, DataPlaneTimeout)):
            return 0                    # the original error
        return 1 if names[i] in str(exc) else 2     # the driver's view of a worker first

    i, exc = min(failed, key=rank)
    name = names[i]
    if name in str(exc):
        return exc
    try:
        named = type(exc)(f"on worker {name}: {type(exc).__name__}: {exc}")
    except Exception:  # noqa: BLE001 — a type that takes other arguments
        named = RuntimeError(f"on worker {name}: {type(exc).__name__}: {exc}")
    named.__cause__ = exc
    return named
