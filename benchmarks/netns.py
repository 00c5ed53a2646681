"""A shaped network for a real dask cluster: namespaces, a bridge, tc link profiles.

``network(names)`` builds one network namespace per host, each joined to a
bridge in this (the driver's) namespace; ``Network.shape(host, profile)`` sets
a host's link: the rate by ``tc tbf``, the delay and loss by ``tc netem``
when the kernel has it, else by a userspace delay line (one process per host
shuttling frames between two tap devices; ``Network.link_kind`` says which).
The delay is half the RTT in each direction; loss applies in each direction.
A cluster for an unshaped profile (lan) runs on plain veth pairs whatever the
kernel has: the delay line would put a Python process on every frame's path
(it made SyncSGD's LAN steps about 5 times slower).
``cluster(n_workers, profile, straggler=f)`` runs a ``dask scheduler`` and
``n_workers`` single-threaded ``dask worker`` processes, each in its own
namespace; the profile shapes the workers' links only (the scheduler's is
plain), so a worker-to-worker path crosses two shaped links. A straggler is
worker 0 held to 1/f of a CPU: a cgroup v2 ``cpu.max`` quota, else a cgroup
v1 ``cpu.cfs_quota_us``, else a SIGSTOP/SIGCONT duty cycle
(``Cluster.straggler_kind``). Everything the harness makes carries a unique
tag and is removed on exit, error or not: processes by PID, cgroups,
links, namespaces, bridge. Every wait has a deadline. ``unavailable()``
returns why namespaces cannot be made here (None when they can).
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    """A link: rate in Mbit/s (None: unshaped), round-trip delay in ms, loss in percent."""
    name: str
    rate_mbit: float | None = None
    rtt_ms: float = 0.0
    loss_pct: float = 0.0

    @property
    def shaped(self):
        return self.rate_mbit is not None or self.rtt_ms > 0 or self.loss_pct > 0


PROFILES = {"lan": Profile("lan"), "wan": Profile("wan", 50.0, 40.0, 0.0),
            "edge": Profile("edge", 10.0, 100.0, 0.1)}


def _profile(profile):
    """A Profile, or the one of PROFILES a name gives."""
    return PROFILES[profile] if isinstance(profile, str) else profile
_COUNTER = itertools.count()
_WAIT = 30.0                                   # default deadline of any one wait, seconds


def _run(*cmd, check=True, timeout=_WAIT):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=check,
                          timeout=timeout)


def unavailable():
    """Why network namespaces cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2)"
    return None


def _has_qdisc(kind, args=()):
    tag = f"dq{os.getpid() % 100000:05d}{next(_COUNTER) % 100:02d}"
    try:
        _run("ip", "link", "add", tag + "a", "type", "veth", "peer", "name", tag + "b")
        return _run("tc", "qdisc", "add", "dev", tag + "a", "root", kind, *args,
                    check=False).returncode == 0
    finally:
        _run("ip", "link", "del", tag + "a", check=False)


def _free_subnet():
    used = _run("ip", "-o", "addr").stdout
    for third in itertools.chain(range(os.getpid() % 200 + 20, 250), range(20, 250)):
        if f"10.79.{third}." not in used:
            return f"10.79.{third}"
    raise RuntimeError("no free 10.79.x.0/24 subnet for the bridge")


@dataclass
class Host:
    """One namespace on the bridge: its name, address, and the interfaces of its link."""
    name: str
    netns: str
    ip: str
    outside: str          # the bridge port (root namespace)
    inside: str           # the host's interface (in its namespace)
    profile: Profile = PROFILES["lan"]
    shuttle: subprocess.Popen | None = None

    @property
    def prefix(self):
        """Command prefix that runs a command in this host's namespace."""
        return ["ip", "netns", "exec", self.netns]


