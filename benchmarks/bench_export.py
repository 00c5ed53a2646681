"""Deployment compression: ``dmlcore export --int8`` on the Fashion-MNIST MLP (784-256-10).

A workflow run (as ``dmlcore run`` does it: ``dmlcore.workflow.run`` on an
embedded ``LocalCluster(n_workers=2, threads_per_worker=1)``; SyncSGD batch 64,
fan-in 4, SGD lr 0.05 momentum 0.9, 8 iid partitions) writes ``model.npz``;
``dmlcore.quantize.export`` writes ``model.int8.npz`` next to it (per-channel
int8 weights, float32 scales and biases). Both files are loaded with
``dml.load`` and scored on the Fashion-MNIST test split.
Printed: each file's size and test accuracy, the size ratio int8 / float, the
accuracy change in points, the share of test rows given the same label, and
the prediction time of each file on the test split.

    python benchmarks/bench_export.py              # 60,000 rows, 5 epochs
    python benchmarks/bench_export.py --small      # 3,000 rows, 2 epochs, 1,000 test rows
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

WORKFLOW = """\
name: bench-export
cluster: {{local: {{n_workers: 2, threads_per_worker: 1}}}}
data: {{source: fashion_mnist, partitions: 8, scheme: iid, seed: 0{max_rows}}}
model: {{kind: mlp, hidden: [256], activation: relu}}
strategy: {{kind: sync, batch_size: 64, fan_in: 4}}
optimizer: {{kind: sgd, lr: 0.05, momentum: 0.9}}
train: {{epochs: {epochs}, seed: 0}}
output: {{dir: {out}, plots: false}}
"""


def _timed_predict(saved, X, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        labels = saved.predict(X)
        best = min(best, time.perf_counter() - t)
    return labels, best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="3,000 training rows, 2 epochs, 1,000 test rows (smoke test)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (5; --small: 2)")
    parser.add_argument("--out", default=None,
                        help="folder for the run and the export (default: a temporary one)")
    args = parser.parse_args(argv)

    import numpy as np

    import dmlcore as dml
    from dmlcore.quantize import export
    from dmlcore.workflow import run

    epochs = args.epochs or (2 if args.small else 5)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        folder = Path(args.out or tmp)
        run_dir = folder / "run"
        wf = folder / "bench_export.yaml"
        wf.write_text(WORKFLOW.format(max_rows=", max_rows: 3000" if args.small else "",
                                      epochs=epochs, out=run_dir))
        t = time.perf_counter()
        run(wf, progress=False, say=lambda message: None)
        print(f"trained 784-256-10 for {epochs} epoch(s) in {time.perf_counter() - t:.1f} s "
              f"({'3,000' if args.small else '60,000'} rows, 2 workers)")
        float_file = run_dir / "model.npz"
        int8_file, _ = export(float_file)

        Xt, yt = dml.datasets.fashion_mnist("test")
        if args.small:
            Xt, yt = Xt[:1000], yt[:1000]
        results = {}
        for label, path in (("float model.npz", float_file), ("int8 model.int8.npz", int8_file)):
            saved = dml.load(path)
            pred, seconds = _timed_predict(saved, Xt)
            results[label] = (path.stat().st_size, float(np.mean(pred == yt)), seconds, pred)

    print(f"\n{'file':22s} {'size':>12s}        {'accuracy':>8s}   predict {len(yt):,} rows")
    for label, (size, acc, seconds, _) in results.items():
        print(f"{label:22s} {size:>12,} bytes  test accuracy {acc:.4f}  {seconds * 1e3:.1f} ms")
    (f_size, f_acc, f_t, f_pred), (q_size, q_acc, q_t, q_pred) = results.values()
    print(f"size int8 / float: {q_size / f_size:.3g}x ({f_size / q_size:.3g}x smaller)")
    print(f"accuracy change int8 - float: {100 * (q_acc - f_acc):+.2f} points; same label on "
          f"{100 * np.mean(q_pred == f_pred):.2f}% of test rows")
    print(f"predict time int8 / float: {q_t / f_t:.3g}x (both compute in float32: the int8 "
          f"weights are dequantized on load)")
    return results


if __name__ == "__main__":
    main()
