"""The data plane on TLS against TCP: the same SyncSGD runs on a tcp:// and a
tls:// LocalCluster (2 workers x 1 thread each, certificates from ``openssl``
in a temporary directory), driven from this process.

1. Step overhead: 16 tiny partitions (100 x 10), full batch, driver-side
   updates (one channel round per step) and mini-batches with the replicated
   optimizer (one peer exchange per step). Goal: TLS <= 1.5 x TCP.
2. The Fashion-MNIST ``dml.MLPClassifier(hidden_layer_sizes=(256,))`` fit with
   its defaults (partitioning inside the timed fit). Goal: TLS <= 1.3 x TCP.
   ``--small``: 6,000 rows; without the Debian data, synthetic 784-feature rows.
Both clusters stay up and the runs alternate between them (``--repeat``
rounds; the fastest run of each case is shown), so load drifting on a shared
host does not land on one protocol.
Bytes per step: what crossed the loopback interface (``/proc/net/dev``, both
directions, Dask's own traffic included) during the timed fit, over its steps.

    python benchmarks/bench_tls.py            # needs the openssl command
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                   # run from a checkout
sys.path.insert(0, str(ROOT / "tests"))         # tls_certs: the tests' certificate helper


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout
from benchmarks.runner import figure  # noqa: E402 - the runner's figure records


def _loopback_bytes():
    """Bytes received + sent on ``lo`` so far (Linux), or None."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                fields = rest.split()
                return int(fields[0]) + int(fields[8])
    except OSError:
        pass
    return None


def _cluster(protocol, workdir):
    from distributed import Client, LocalCluster

    from tls_certs import cluster_security

    kwargs = {}
    if protocol == "tls":
        security = cluster_security(workdir)
        kwargs = {"protocol": "tls", "security": security}
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, **kwargs)
    return cluster, Client(cluster, **({"security": kwargs["security"]} if kwargs else {}))


def _timed_fit(dml, client, model, data, strategy, steps):
    """(median seconds per step, loopback bytes per step) of a fit after a warm-up."""
    opt = dml.optim.SGD(lr=0.01)
    dml.fit(model, data, strategy, opt, steps=3, client=client, progress=False)
    before = _loopback_bytes()
    result = dml.fit(model, data, strategy, opt, steps=steps, client=client, progress=False)
    after = _loopback_bytes()
    per_step = float(np.median(np.diff(result.history.wall_time.values)))
    wire = (after - before) / steps if before is not None else float("nan")
    return per_step, wire


def _fashion(small):
    import dmlcore as dml

    try:
        X, y = dml.datasets.fashion_mnist("train")
        Xt, yt = dml.datasets.fashion_mnist("test")
        source = "Fashion-MNIST"
    except (FileNotFoundError, OSError):
        rng = np.random.default_rng(0)
        X = rng.random((12000, 784), dtype=np.float32)
        y = (X[:, :10].argmax(axis=1)).astype(np.int64)
        X, Xt, y, yt = X[:10000], X[10000:], y[:10000], y[10000:]
        source = "synthetic (Fashion-MNIST not installed)"
    if small:
        X, y, Xt, yt = X[:6000], y[:6000], Xt[:1000], yt[:1000]
    return source, X, y, Xt, yt


