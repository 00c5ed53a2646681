"""Same-host shared-memory lanes for the peer mesh: the arrays of a message
between two executors on one host go through a file in ``/dev/shm`` that both
processes map, and only the message's header crosses their socket.

Used on TLS meshes, where a 0.8 MB gradient otherwise costs each end a
cipher pass a step: bytes that never leave the host need no cipher, and
nothing they carry travels on any network.

* A lane is one direction of one pair. Its sender creates the file (mode
  0600, a random name, ``O_EXCL``, its space reserved so a full ``/dev/shm``
  fails at set-up and not with ``SIGBUS`` later) and offers its name over
  the already authenticated (TLS) socket with a random nonce it wrote at the
  file's start. The receiver maps it only if the name has the lane pattern,
  the file is a regular file of this user with no other permission bits, its
  size is the offered one, the nonce matches and both processes share one
  network namespace (so a lane never bypasses a link a namespace shapes).
  The file is unlinked once the receiver has answered; the mappings stay.
* Two slots written alternately. A sender writes message k into slot
  ``k % 2`` and then sends the header; it writes slot ``k % 2`` again only
  for message k + 2, which it sends after receiving the peer's message
  k + 1, which the peer sends after it copied message k out. This holds
  because every mesh call exchanges one message each way with every peer.
"""
from __future__ import annotations

import mmap
import os
import re
import secrets
import stat

SHM_DIR = "/dev/shm"
_ALIGN = 64
_NONCE_BYTES = 16
_NAME = re.compile(r"dmlcore-lane-[0-9a-f]{32}")


def _aligned(n):
    return -(-n // _ALIGN) * _ALIGN


def _network_namespace():
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None


def lanes_available():
    """Whether this process can make lanes (Linux with a ``/dev/shm``)."""
    return os.path.isdir(SHM_DIR) and _network_namespace() is not None


def fits_slot(raws, slot_bytes):
    """Whether buffers ``raws`` fit one slot of ``slot_bytes`` (each aligned to 64 bytes)."""
    return sum(_aligned(memoryview(r).nbytes) for r in raws) <= slot_bytes


class OutLane:
    """The sending end of a lane: ``offer()`` for the peer, ``write(raws)``
    per message (returns the slot written), ``unlink()`` once answered."""

    def __init__(self, slot_bytes):
        self.slot_bytes = _aligned(int(slot_bytes))
        self.size = _ALIGN + 2 * self.slot_bytes
        self.name = f"dmlcore-lane-{secrets.token_hex(16)}"
        self.nonce = secrets.token_bytes(_NONCE_BYTES)
        self._path = os.path.join(SHM_DIR, self.name)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.size)
            self._map = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            os.unlink(self._path)
            raise
        os.close(fd)
        self._map[:_NONCE_BYTES] = self.nonce
        self._view = memoryview(self._map)
        self._count = 0

    def offer(self):
        """What the peer needs to map this lane (travels over the TLS socket)."""
        return {"name": self.name, "nonce": self.nonce.hex(), "slot_bytes": self.slot_bytes,
                "netns": _network_namespace()}

    def write(self, raws):
        """Copy ``raws`` (which ``fits_slot``) into the next slot; returns its index."""
        slot = self._count % 2
        pos = _ALIGN + slot * self.slot_bytes
        for raw in raws:
            src = memoryview(raw).cast("B")
            self._view[pos:pos + src.nbytes] = src
            pos += _aligned(src.nbytes)
        self._count += 1
        return slot

    def unlink(self):
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None

    def close(self):
        self.unlink()
        if self._map is not None:
            self._view.release()
            self._map.close()
            self._map = None


class InLane:
    """The receiving end: ``InLane.open(offer)`` maps the peer's lane, or
    returns None where it cannot be used (another host, namespace or user,
    or an offer that does not check out); ``read(slot, lengths, into)``."""

    def __init__(self, mapping, slot_bytes):
        self._map, self.slot_bytes = mapping, slot_bytes
        self._view = memoryview(mapping)

    @classmethod
    def open(cls, offer):
        try:
            name, nonce = str(offer["name"]), bytes.fromhex(offer["nonce"])
            slot_bytes = int(offer["slot_bytes"])
        except (TypeError, KeyError, ValueError):
            return None
        if (not _NAME.fullmatch(name) or offer.get("netns") != _network_namespace()
                or slot_bytes <= 0 or slot_bytes % _ALIGN):
            return None
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None                     # not this host's /dev/shm
        try:
            info = os.fstat(fd)
            if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid()
                    or info.st_mode & 0o077 or info.st_size != _ALIGN + 2 * slot_bytes):
                return None
            mapping = mmap.mmap(fd, info.st_size, prot=mmap.PROT_READ)
        except OSError:
            return None
        finally:
            os.close(fd)
        if mapping[:_NONCE_BYTES] != nonce:
            mapping.close()
            return None
        return cls(mapping, slot_bytes)

    def read(self, slot, lengths, into):
        """Copy the buffers of ``lengths`` bytes from ``slot`` into ``into``
        (writable buffers of those sizes)."""
        if slot not in (0, 1) or sum(_aligned(n) for n in lengths) > self.slot_bytes:
            raise ValueError("a lane message that does not fit its slot")
        pos = _ALIGN + slot * self.slot_bytes
        for n, target in zip(lengths, into):
            memoryview(target).cast("B")[:] = self._view[pos:pos + n]
            pos += _aligned(n)

    def close(self):
        if self._map is not None:
            self._view.release()
            self._map.close()
            self._map = None
