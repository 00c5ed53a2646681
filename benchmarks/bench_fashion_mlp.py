"""Fashion-MNIST: dml.MLPClassifier (defaults) on 2 Dask workers vs scikit-learn's MLPClassifier.

Both run in the same process on the same data, one after the other:
  * scikit-learn: ``MLPClassifier(hidden_layer_sizes=(100,), max_iter=20)`` (its
    defaults otherwise: adam, lr 1e-3, batch 200), in this process;
  * dmlcore: ``dml.MLPClassifier(hidden_layer_sizes=(256,))`` with its DEFAULT
    settings, on ``LocalCluster(n_workers=2, threads_per_worker=1)`` (the cluster
    is started before the clock starts; partitioning the data onto the workers
    is inside the timed fit).
Goal: dmlcore reaches >= 0.89 test accuracy in no more wall time than scikit-learn.

Also reported: dmlcore's per-epoch time and steps, and each worker's peak memory
against the bytes of the partitions it holds: a thread on each worker samples
its current RSS every 20 ms during the fit; the growth from the RSS before
the fit (code already imported) to that peak is compared to the partitions.

    python benchmarks/bench_fashion_mlp.py            # full data
    python benchmarks/bench_fashion_mlp.py --small    # 6000/1000 rows, smoke test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout


from benchmarks.runner import figure  # noqa: E402 - the runner's figure records


def _rss_now():
    """(current RSS, peak RSS) of this process in bytes."""
    import resource

    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _start_sampler(dask_worker, interval=0.02):
    """Start a thread on this worker that records the peak of its CURRENT RSS."""
    import threading

    state = {"peak": 0, "stop": threading.Event()}

    def loop():
        while not state["stop"].is_set():
            state["peak"] = max(state["peak"], _rss_now()[0])
            state["stop"].wait(interval)

    threading.Thread(target=loop, daemon=True, name="rss-sampler").start()
    dask_worker._dmlcore_rss_sampler = state
    return True


def _stop_sampler(dask_worker):
    state = dask_worker._dmlcore_rss_sampler
    state["stop"].set()
    return state["peak"]


def _warm_imports():
    """Import what a training task imports, so RSS growth afterwards is data and work."""
    import dmlcore.executors  # noqa: F401
    import dmlcore.models  # noqa: F401
    import dmlcore.train  # noqa: F401


def _held_bytes(dask_worker):
    """Bytes of the dmlcore partitions (keys starting dml-X/dml-y) held by this worker."""
    total = 0
    for key, value in dask_worker.data.items():
        name = key[0] if isinstance(key, tuple) else key
        if isinstance(name, str) and name.startswith(("dml-X-", "dml-y-")):
            total += getattr(value, "nbytes", 0)
    return total


def run(argv=None):
    """Run and print as main() does; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="6000 train / 1000 test rows")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--params", default="{}",
                        help="JSON of extra dml.MLPClassifier parameters (default: none)")
    args = parser.parse_args(argv)

    from distributed import Client
    from sklearn.neural_network import MLPClassifier as SkMLP

    import dmlcore as dml
    from dmlcore.cluster import local_cluster
    from dmlcore.estimators import MLPClassifier

    X, y = dml.datasets.fashion_mnist("train")
    Xt, yt = dml.datasets.fashion_mnist("test")
    if args.small:
        X, y, Xt, yt = X[:6000], y[:6000], Xt[:1000], yt[:1000]
    print(f"Fashion-MNIST: train {X.shape} {X.dtype}, test {Xt.shape}")

    results = {}
    figures = [figure("training rows", X.shape[0], "rows")]
    if not args.skip_sklearn:
        import warnings
        from sklearn.exceptions import ConvergenceWarning

        sk = SkMLP(hidden_layer_sizes=(100,), max_iter=20, random_state=0)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sk.fit(X, y)
        sk_time = time.perf_counter() - t0
        sk_acc = float(sk.score(Xt, yt))
        results["sklearn"] = (sk_time, sk_acc)
        print(f"scikit-learn MLPClassifier(100,), max_iter=20: {sk_time:6.2f} s, "
              f"test accuracy {sk_acc:.4f}")

    cluster = local_cluster(n_workers=2, threads_per_worker=1)
    client = Client(cluster)
    try:
        client.run(_warm_imports)          # workers up, code imported, before the clock
        before = client.run(_rss_now)
        client.run(_start_sampler)
        extra = json.loads(args.params)
        clf = MLPClassifier(hidden_layer_sizes=(256,), random_state=0, **extra)
        t0 = time.perf_counter()
        clf.fit(X, y)
        dml_time = time.perf_counter() - t0
        dml_acc = float(clf.score(Xt, yt))
        results["dmlcore"] = (dml_time, dml_acc)
        hist = clf.history_
        steps = int(hist.sizes["step"])
        train_time = float(hist["wall_time"].values[-1])
        print(f"dmlcore MLPClassifier(256,) defaults, 2 workers: {dml_time:6.2f} s "
              f"({train_time:.2f} s in the training loop, {clf.n_iter_} epochs, {steps} steps, "
              f"{1e3 * train_time / max(steps, 1):.2f} ms/step), test accuracy {dml_acc:.4f}")
        print(f"  settings: {clf.get_params()}")
        figures += [figure("dmlcore MLPClassifier: fit time", dml_time, "s"),
                    figure("dmlcore MLPClassifier: training loop time", train_time, "s"),
                    figure("dmlcore MLPClassifier: test accuracy", dml_acc, "accuracy"),
                    figure("dmlcore MLPClassifier: epochs", clf.n_iter_, "epochs"),
                    figure("dmlcore MLPClassifier: steps", steps, "steps"),
                    figure("dmlcore MLPClassifier: step", 1e3 * train_time / max(steps, 1), "ms")]

        sampled = client.run(_stop_sampler)
        after = client.run(_rss_now)
        # the partitions are released when the fit ends; measure them again
        probe = dml.partition(X, y, n_partitions=2, seed=0, client=client)
        held = client.run(_held_bytes)
        del probe
        for w in sorted(after):
            grown = sampled[w] - before[w][0]
            ratio = grown / held[w] if held[w] else float("nan")
            print(f"  worker {w}: partitions {held[w] / 2**20:7.1f} MiB; RSS before the fit "
                  f"{before[w][0] / 2**20:.1f} MiB (peak so far {before[w][1] / 2**20:.1f}), "
                  f"peak RSS sampled during the fit {sampled[w] / 2**20:.1f} MiB, now "
                  f"{after[w][0] / 2**20:.1f} MiB: the fit added at most {grown / 2**20:.1f} MiB "
                  f"= {ratio:.2f}x the partitions")
            if held[w]:
                figures.append(figure(f"worker {sorted(after).index(w)}: RSS growth / partitions", ratio, "x",
                                    peer="bytes of the worker's partitions"))
    finally:
        client.close()
        cluster.close()

    if "sklearn" in results:
        sk_time, sk_acc = results["sklearn"]
        dml_time, dml_acc = results["dmlcore"]
        print(f"time ratio dmlcore / scikit-learn: {dml_time / sk_time:.2f} "
              f"(goal <= 1.00 with accuracy >= 0.89: accuracy {dml_acc:.4f}, "
              f"{'met' if dml_acc >= 0.89 and dml_time <= sk_time else 'NOT met'})")
        figures += [figure("scikit-learn MLPClassifier(100,): fit time", sk_time, "s"),
                    figure("scikit-learn MLPClassifier(100,): test accuracy", sk_acc, "accuracy"),
                    figure("time ratio dmlcore / scikit-learn", dml_time / sk_time, "x",
                         peer="scikit-learn MLPClassifier(100,), max_iter=20")]
    return figures


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
