"""Two "hosts": `dask worker` processes in two network namespaces behind a bridge.

The driver and the `dask scheduler` stay in this namespace (10.77.x.1); each
worker runs in its own namespace with its own address, so the executors'
channels (driver -> worker) and peer mesh (worker <-> worker) cross real
interfaces, not loopback. Needs root and iproute2; skipped otherwise. The
fixture removes the namespaces, the bridge and the processes at teardown.
"""
import os
import shutil
import subprocess

import numpy as np
import pytest
from dask_processes import dask_cluster

from bytes_check import assert_payload
import dmlcore as dml

pytestmark = pytest.mark.slow           # two network namespaces, real dask processes


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    tag = f"{os.getpid() % 10000}"
    subnet = f"10.77.{os.getpid() % 200 + 20}"
    bridge, namespaces = f"dmlbr{tag}", [f"dmlns{tag}a", f"dmlns{tag}b"]
    try:
        try:
            _ip("link", "add", bridge, "type", "bridge")
            _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
            _ip("link", "set", bridge, "up")
            for i, ns in enumerate(namespaces):
                _ip("netns", "add", ns)
                outside, inside = f"dmlv{tag}{i}o", f"dmlv{tag}{i}i"
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                _ip("link", "set", inside, "netns", ns)
                _ip("link", "set", outside, "master", bridge)
                _ip("link", "set", outside, "up")
                _ip("netns", "exec", ns, "ip", "addr", "add", f"{subnet}.{i + 2}/24",
                    "dev", inside)
                _ip("netns", "exec", ns, "ip", "link", "set", inside, "up")
                _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot build the namespaces here: {' '.join(exc.cmd)}: "
                        f"{exc.stderr.strip()}")

        workers = [(["ip", "netns", "exec", ns], f"{subnet}.{i + 2}")
                   for i, ns in enumerate(namespaces)]
        with dask_cluster(tmp_path_factory.mktemp("netns-logs"), workers,
                          scheduler_host=f"{subnet}.1", memory_limit="1GiB") as address:
            yield address, subnet
    finally:
        for ns in namespaces:
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", bridge, check=False)


def test_replicated_sgd_across_two_hosts(two_hosts):
    from distributed import Client

    address, subnet = two_hosts
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 20)).astype(np.float32)
    y = (X[:, :4].sum(1) > 0).astype(np.int64) + (X[:, 4] > 0.8)
    model = dml.models.MLP([20, 4096, 3])      # 393 kB: two hosts keep the full exchange
    with Client(address, timeout=30) as client:
        hosts = sorted(w.split("//")[1].split(":")[0] for w in client.scheduler_info()["workers"])
        assert hosts == [f"{subnet}.2", f"{subnet}.3"]
        data = dml.partition(X, y, n_partitions=4, seed=0, client=client)
        runs = {apply_on: dml.fit(model, data, dml.SyncSGD(batch_size=50, apply_on=apply_on),
                                  dml.optim.Adam(lr=0.01), epochs=3, eval_data=(X, y),
                                  client=client, progress=False)
                for apply_on in ("driver", "workers")}
    a, b = runs["driver"], runs["workers"]
    np.testing.assert_array_equal(a.params, b.params)
    assert b.info["replica_exchange"] == "full"         # one round trip across the link
    assert_payload(b.history.bytes_sent.values[1], 2 * model.n_params * 4, 2)   # the peer exchange
    assert float(b.history.eval_accuracy.dropna("step")[-1]) > 0.8