@dataclass
class Network:
    """The bridge, its address (the driver's), the hosts and how links are shaped."""
    tag: str
    bridge: str
    gateway: str
    link_kind: str                       # "netem", "userspace delay line" or "veth"
    hosts: dict = field(default_factory=dict)

    def shape(self, name, profile):
        """Set host ``name``'s link to ``profile`` (a Profile or a key of PROFILES), both ways."""
        profile = _profile(profile)
        host = self.hosts[name]
        if self.link_kind == "veth" and (profile.rtt_ms > 0 or profile.loss_pct > 0):
            raise RuntimeError(
                f"profile {profile.name!r} needs a delay or loss, which this network cannot "
                "give: the kernel has no netem and it was built without the userspace "
                "delay line (build it with userspace=None)")
        for prefix, dev in (([], host.outside), (host.prefix, host.inside)):
            _run(*prefix, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            if not profile.shaped:
                continue
            half, tbf = profile.rtt_ms / 2, []
            if profile.rate_mbit is not None:
                burst = max(16_000, int(profile.rate_mbit * 1e6 / 8 / 250))   # 4 ms of tokens
                tbf = ["tbf", "rate", f"{profile.rate_mbit}mbit", "burst", str(burst),
                       "latency", "50ms"]
            if self.link_kind == "netem":
                _run(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                     "delay", f"{half}ms", "loss", f"{profile.loss_pct}%", "limit", "100000")
                if tbf:
                    _run(*prefix, "tc", "qdisc", "add", "dev", dev, "parent", "1:1",
                         "handle", "10:", *tbf)
            elif tbf:
                _run(*prefix, "tc", "qdisc", "add", "dev", dev, "root", *tbf)
        if host.shuttle is not None:
            host.shuttle.stdin.write(f"{profile.rtt_ms / 2} {profile.loss_pct}\n")
            host.shuttle.stdin.flush()
        host.profile = profile

    def qdiscs(self, name):
        """``tc qdisc show`` of both ends of host ``name``'s link (for checks and reports)."""
        host = self.hosts[name]
        return (_run("tc", "qdisc", "show", "dev", host.outside).stdout
                + _run(*host.prefix, "tc", "qdisc", "show", "dev", host.inside).stdout)


def _kill(proc, grace=10.0):
    """End one process this harness started: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=grace)


@contextlib.contextmanager
def network(names, *, userspace=None):
    """Namespaces ``names`` behind one bridge; yields a ``Network`` (all links unshaped).

    ``userspace``: force (True) or forbid (False) the userspace delay line;
    None uses netem when the kernel has it. Without either (False on a kernel
    without netem) the links are plain veth pairs (``link_kind`` "veth"): they
    take a rate but no delay or loss. Raises RuntimeError naming the reason
    where namespaces cannot be made. Removes everything on exit.
    """
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    netem = userspace is not True and _has_qdisc("netem", ["delay", "1ms"])
    if userspace is None:
        userspace = not netem
    tag = f"dn{os.getpid() % 100000:05d}{next(_COUNTER) % 100:02d}"
    subnet = _free_subnet()
    net = Network(tag, f"{tag}br", f"{subnet}.1",
                  "userspace delay line" if userspace else "netem" if netem else "veth")
    made_links, made_ns = [net.bridge], []
    try:
        _run("ip", "link", "add", net.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{net.gateway}/24", "dev", net.bridge)
        _run("ip", "link", "set", net.bridge, "up")
        for i, name in enumerate(names):
            ns, outside, inside = f"{tag}-{name}", f"{tag}{i}o", f"{tag}{i}i"
            host = Host(name, ns, f"{subnet}.{i + 2}", outside, inside)
            _run("ip", "netns", "add", ns)
            made_ns.append(ns)
            if userspace:
                for dev in (outside, inside):
                    _run("ip", "tuntap", "add", "dev", dev, "mode", "tap")
                    made_links.append(dev)
                _run("ip", "link", "set", inside, "netns", ns)
                host.shuttle = subprocess.Popen(
                    [sys.executable, __file__, "shuttle", outside, ns, inside],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                _wait_line(host.shuttle, "ready")
            else:
                _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
                made_links.append(outside)
                _run("ip", "link", "set", inside, "netns", ns)
            _run("ip", "link", "set", outside, "master", net.bridge)
            _run("ip", "link", "set", outside, "up")
            _run(*host.prefix, "ip", "addr", "add", f"{host.ip}/24", "dev", inside)
            _run(*host.prefix, "ip", "link", "set", inside, "up")
            _run(*host.prefix, "ip", "link", "set", "lo", "up")
            net.hosts[name] = host
        yield net
    finally:
        for host in net.hosts.values():
            if host.shuttle is not None:
                _kill(host.shuttle)
        for ns in made_ns:
            _run("ip", "netns", "del", ns, check=False)
        for dev in made_links:
            _run("ip", "link", "del", dev, check=False)


def _wait_line(proc, word, deadline=_WAIT):
    """Wait (at most ``deadline`` s) for ``proc`` to print a line starting with ``word``."""
    out = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(deadline)
    if not out or not out[0].startswith(word):
        _kill(proc)
        raise RuntimeError(f"the delay line did not start within {deadline} s: {out}")


# --- straggler ------------------------------------------------------------------------------

def _cgroup_dir(tag, factor):
    """A new cgroup holding a process to 1/``factor`` of a CPU: (path, kind), or (None, None)."""
    period = 100_000
    quota = int(period / factor)
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists() and "cpu" in (v2 / "cgroup.subtree_control").read_text():
        d = v2 / tag
        try:
            d.mkdir()
            (d / "cpu.max").write_text(f"{quota} {period}")
            return d, f"cgroup v2 cpu.max {quota} {period}"
        except OSError:
            with contextlib.suppress(OSError):
                d.rmdir()
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        d = v1 / tag
        try:
            d.mkdir()
            (d / "cpu.cfs_period_us").write_text(str(period))
            (d / "cpu.cfs_quota_us").write_text(str(quota))
            return d, f"cgroup v1 cpu.cfs_quota_us {quota}/{period}"
        except OSError:
            with contextlib.suppress(OSError):
                d.rmdir()
    return None, None


def _remove_cgroup(d, deadline=_WAIT):
    end = time.monotonic() + deadline
    while True:
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


class _DutyCycle(threading.Thread):
    """Stops process ``pid`` (and its children) for all but 1/factor of each 100 ms."""

    def __init__(self, pid, factor):
        super().__init__(daemon=True)
        self.pid, self.factor, self.halt = pid, factor, threading.Event()

    def _tree(self):
        pids, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            pids.append(p)
            for task in Path(f"/proc/{p}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in task.read_text().split()]
        return pids

    def _signal(self, sig):
        for p in self._tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)

    def run(self):
        run_for = 0.1 / self.factor
        while not self.halt.is_set():
            self._signal(signal.SIGCONT)
            if self.halt.wait(run_for):
                break
            self._signal(signal.SIGSTOP)
            self.halt.wait(0.1 - run_for)
        self._signal(signal.SIGCONT)


# --- the cluster ----------------------------------------------------------------------------

@dataclass
class Cluster:
    """A running cluster: scheduler address, its network, the workers' hosts and processes."""
    address: str
    network: Network
    workers: list
    processes: dict
    straggler_kind: str | None
    logdir: Path

    def shape(self, profile):
        """Set every worker's link to ``profile``."""
        for host in self.workers:
            self.network.shape(host.name, profile)


@contextlib.contextmanager
def cluster(n_workers, profile="lan", *, straggler=None, shape_now=True, logdir=None,
            memory_limit="2GiB", start_deadline=90.0, userspace=None):
    """A ``dask scheduler`` and ``n_workers`` workers, each in its own namespace.

    Yields a ``Cluster`` once every worker has joined (RuntimeError after
    ``start_deadline`` s). ``profile`` shapes each worker's link, at once or,
    with ``shape_now=False``, when ``Cluster.shape(profile)`` is called (so
    data can be placed first). ``straggler=f`` (f > 1) slows worker 0 to 1/f
    of a CPU. Logs go to ``logdir`` (a temporary folder by default, removed).
    ``userspace`` as for ``network``, except that None with an unshaped
    ``profile`` builds plain veth links (no delay line to cross).
    """
    if userspace is None and not _profile(profile).shaped:
        userspace = False
    names = ["sched"] + [f"w{i}" for i in range(n_workers)]
    bindir = Path(sys.executable).parent
    own_logdir = logdir is None
    logdir = Path(tempfile.mkdtemp(prefix="dmlnet-")) if own_logdir else Path(logdir)
    procs, logs, cgroup, duty, kind = {}, [], None, None, None
    with network(names, userspace=userspace) as net:
        try:
            sched = net.hosts["sched"]
            info = logdir / "scheduler.json"
            info.unlink(missing_ok=True)

            def start(name, cmd):
                log = open(logdir / f"{name}.log", "ab")
                logs.append(log)
                procs[name] = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=logdir)

            start("sched", [*sched.prefix, bindir / "dask", "scheduler", "--host", sched.ip,
                            "--port", "0", "--dashboard-address", ":0",
                            "--scheduler-file", info])
            address, end = None, time.monotonic() + start_deadline
            while address is None:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    address = json.loads(info.read_text())["address"]
                if address is None:
                    if time.monotonic() > end or procs["sched"].poll() is not None:
                        raise RuntimeError(f"the dask scheduler did not start; see {logdir}")
                    time.sleep(0.2)
            if straggler:
                cgroup, kind = _cgroup_dir(f"{net.tag}-straggler", float(straggler))
            workers = [net.hosts[f"w{i}"] for i in range(n_workers)]
            for i, host in enumerate(workers):
                cmd = [*host.prefix, bindir / "dask", "worker", address, "--nthreads", "1",
                       "--nworkers", "1", "--memory-limit", memory_limit, "--no-dashboard",
                       "--name", f"w{i}", "--host", host.ip]
                if i == 0 and cgroup is not None:          # join the cgroup, then exec
                    cmd = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"',
                           "sh", *cmd]
                start(host.name, [str(c) for c in cmd])
            if straggler and cgroup is None:
                duty = _DutyCycle(procs["w0"].pid, float(straggler))
                duty.start()
                kind = f"SIGSTOP/SIGCONT duty cycle 1/{straggler} of each 100 ms"
            from distributed import Client

            with Client(address, timeout=30) as client:
                client.wait_for_workers(n_workers, timeout=max(1.0, end - time.monotonic()))
            result = Cluster(address, net, workers, procs, kind, logdir)
            if shape_now:
                result.shape(profile)
            yield result
        finally:
            if duty is not None:
                duty.halt.set()
                duty.join(_WAIT)
            for proc in reversed(list(procs.values())):
                _kill(proc)
            for log in logs:
                log.close()
            if cgroup is not None:
                _remove_cgroup(cgroup)
            if own_logdir:
                shutil.rmtree(logdir, ignore_errors=True)


