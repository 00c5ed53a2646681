"""The ``dmlcore`` command: run, validate, predict, export, info.

    dmlcore run WORKFLOW.yaml [--scheduler ADDRESS] [--set key.path=value ...] [--resume]
    dmlcore validate WORKFLOW.yaml [--set ...]
    dmlcore predict MODEL.npz DATA -o OUT.npy [--proba] [--scheduler ADDRESS]
    dmlcore export MODEL.npz --int8 [-o OUT.npz]
    dmlcore info [--scheduler ADDRESS]

Exit codes: 0 success, 2 bad input (one line on stderr naming the problem,
no traceback; ``--debug`` shows it), 1 an unexpected internal error,
130 interrupted. Nothing is written to an output directory unless the
command succeeds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from ._util import first_line

# numpy and everything heavy are imported inside the subcommand that needs them, so
# `dmlcore --help` and a usage error return at once.

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
_PREDICT_CLUSTER_BYTES = 1 << 30      # inputs above this go to a cluster
_LOG_ENV = "DASK_LOGGING__DISTRIBUTED"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as ONE line (exit code 2)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    parser = _Parser(prog="dmlcore", description="Train models on data partitioned across a "
                     "Dask cluster, from YAML workflows.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def tls_options(p):
        for key, what in (("ca-file", "the CA certificate"), ("cert", "this client's "
                          "certificate"), ("key", "this client's private key")):
            p.add_argument(f"--tls-{key}", metavar="PEM",
                           help=f"{what} for a tls:// scheduler "
                                f"(cluster.tls.{key.replace('-', '_')})")

    def common(p):
        p.add_argument("--debug", action="store_true",
                       help="show tracebacks and the cluster's log messages")

    p = sub.add_parser("run", help="run a workflow file")
    p.add_argument("workflow", help="the workflow YAML file")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="a Dask scheduler address (default: cluster.address of the file, else "
                   "an embedded LocalCluster)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a value of the file (repeatable), e.g. --set optimizer.lr=0.1")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in the output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    tls_options(p)
    common(p)

    p = sub.add_parser("validate", help="check a workflow file without running it")
    p.add_argument("workflow")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE")
    common(p)

    p = sub.add_parser("predict", help="predict with a model file written by dmlcore run")
    p.add_argument("model", help="model.npz, or its int8 export")
    p.add_argument("data", help="input rows: .npy, zarr or netCDF")
    p.add_argument("-o", "--output", required=True, help="output .npy file")
    p.add_argument("--proba", action="store_true",
                   help="class probabilities instead of labels (classifiers)")
    p.add_argument("--var", default="X", help="variable holding X in a zarr group or netCDF "
                   "file (default X)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="predict on this Dask cluster, chunk by chunk")
    p.add_argument("--chunk-rows", type=int, default=65536, help="rows per chunk (65536)")
    common(p)

    p = sub.add_parser("export", help="write a compressed copy of a model file for deployment")
    p.add_argument("model", help="model.npz written by dmlcore run")
    p.add_argument("--int8", action="store_true", required=True,
                   help="int8 weights with one float32 scale per output unit (biases float32)")
    p.add_argument("-o", "--output", help="output .npz (default: MODEL.int8.npz next to the "
                   "input); an existing file is replaced only if it is an int8 export")
    common(p)

    p = sub.add_parser("info", help="versions, compiled kernels, BLAS, cluster")
    p.add_argument("--scheduler", metavar="ADDRESS", help="also describe this Dask cluster")
    tls_options(p)
    common(p)
    return parser


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:          # --help, or a usage error (already reported)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    if args.version:
        from . import __version__

        print(f"dmlcore {__version__}")
        return EXIT_OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    debug = getattr(args, "debug", False)
    saved_env = os.environ.get(_LOG_ENV)
    _quiet_logs(debug)
    commands = {"run": _cmd_run, "validate": _cmd_validate, "predict": _cmd_predict,
                "export": _cmd_export, "info": _cmd_info}
    try:
        return _dispatch(commands[args.command], args, debug)
    finally:
        if saved_env is None:
            os.environ.pop(_LOG_ENV, None)
        else:
            os.environ[_LOG_ENV] = saved_env


def _dispatch(command, args, debug):
    try:
        return command(args)
    except KeyboardInterrupt:
        print("dmlcore: interrupted; nothing was written to the output directory", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        from .workflow import WorkflowError

        if debug:
            traceback.print_exc()
        if isinstance(exc, WorkflowError):
            print(f"dmlcore {args.command}: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        name, first = type(exc).__name__, first_line(exc)
        print(f"dmlcore {args.command}: error: {name if first == name else f'{name}: {first}'}"
              + ("" if debug else " (run with --debug for the traceback)"), file=sys.stderr)
        return EXIT_ERROR


def _quiet_logs(debug):
    """Keep the cluster's INFO/WARNING chatter (and that of its worker processes) off stderr."""
    if debug:
        return
    os.environ.setdefault(_LOG_ENV, "error")    # inherited by the LocalCluster's workers
    import logging

    for name in ("distributed", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _say(message):
    print(message, flush=True)


# ---- run / validate ----------------------------------------------------------------
def _cmd_run(args):
    from .workflow import run

    sets = list(args.sets) + [f"cluster.tls.{key}={json.dumps(str(Path(value).resolve()))}"
                              for key, value in _tls_args(args).items()]
    run(args.workflow, scheduler=args.scheduler, sets=sets, resume=args.resume,
        progress=not args.no_progress,
        say=_say)
    return EXIT_OK


def _cmd_validate(args):
    from .workflow import describe, load, validate

    plan = validate(load(args.workflow, args.sets))
    print(describe(plan))
    return EXIT_OK


# ---- predict -------------------------------------------------------------------------
def _cmd_predict(args):
    import numpy as np

    from .workflow import WorkflowError

    if args.chunk_rows < 1:
        raise WorkflowError(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    try:
        from .outputs import load_model

        model, params, _ = load_model(args.model)
    except FileNotFoundError:
        raise WorkflowError(f"{args.model}: no such model file") from None
    except (ValueError, OSError, KeyError) as exc:
        raise WorkflowError(f"{args.model}: not a dmlcore model file ({first_line(exc)})") from None
    X = _open_input(args.data, args.var)
    if X.ndim != 2:
        raise WorkflowError(f"{args.data}: expected rows x features (2-D), got shape {X.shape}")
    n_features = _model_inputs(model)
    if X.shape[1] != n_features:
        raise WorkflowError(f"{args.data}: {X.shape[1]} features, the model expects "
                            f"{n_features}")
    out = Path(args.output)
    if out.suffix != ".npy":
        raise WorkflowError(f"-o {args.output}: the output must be a .npy file")
    if out.exists() and out.is_dir():
        raise WorkflowError(f"-o {args.output} is a directory")
    if args.proba and not model.is_classifier:
        raise WorkflowError("--proba needs a classifier; this model predicts values")
    nbytes = int(np.prod(X.shape)) * np.dtype(X.dtype).itemsize
    t0 = time.perf_counter()
    if args.scheduler or (nbytes > _PREDICT_CLUSTER_BYTES):
        where = _predict_on_cluster(model, params, X, args, out)
    else:
        _write_npy(out, _predict_chunks(model, params, X, args.proba, args.chunk_rows,
                                        args.data), n_rows=X.shape[0])
        where = "in this process"
    print(f"wrote {out}: {X.shape[0]} rows ({where}, {time.perf_counter() - t0:.2f} s)")
    return EXIT_OK


def _model_inputs(model):
    n = getattr(model, "n_features", None)
    if n is None:
        n = model.to_config().get("sizes", [None])[0]
    return int(n)


def _open_input(path, var):
    from .workflow import WorkflowError

    p = Path(path)
    if not p.exists():
        raise WorkflowError(f"{path}: no such data file")
    try:
        from .datasets import load_arrays

        X, _ = load_arrays(p, x=var)
    except (ValueError, OSError, KeyError, ImportError) as exc:
        raise WorkflowError(f"{path}: cannot read ({first_line(exc)})") from None
    return X


def _labels(model, out, proba):
    from .outputs import labels

    return out if proba else labels(model, out)


def _predict_block(model, params, block, proba):
    """Predictions of one block of rows (runs in a task on the cluster or here)."""
    import numpy as np

    block = np.ascontiguousarray(block, dtype=params.dtype)
    if not np.isfinite(block).all():
        bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
        raise ValueError(f"NaN or infinite input values (row {bad} of a chunk)")
    return _labels(model, model.predict(params, block), proba)


def _predict_chunks(model, params, X, proba, chunk_rows, name):
    """Yields (start, predictions) over chunks of rows, in this process."""
    import numpy as np

    from .workflow import WorkflowError

    n = X.shape[0]
    for start in range(0, n, chunk_rows):
        block = X[start:start + chunk_rows]
        if hasattr(block, "compute"):
            block = block.compute()
        try:
            yield start, _predict_block(model, params, np.asarray(block), proba)
        except ValueError as exc:
            raise WorkflowError(f"{name}: {first_line(exc)} (rows from {start})") from None


def _write_npy(out, chunks, n_rows):
    """Write an iterator of (start, array) into ``out`` (.npy) via a temporary file + rename."""
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    result = None
    try:
        for start, values in chunks:
            if result is None:
                result = np.lib.format.open_memmap(tmp, mode="w+", dtype=values.dtype,
                                                   shape=(n_rows,) + values.shape[1:])
            result[start:start + len(values)] = values
        if result is None:
            raise ValueError("no rows to predict")
        result.flush()
        del result
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _npy_rows(path, start, stop):
    import numpy as np
    return np.asarray(np.load(path, mmap_mode="r")[start:stop])


def _predict_on_cluster(model, params, X, args, out):
    """Predict chunk by chunk with tasks on a Dask cluster; write the .npy on the client."""
    import dask.array as da
    import numpy as np
    from distributed import as_completed

    from .workflow import WorkflowError

    n, rows = X.shape[0], args.chunk_rows
    client, close = _open_client(args.scheduler)
    try:
        model_f = client.scatter(model, broadcast=True)
        params_f = client.scatter(params, broadcast=True)
        starts = list(range(0, n, rows))
        if isinstance(X, da.Array):
            blocks = [X[s:s + rows] for s in starts]
            futures = [client.submit(_predict_block, model_f, params_f, b, args.proba,
                                     pure=False) for b in client.compute(blocks)]
        else:                          # a memory-mapped .npy: each task reads its rows
            path = str(Path(args.data).resolve())
            futures = [client.submit(_predict_block, model_f, params_f,
                                     client.submit(_npy_rows, path, s, min(s + rows, n),
                                                   pure=False), args.proba, pure=False)
                       for s in starts]
        start_of = {f.key: s for f, s in zip(futures, starts)}

        def results():
            for future in as_completed(futures):
                try:
                    value = future.result()
                except ValueError as exc:
                    raise WorkflowError(f"{args.data}: {first_line(exc)} (rows from "
                                        f"{start_of[future.key]})") from None
                yield start_of[future.key], np.asarray(value)
                future.release()

        _write_npy(out, results(), n_rows=n)
        return f"on {args.scheduler or 'an embedded LocalCluster'}, {len(starts)} chunks"
    finally:
        close()


def _open_client(address, tls=None):
    """``(client, close)`` from ``cluster.open_client``: ``address`` (5 s to connect), else
    an embedded LocalCluster; its errors are bad input (exit code 2)."""
    from .cluster import ClusterError, open_client
    from .workflow import WorkflowError

    try:
        return open_client(address, tls=tls, timeout=5)
    except ClusterError as exc:
        raise WorkflowError(str(exc)) from None


# ---- export ----------------------------------------------------------------------------
def _cmd_export(args):
    from .quantize import ExportError, export
    from .workflow import WorkflowError

    try:
        out, size = export(args.model, args.output)
    except ExportError as exc:
        raise WorkflowError(str(exc)) from None
    src_size = Path(args.model).stat().st_size
    print(f"wrote {out}: int8 per-channel weights, {size:,} bytes "
          f"({size / src_size:.3g}x the {src_size:,} bytes of {args.model})")
    return EXIT_OK


# ---- info ------------------------------------------------------------------------------
def _cmd_info(args):
    import importlib
    import platform

    from . import __version__
    from ._ext import MODULES

    lines = [f"dmlcore {__version__} (python {platform.python_version()}, "
             f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores)"]
    for name in ("numpy", "scipy", "dask", "distributed", "sklearn", "xarray", "zarr",
                 "h5netcdf", "matplotlib", "yaml", "threadpoolctl"):
        try:
            mod = importlib.import_module(name)
            version = getattr(mod, "__version__", "?")
        except ImportError:
            version = "not installed"
        lines.append(f"  {name:<13} {version}")
    lines.append("compiled kernels (dmlcore._ext):")
    for name in MODULES:
        try:
            mod = importlib.import_module(f"dmlcore._ext.{name}")
        except ImportError as exc:
            lines.append(f"  {name:<8} NOT IMPORTABLE ({first_line(exc)}); build with "
                         f"`python setup.py build_ext --inplace`")
            continue
        funcs = sorted(k for k, v in vars(mod).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", mod.__name__) in (mod.__name__, None))
        lines.append(f"  {name:<8} {', '.join(funcs) or '(no public functions)'}")
    lines.append("BLAS / OpenMP (threadpoolctl):")
    try:
        from threadpoolctl import threadpool_info

        pools = threadpool_info()
    except Exception as exc:  # noqa: BLE001
        pools = []
        lines.append(f"  unavailable ({first_line(exc)})")
    for pool in pools:
        lines.append(f"  {pool.get('internal_api', '?')} {pool.get('version', '?')} "
                     f"({pool.get('threading_layer', '?')}, {pool.get('num_threads', '?')} "
                     f"threads) {pool.get('filepath', '')}")
    from . import registry

    lines.append("kinds (dmlcore.registry):")
    for section in registry.SECTIONS:
        lines.append(f"  {section:<10} {', '.join(registry.kinds(section))}")
    if args.scheduler:
        lines.extend(_cluster_info(args.scheduler, _tls_args(args)))
    print("\n".join(lines))
    return EXIT_OK


def _tls_args(args):
    """{ca_file, cert, key} given as --tls-* options."""
    return {key: getattr(args, f"tls_{key}") for key in ("ca_file", "cert", "key")
            if getattr(args, f"tls_{key}", None)}


def _cluster_info(address, tls=None):
    client, close = _open_client(address, tls)
    try:
        info = client.scheduler_info()
        workers = info.get("workers", {})
        lines = [f"cluster {address}: {len(workers)} workers, "
                 f"{sum(w.get('nthreads', 0) for w in workers.values())} threads, "
                 f"dashboard {client.dashboard_link}"]
        for addr, w in sorted(workers.items()):
            mem = w.get("memory_limit") or 0
            lines.append(f"  {addr}  {w.get('nthreads', '?')} threads  "
                         f"{mem / 2**30:.1f} GiB  {w.get('name', '')}")
        try:
            kernels = client.run(_worker_kernels)
            for addr, ok in sorted(kernels.items()):
                lines.append(f"  {addr}  kernels: {ok}")
        except Exception as exc:  # noqa: BLE001
            lines.append(f"  kernels on workers: unknown ({first_line(exc)})")
        return lines
    finally:
        close()


def _worker_kernels():
    import importlib

    from dmlcore._ext import MODULES

    ok = []
    for name in MODULES:
        try:
            importlib.import_module(f"dmlcore._ext.{name}")
            ok.append(name)
        except ImportError:
            ok.append(f"{name} (missing)")
    return ", ".join(ok)


if __name__ == "__main__":
    sys.exit(main())
