"""benchmarks/netns.py really shapes links, runs a fit, and leaves nothing behind.

A WAN-profile link is measured from inside its namespace with a TCP echo and
a bulk send to a listener on the bridge: the round trip must be at least the
profile's RTT and the throughput at most its rate (a small allowance for the
token bucket's burst); links built without the delay line take a rate and
refuse a delay they cannot give. A fit over a 2-worker cluster (one a 2x straggler)
trains, and afterwards no namespace, link, cgroup or process of the harness
remains. One ``bench_network.py --smoke`` run writes its JSON. Needs root
and iproute2; skipped with the reason otherwise.
"""
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import FASHION_MNIST_SKIP, fashion_mnist_available

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import netns  # noqa: E402

REASON = netns.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=str(REASON))]

_CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(5):
    t = time.perf_counter(); s.sendall(b"x"); s.recv(1); rtts.append(time.perf_counter() - t)
n, buf, sent = int(sys.argv[3]), b"\0" * 65536, 0
t = time.perf_counter()
while sent < n:
    s.sendall(buf); sent += len(buf)
s.shutdown(socket.SHUT_WR); s.recv(1)
print(min(rtts) * 1000, sent * 8 / (time.perf_counter() - t) / 1e6)
"""


def _echo_and_sink(server):
    conn, _ = server.accept()
    conn.settimeout(30)
    with conn:
        for _ in range(5):
            conn.sendall(conn.recv(1))
        while conn.recv(1 << 20):
            pass
        conn.sendall(b"k")


def measure(net, host, nbytes=2 << 20):
    """(min RTT in ms, throughput in Mbit/s) from ``host`` to the bridge's address."""
    with socket.socket() as server:
        server.bind((net.gateway, 0))
        server.listen(1)
        server.settimeout(30)
        th = threading.Thread(target=_echo_and_sink, args=(server,), daemon=True)
        th.start()
        out = subprocess.run([*net.hosts[host].prefix, sys.executable, "-c", _CLIENT,
                              net.gateway, str(server.getsockname()[1]), str(nbytes)],
                             capture_output=True, text=True, timeout=60, check=True)
        th.join(30)
    rtt, mbit = map(float, out.stdout.split())
    return rtt, mbit


def leftovers(tag):
    """Names carrying ``tag`` still present: namespaces, links, cgroups."""
    found = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                       text=True, timeout=30).stdout.split() if tag in n]
    found += [line for line in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                              text=True, timeout=30).stdout.splitlines()
              if tag in line]
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu")):
        found += [str(p) for p in root.glob(f"{tag}*")]
    return found


def test_wan_profile_delays_and_limits_the_link():
    wan = netns.PROFILES["wan"]
    rate_only = netns.Profile("rate-only", rate_mbit=wan.rate_mbit)   # no delay: TCP fills it
    with netns.network(["h"]) as net:
        rtt_plain, mbit_plain = measure(net, "h", 4 << 20)
        net.shape("h", "wan")
        rtt, _ = measure(net, "h")
        net.shape("h", rate_only)
        _, mbit = measure(net, "h", 4 << 20)
        tag = net.tag
    assert rtt_plain < wan.rtt_ms / 4 and mbit_plain > 2 * wan.rate_mbit, (rtt_plain, mbit_plain)
    assert rtt >= wan.rtt_ms * 0.98, (rtt, net.link_kind)
    assert mbit <= wan.rate_mbit * 1.1, (mbit, net.link_kind)
    assert leftovers(tag) == []


def test_links_without_delay_line_take_a_rate_and_refuse_a_delay():
    """``userspace=False``: veth pairs (or netem where the kernel has it), no frame shuttle."""
    wan = netns.PROFILES["wan"]
    with netns.network(["h"], userspace=False) as net:
        assert net.link_kind in ("veth", "netem")
        assert net.hosts["h"].shuttle is None
        rtt_plain, _ = measure(net, "h")
        net.shape("h", netns.Profile("rate-only", rate_mbit=wan.rate_mbit))
        _, mbit = measure(net, "h", 4 << 20)
        if net.link_kind == "veth":
            with pytest.raises(RuntimeError, match="needs a delay or loss"):
                net.shape("h", "wan")
        tag = net.tag
    assert rtt_plain < wan.rtt_ms / 4, rtt_plain
    assert mbit <= wan.rate_mbit * 1.1, mbit
    assert leftovers(tag) == []


def test_fit_over_the_harness_then_nothing_left():
    import dmlcore as dml
    from distributed import Client

    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 20)).astype(np.float32)
    y = (X[:, :4].sum(1) > 0).astype(np.int64)
    with netns.cluster(2, "lan", straggler=2) as cl:
        pids = [p.pid for p in cl.processes.values()]
        tag = cl.network.tag
        assert cl.straggler_kind is not None
        # an unshaped cluster has nothing to delay: no frame shuttle on its links
        assert cl.network.link_kind != "userspace delay line"
        assert all(h.shuttle is None for h in cl.network.hosts.values())
        with Client(cl.address, timeout=30) as client:
            hosts = sorted(w.split("//")[1].split(":")[0]
                           for w in client.scheduler_info()["workers"])
            assert hosts == sorted(h.ip for h in cl.workers)
            data = dml.partition(X, y, n_partitions=2, seed=0, client=client)
            res = dml.fit(dml.models.MLP([20, 32, 2]), data, dml.SyncSGD(batch_size=50),
                          dml.optim.Adam(lr=0.01), epochs=2, eval_data=(X, y), client=client,
                          progress=False, timeout=30)
    assert float(res.history.eval_accuracy.dropna("step")[-1]) > 0.8
    assert leftovers(tag) == []
    assert [p for p in pids if Path(f"/proc/{p}").exists()] == []


@pytest.mark.skipif(not fashion_mnist_available(), reason=FASHION_MNIST_SKIP)
def test_bench_network_smoke(tmp_path):
    out = tmp_path / "net.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_network.py"),
                           "--smoke", "--profiles", "lan", "--cases", "sync,ps-async",
                           "--budget", "2", "--lbfgs", "2000", "--straggler", "3",
                           "--straggler-cases", "sync", "--side-budget", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [r["case"] for r in runs] == ["sync", "ps-async", "lbfgs-logistic", "sync"]
    assert [r["straggler"] for r in runs] == [None, None, None, 3.0]
    assert [r.get("budget_s") for r in runs] == [2.0, 2.0, None, 1.0]   # --side-budget
    assert result["straggler_kind"].startswith("compute")
    assert result["link_kind"]["lan"] in ("veth", "netem")
    assert all("error" not in r for r in runs), runs
    assert all(0.0 <= r["final_acc"] <= 1.0 for r in runs)