# --- the userspace delay line (run as: python netns.py shuttle OUTSIDE NETNS INSIDE) ---------

def _open_tap(name):
    import fcntl
    import struct

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0002 | 0x1000))  # TAP|NO_PI
    return fd


def _shuttle(outside, netns, inside):
    """Forward frames between two taps, each direction delayed and thinned as stdin says."""
    import collections
    import random
    import select

    a = _open_tap(outside)
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{netns}") as f:
        if libc.setns(f.fileno(), 0x40000000) != 0:              # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), "setns")
    b = _open_tap(inside)
    print("ready", flush=True)
    rng, delay, loss = random.Random(0), 0.0, 0.0
    peer = {a: b, b: a}
    queues = {a: collections.deque(), b: collections.deque()}      # keyed by the output fd
    ctl = sys.stdin.fileno()
    os.set_blocking(ctl, False)
    pending = ""
    while True:
        now = time.monotonic()
        due = [q[0][0] for q in queues.values() if q]
        wait = max(0.0, min(due) - now) if due else 1.0
        ready, _, _ = select.select([a, b, ctl], [], [], wait)
        now = time.monotonic()
        for fd in ready:
            if fd == ctl:
                chunk = os.read(ctl, 4096).decode()
                if not chunk:
                    return                                        # the harness has gone
                pending += chunk
                while "\n" in pending:
                    line, pending = pending.split("\n", 1)
                    delay_ms, loss_pct = map(float, line.split())
                    delay, loss = delay_ms / 1000.0, loss_pct / 100.0
                continue
            out = queues[peer[fd]]
            for _ in range(256):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if loss and rng.random() < loss:
                    continue
                out.append((now + delay, frame))
        now = time.monotonic()
        for fd, q in queues.items():
            while q and q[0][0] <= now:
                with contextlib.suppress(OSError):
                    os.write(fd, q.popleft()[1])


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "shuttle":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _shuttle(*sys.argv[2:])
