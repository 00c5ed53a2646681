#!/usr/bin/env python
"""Partial-layer training: bytes per step, speed and accuracy, last layer vs all layers.

A 2NN (784-200-200-10, relu) is pretrained briefly with SyncSGD on one half
of Fashion-MNIST's training set; it is then trained for the same number of
steps on the other half twice from the same pretrained parameters: all layers
(the peer), and only the last layer (``trainable=["layer2"]``). Printed: the
bytes sent per step (and the ratio, which should equal the trainable share of
the parameters), the test accuracy after each, seconds per step, and whether
the frozen layers stayed bit-identical. A kernel-level timing of
``model.loss_grad`` (in this process, one BLAS thread) shows what the early
stop of backpropagation saves: full gradient vs the last layer only vs the
middle layer.

``--small``: a smoke test (6000 rows, a few steps).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

import dmlcore as dml  # noqa: E402
from dmlcore.strategies.fedavg import FedAvg  # noqa: E402
from dmlcore.train import evaluate  # noqa: E402

SIZES = [784, 200, 200, 10]


from benchmarks.runner import figure  # noqa: E402 - the runner's figure records


def kernel_times(model, params, X, y, repeats):
    """Median seconds of one ``loss_grad`` for several trainable sets."""
    grad = np.empty_like(params)
    out = {}
    for label, trainable in (("all layers", None), ("layer2 (last)", ["layer2"]),
                             ("layer1 (middle)", ["layer1"])):
        model.loss_grad(params, X, y, grad, trainable=trainable)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model.loss_grad(params, X, y, grad, trainable=trainable)
            times.append(time.perf_counter() - t)
        out[label] = float(np.median(times))
    return out


def run(argv=None):
    """Run and print as main() does; return the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-epochs", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1, help="training epochs after pretraining")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--fedavg-rounds", type=int, default=5,
                    help="also FedAvg (C=0.5, E=1, B=10) rounds, full vs last layer; 0 = skip")
    ap.add_argument("--small", action="store_true", help="smoke test")
    args = ap.parse_args(argv)

    from distributed import Client

    from dmlcore.cluster import local_cluster

    X, y = dml.datasets.fashion_mnist("train")
    Xt, yt = dml.datasets.fashion_mnist("test")
    if args.small:
        X, y, Xt, yt = X[:6000], y[:6000], Xt[:2000], yt[:2000]
        args.fedavg_rounds = min(args.fedavg_rounds, 2)
    half = X.shape[0] // 2
    model = dml.models.MLP(SIZES)
    opt = lambda: dml.optim.SGD(lr=0.05, momentum=0.9)  # noqa: E731
    cluster = local_cluster(n_workers=2)
    client = Client(cluster)
    try:
        pre_data = dml.partition(X[:half], y[:half], args.partitions, seed=0, client=client)
        data = dml.partition(X[half:], y[half:], args.partitions, seed=1, client=client)
        t = time.perf_counter()
        pre = dml.fit(model, pre_data, dml.SyncSGD(batch_size=args.batch_size), opt(),
                      epochs=args.pretrain_epochs, client=client, progress=False)
        acc0 = evaluate(model, pre.params, Xt, yt)[1]
        print(f"pretrained {pre.steps} steps on {half} rows in {time.perf_counter() - t:.1f} s: "
              f"test accuracy {acc0:.4f}")
        rows = []
        for label, trainable in (("all layers", None), ("last layer", ["layer2"])):
            res = dml.fit(model, data, dml.SyncSGD(batch_size=args.batch_size,
                                                   trainable=trainable),
                          opt(), epochs=args.epochs, init_params=pre.params, client=client,
                          progress=False)
            h = res.history
            frozen_same = None
            if trainable is not None:
                mask = model.trainable_mask(trainable)
                frozen_same = bool(np.array_equal(res.params[~mask], pre.params[~mask]))
            wall = float(h["wall_time"].values[-1])
            rows.append(dict(strategy="SyncSGD", label=label, steps=res.steps,
                             bytes_per_step=float(h["bytes_sent"].mean()),
                             acc=evaluate(model, res.params, Xt, yt)[1],
                             s_per_step=wall / res.steps, frozen_same=frozen_same))
        if args.fedavg_rounds:
            fdata = dml.partition(X[half:], y[half:], 20, seed=1, client=client)
            for label, trainable in (("all layers", None), ("last layer", ["layer2"])):
                res = dml.fit(model, fdata, FedAvg(0.5, local_epochs=1, batch_size=10,
                                                   trainable=trainable),
                              dml.optim.SGD(lr=0.05), rounds=args.fedavg_rounds,
                              init_params=pre.params, client=client, progress=False)
                h = res.history
                wall = float(h["wall_time"].values[-1])
                frozen_same = None
                if trainable is not None:
                    mask = model.trainable_mask(trainable)
                    frozen_same = bool(np.array_equal(res.params[~mask], pre.params[~mask]))
                rows.append(dict(strategy="FedAvg(C=0.5,E=1,B=10), K=20", label=label,
                                 steps=res.steps, bytes_per_step=float(h["bytes_sent"].mean()),
                                 acc=evaluate(model, res.params, Xt, yt)[1],
                                 s_per_step=wall / res.steps, frozen_same=frozen_same))
    finally:
        client.close()
        cluster.close()

    share = model.trainable_mask(["layer2"]).sum() / model.n_params
    print(f"\nmodel {SIZES}: {model.n_params} parameters; last layer {share:.4%} of them")
    print("\n| strategy | trained | steps | bytes/step | ratio to full | test acc | s/step | "
          "frozen bit-identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        full = next(q for q in rows if q["strategy"] == r["strategy"] and q["label"] == "all layers")
        print(f"| {r['strategy']} | {r['label']} | {r['steps']} | {r['bytes_per_step']:.0f} | "
              f"{r['bytes_per_step'] / full['bytes_per_step']:.4f} | {r['acc']:.4f} | "
              f"{r['s_per_step'] * 1e3:.1f} ms | "
              f"{'-' if r['frozen_same'] is None else r['frozen_same']} |")
    print(f"(test accuracy of the pretrained model: {acc0:.4f})")
    figures = [figure("pretrained test accuracy", acc0, "accuracy"),
               figure("last layer share of the parameters", share, "share")]
    for r in rows:
        key = f"{r['strategy'].split('(')[0]}, {r['label']}"
        full = next(q for q in rows if q["strategy"] == r["strategy"] and q["label"] == "all layers")
        figures += [figure(f"{key}: bytes per step", r["bytes_per_step"], "bytes"),
                    figure(f"{key}: test accuracy", r["acc"], "accuracy"),
                    figure(f"{key}: step", r["s_per_step"] * 1e3, "ms"),
                    figure(f"{key}: steps", r["steps"], "steps")]
        if r["label"] != "all layers":
            figures += [figure(f"{key}: bytes / all layers", r["bytes_per_step"]
                             / full["bytes_per_step"], "x", peer="all layers"),
                        figure(f"{key}: frozen layers bit-identical", float(r["frozen_same"]),
                             "bool")]

    rng = np.random.default_rng(0)
    idx = rng.choice(X.shape[0], 512, replace=False)
    times = kernel_times(model, pre.params, X[idx], y[idx], repeats=5 if args.small else 20)
    print("\nloss_grad on 512 rows, one thread (median):")
    for label, t in times.items():
        print(f"  {label:16s} {t * 1e3:7.2f} ms  ({times['all layers'] / t:.2f}x faster than all)")
        figures.append(figure(f"loss_grad 512 rows: {label}", t * 1e3, "ms"))
        if label != "all layers":
            figures.append(figure(f"loss_grad 512 rows: all layers / {label}",
                                times["all layers"] / t, "x", peer="all layers"))
    return figures


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
