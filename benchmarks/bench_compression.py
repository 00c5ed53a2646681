"""Gradient compression on the Fashion-MNIST MLP: bytes per step and accuracy.

The 784-256-10 MLP trains with ``SyncSGD(batch_size=64, compression=c)`` on a
2-worker LocalCluster (2 partitions), SGD(lr 0.1, momentum 0.9), ``--epochs``
epochs, seed 0 (``--seed``), once per compression: None, "float16", "int8",
{"topk": 0.01} (error feedback and, with SGD momentum, momentum correction:
the default) and the same top-k with error feedback only
(``"momentum_correction": False``). Per run: the median of the history's
``bytes_sent`` over the training steps (both workers together, what crossed
the transport, framing included), how many times fewer bytes than without
compression, the test accuracy at the end and its change against the
uncompressed run, and the fit's wall time. The README's Compression table
is generated from these figures (``benchmarks/readme.py``).

    python benchmarks/bench_compression.py              # 10 epochs, 60,000 rows
    python benchmarks/bench_compression.py --small      # 6,000 rows, 1 epoch (smoke)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout
from benchmarks.runner import figure  # noqa: E402 - the runner's figure records

COMPRESSIONS = {"none": None, "float16": "float16", "int8": "int8", "topk 1%": {"topk": 0.01},
                "topk 1% EF only": {"topk": 0.01, "momentum_correction": False}}


def run(argv=None):
    """Train once per compression; print a table; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="6,000 rows, 1 epoch")
    parser.add_argument("--seed", type=int, default=0, help="the fits' seed (batches, int8)")
    args = parser.parse_args(argv)
    from dask.distributed import Client

    import dmlcore as dml
    from dmlcore.cluster import local_cluster

    X, y = dml.datasets.fashion_mnist("train")
    Xt, yt = dml.datasets.fashion_mnist("test")
    epochs = args.epochs
    if args.small:
        X, y, Xt, yt, epochs = X[:6000], y[:6000], Xt[:1000], yt[:1000], 1
    print(f"== MLP 784-256-10, SyncSGD(batch_size=64) on 2 workers, SGD(lr 0.1, momentum 0.9), "
          f"{len(X)} rows, {epochs} epochs, seed {args.seed}")
    rows = {}
    with local_cluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as client:
        data = dml.partition(X, y, n_partitions=2, seed=0, client=client)
        model = dml.models.MLP([X.shape[1], 256, 10])
        for name, compression in COMPRESSIONS.items():
            t = time.perf_counter()
            fit = dml.fit(model, data, dml.SyncSGD(batch_size=64, compression=compression),
                          dml.optim.SGD(lr=0.1, momentum=0.9), epochs=epochs, client=client,
                          progress=False, seed=args.seed)
            seconds = time.perf_counter() - t
            accuracy = float(np.mean(model.predict(fit.params, Xt).argmax(axis=1) == yt))
            rows[name] = (float(np.median(fit.history.bytes_sent.values)), accuracy, seconds)
    base_bytes, base_acc = rows["none"][:2]
    print(f"  {'compression':16s} {'bytes/step':>12s} {'fewer':>7s} {'accuracy':>9s} "
          f"{'change':>8s} {'seconds':>8s}")
    figures = [figure("rows", len(X), "rows"), figure("epochs", epochs, "epochs")]
    for name, (nbytes, accuracy, seconds) in rows.items():
        print(f"  {name:16s} {nbytes:12,.0f} {base_bytes / nbytes:6.1f}x {accuracy:9.4f} "
              f"{accuracy - base_acc:+8.4f} {seconds:8.1f}")
        figures += [figure(f"{name}: bytes per step", nbytes, "bytes"),
                    figure(f"{name}: fewer bytes", base_bytes / nbytes, "x", peer="none"),
                    figure(f"{name}: test accuracy", accuracy, "accuracy"),
                    figure(f"{name}: accuracy change", accuracy - base_acc, "accuracy",
                           peer="none"),
                    figure(f"{name}: fit time", seconds, "s")]
    return figures


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