def run(argv=None):
    """Run and print as main() does; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--small", action="store_true", help="6000 rows, 1 epoch MLP")
    parser.add_argument("--skip-mlp", action="store_true")
    parser.add_argument("--repeat", type=int, default=2,
                        help="alternating runs of each case per protocol (the fastest is shown)")
    args = parser.parse_args(argv)

    import dmlcore as dml
    from dmlcore.estimators import MLPClassifier

    rng = np.random.default_rng(0)
    Xs = rng.normal(size=(1600, 10))
    ys = (rng.random(1600) < 0.5).astype(np.float64)
    source, X, y, Xt, yt = _fashion(args.small)
    mlp_params = {"max_iter": 1} if args.small else {}
    out = {}
    with tempfile.TemporaryDirectory() as workdir:
        # Both clusters stay up and the runs alternate (tcp, tls, tcp, tls...):
        # on a shared host the load drifts, and a ratio of neighbours is stable.
        clusters = {protocol: _cluster(protocol, workdir) for protocol in ("tcp", "tls")}
        try:
            small = {p: dml.partition(Xs, ys, n_partitions=16, seed=0, client=c)
                     for p, (_, c) in clusters.items()}
            model = dml.models.Logistic(10)
            for _ in range(args.repeat):
                for name, strategy in (
                        ("full batch, driver updates", dml.SyncSGD(batch_size=None)),
                        ("batch 16, replicated optimizer",
                         dml.SyncSGD(batch_size=16, apply_on="workers"))):
                    for protocol, (_, client) in clusters.items():
                        out.setdefault((protocol, name), []).append(_timed_fit(
                            dml, client, model, small[protocol], strategy, args.steps))
            del small
            for _ in range(0 if args.skip_mlp else args.repeat):
                for protocol, (_, client) in clusters.items():
                    clf = MLPClassifier(hidden_layer_sizes=(256,), random_state=0,
                                        client=client, **mlp_params)
                    before = _loopback_bytes()
                    t0 = time.perf_counter()
                    clf.fit(X, y)
                    seconds = time.perf_counter() - t0
                    steps = int(clf.history_.sizes["step"])
                    wire = ((_loopback_bytes() - before) / steps if before is not None
                            else float("nan"))
                    out.setdefault((protocol, "mlp"), []).append(
                        (seconds, wire, steps, float(clf.score(Xt, yt))))
        finally:
            for cluster, client in clusters.values():
                client.close()
                cluster.close()
    # the fastest of the repeats of each (the least disturbed run)
    out = {key: min(runs, key=lambda r: r[0]) for key, runs in out.items()}

    figures = []
    print("1. step overhead, 16 partitions of 100 x 10 on 2 workers "
          f"({args.steps} steps, median)")
    for name in ("full batch, driver updates", "batch 16, replicated optimizer"):
        (tcp, tcp_b), (tls, tls_b) = out["tcp", name], out["tls", name]
        print(f"   {name:32s} tcp {tcp * 1e3:6.2f} ms  tls {tls * 1e3:6.2f} ms  "
              f"ratio {tls / tcp:.2f} (goal <= 1.5); loopback bytes/step tcp {tcp_b:,.0f} "
              f"tls {tls_b:,.0f}")
        figures += [figure(f"{name}: tcp step", tcp * 1e3, "ms"),
                    figure(f"{name}: tls step", tls * 1e3, "ms"),
                    figure(f"{name}: tls / tcp step", tls / tcp, "x", peer="tcp")]
        if np.isfinite(tcp_b) and np.isfinite(tls_b):
            figures += [figure(f"{name}: tcp loopback bytes per step", tcp_b, "bytes"),
                        figure(f"{name}: tls loopback bytes per step", tls_b, "bytes")]
    if not args.skip_mlp:
        (tcp, tcp_b, steps, tcp_acc) = out["tcp", "mlp"]
        (tls, tls_b, _, tls_acc) = out["tls", "mlp"]
        print(f"2. MLPClassifier(256,) on {source}, {X.shape[0]} rows, {steps} steps:")
        print(f"   tcp {tcp:6.2f} s (accuracy {tcp_acc:.4f})  tls {tls:6.2f} s "
              f"(accuracy {tls_acc:.4f})  ratio {tls / tcp:.2f} (goal <= 1.3)")
        print(f"   loopback bytes/step tcp {tcp_b:,.0f}  tls {tls_b:,.0f} "
              f"({tls_b / tcp_b:.3f}x)")
        figures += [figure("MLP fit: tcp", tcp, "s"), figure("MLP fit: tls", tls, "s"),
                    figure("MLP fit: tcp test accuracy", tcp_acc, "accuracy"),
                    figure("MLP fit: tls test accuracy", tls_acc, "accuracy"),
                    figure("MLP fit: tls / tcp time", tls / tcp, "x", peer="tcp"),
                    figure("MLP fit: training rows", X.shape[0], "rows"),
                    figure("MLP fit: steps", steps, "steps")]
        if np.isfinite(tcp_b) and np.isfinite(tls_b):
            figures += [figure("MLP fit: tcp loopback bytes per step", tcp_b, "bytes"),
                        figure("MLP fit: tls loopback bytes per step", tls_b, "bytes")]
    return figures


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
