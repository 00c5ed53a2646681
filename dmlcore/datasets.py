"""Data sources: Fashion-MNIST, synthetic generators built on the workers, file loaders.

Design
------
* ``fashion_mnist`` reads the IDX files of Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``) or of the directory named
  by the environment variable ``DMLCORE_DATA``. The raw uint8 pixels are cached
  per (directory, split) in this process; every call returns a fresh, writable
  float32 array scaled to [0, 1].
* ``make_classification`` / ``make_regression`` return dask arrays whose
  chunks are generated INSIDE the tasks from (seed, row-block number): the task
  graph holds only integers and small tuples, never data, so a 20 GB data set
  never passes through the client. Rows are generated in fixed blocks of
  ``_gen_rows(n_features)`` rows, each from its own ``SeedSequence(seed,
  spawn_key=(1, block))``, and a chunk slices the blocks it covers: the data
  therefore depend on the seed only, not on the chunking, the client or the
  number of workers. The teacher (the coefficients that make the labels
  learnable) is drawn from ``SeedSequence(seed, spawn_key=(0,))`` inside each
  task (a few hundred numbers).
* ``load_arrays`` opens ``.npy`` (memory-mapped), ``.npz``, zarr (array or
  group, lazily as dask) and netCDF (xarray, lazily as dask) sources.
"""
from __future__ import annotations

import gzip
import os
import threading
from pathlib import Path

import numpy as np

__all__ = [
    "fashion_mnist",
    "fashion_mnist_files",
    "make_classification",
    "make_regression",
    "load_arrays",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_fmnist_cache: dict = {}
_fmnist_lock = threading.Lock()


# --------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------
def _fashion_mnist_dir() -> Path:
    env = os.environ.get("DMLCORE_DATA")
    if env:
        base = Path(env).expanduser()
        # DMLCORE_DATA may hold the files or a ``fashion-mnist`` folder with them.
        if (base / "fashion-mnist").is_dir():
            return base / "fashion-mnist"
        return base
    return Path(FASHION_MNIST_DIR)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read one IDX file (big-endian header, uint8 payload), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    if ndim != expected_ndim:
        raise ValueError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(f"{path}: truncated IDX file ({len(raw) - header} bytes of data, "
                         f"header says {size})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist_files(split: str = "train") -> tuple[Path, Path]:
    """The (images, labels) IDX files of ``split`` where ``fashion_mnist`` looks.

    Raises FileNotFoundError (naming the folder, the missing files and how to
    install them) when either is missing; reads nothing.
    """
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = _fashion_mnist_dir()
    img_stem, lbl_stem = _FMNIST_FILES[split]
    img, lbl = _find_idx(directory, img_stem), _find_idx(directory, lbl_stem)
    if img is None or lbl is None:
        missing = [s + ".gz" for s, p in ((img_stem, img), (lbl_stem, lbl)) if p is None]
        source = ("DMLCORE_DATA=" + os.environ["DMLCORE_DATA"]
                  if os.environ.get("DMLCORE_DATA") else "the default location")
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {directory} ({source}): missing "
            f"{', '.join(missing)}. Install them with `apt-get install dataset-fashion-mnist` "
            f"(files land in {FASHION_MNIST_DIR}) or set DMLCORE_DATA to a directory holding "
            f"{img_stem}.gz, {lbl_stem}.gz and the other split's files."
        )
    return img, lbl


def _fashion_mnist_raw(split: str):
    directory = _fashion_mnist_dir()
    key = (str(directory.resolve()), split)
    with _fmnist_lock:
        if key in _fmnist_cache:
            return _fmnist_cache[key]
    img, lbl = fashion_mnist_files(split)
    images, labels = _read_idx(img, 3), _read_idx(lbl, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img} has {images.shape[0]} images but {lbl} has "
                         f"{labels.shape[0]} labels")
    with _fmnist_lock:
        _fmnist_cache[key] = (images, labels)
    return images, labels


def fashion_mnist(split: str = "train", *, flatten: bool = True):
    """Fashion-MNIST as numpy arrays.

    Returns ``(X, y)``: X float32 in [0, 1] of shape (n, 784) (or (n, 28, 28)
    with ``flatten=False``), y int64 class labels 0..9 (names in
    ``FASHION_MNIST_CLASSES``). ``split`` is ``"train"`` (60000 rows) or
    ``"test"`` (10000 rows). Files come from ``$DMLCORE_DATA`` if set, else
    ``/usr/share/datasets/fashion-mnist`` (Debian package
    ``dataset-fashion-mnist``); the decoded bytes are cached in-process.
    """
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _fashion_mnist_raw(split)
    X = images.astype(np.float32)
    X *= np.float32(1.0 / 255.0)
    if flatten:
        X = X.reshape(X.shape[0], -1)
    return X, labels.astype(np.int64)


# --------------------------------------------------------------------------
# Synthetic generators (chunks built on the workers)
# --------------------------------------------------------------------------
def _gen_rows(n_features: int) -> int:
    """Rows per generation block: about 1 MiB of float64, at least 1, at most 4096."""
    return int(min(4096, max(1, (1 << 17) // max(1, n_features))))


def _row_chunks(n_samples: int, n_features: int, chunks, dtype) -> tuple:
    if isinstance(chunks, str):
        if chunks != "auto":
            raise ValueError(f"chunks must be an int, a tuple of ints or 'auto', got {chunks!r}")
        target = 128 * 2**20  # bytes per chunk
        chunks = max(1, target // (max(1, n_features) * np.dtype(dtype).itemsize))
    if isinstance(chunks, (int, np.integer)):
        step = int(chunks)
        if step <= 0:
            raise ValueError(f"chunks must be positive, got {chunks}")
        step = min(step, max(1, n_samples))
        full, rest = divmod(n_samples, step)
        return (step,) * full + ((rest,) if rest else ())
    if isinstance(chunks, tuple) and len(chunks) and isinstance(chunks[0], tuple):
        chunks = chunks[0]  # dask-style ((rows...), (cols,))
    out = tuple(int(c) for c in chunks)
    if sum(out) != n_samples or any(c < 0 for c in out):
        raise ValueError(f"row chunks {out} do not add up to n_samples={n_samples}")
    return out


def _block_rng(seed: int, block: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, block)))


def _teacher_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))


def _classification_teacher(seed, n_features, n_classes, n_informative):
    """(W, informative columns): logits = X[:, cols] @ W, unit variance per class."""
    rng = _teacher_rng(seed)
    cols = np.sort(rng.choice(n_features, size=n_informative, replace=False))
    k = 1 if n_classes == 2 else n_classes
    W = rng.standard_normal((n_informative, k)) / np.sqrt(n_informative)
    return W, cols


def _regression_teacher(seed, n_features):
    return _teacher_rng(seed).standard_normal(n_features)


def _gen_block_classification(seed, block, rows, n_features, n_classes, n_informative,
                              class_sep):
    rng = _block_rng(seed, block)
    X = rng.standard_normal((rows, n_features))
    u = rng.random(rows)
    W, cols = _classification_teacher(seed, n_features, n_classes, n_informative)
    logits = (4.0 * class_sep) * (X[:, cols] @ W)
    if n_classes == 2:
        y = (u < 1.0 / (1.0 + np.exp(-logits[:, 0]))).astype(np.int64)
    else:
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        cdf = np.cumsum(p, axis=1)
        y = (cdf < (u * cdf[:, -1])[:, None]).sum(axis=1).astype(np.int64)
        np.minimum(y, n_classes - 1, out=y)
    return X, y


def _gen_block_regression(seed, block, rows, n_features, noise):
    rng = _block_rng(seed, block)
    X = rng.standard_normal((rows, n_features))
    eps = rng.standard_normal(rows)
    y = X @ _regression_teacher(seed, n_features) + noise * eps
    return X, y


def _gen_chunk(kind, start, stop, n_samples, params, dtype):
    """Rows [start, stop) of a synthetic data set; runs inside a Dask task."""
    n_features = params["n_features"]
    g = _gen_rows(n_features)
    Xs, ys = [], []
    for block in range(start // g, (stop - 1) // g + 1 if stop > start else start // g):
        b0 = block * g
        rows = min(g, n_samples - b0)
        if kind == "classification":
            Xb, yb = _gen_block_classification(params["seed"], block, rows, **params["gen"])
        else:
            Xb, yb = _gen_block_regression(params["seed"], block, rows, **params["gen"])
        lo, hi = max(start, b0) - b0, min(stop, b0 + rows) - b0
        Xs.append(Xb[lo:hi])
        ys.append(yb[lo:hi])
    if not Xs:
        X = np.empty((0, n_features))
        y = np.empty(0, dtype=np.int64 if kind == "classification" else np.float64)
    else:
        X, y = np.concatenate(Xs), np.concatenate(ys)
    X = X.astype(dtype, copy=False)
    if kind == "regression":
        y = y.astype(dtype, copy=False)
    return X, y


def _synthetic(kind, n_samples, n_features, chunks, seed, dtype, gen):
    import dask
    import dask.array as da

    n_samples, n_features = int(n_samples), int(n_features)
    if n_samples < 1 or n_features < 1:
        raise ValueError(f"n_samples and n_features must be positive, got "
                         f"{n_samples}, {n_features}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    row_chunks = _row_chunks(n_samples, n_features, chunks, dtype)
    params = {"seed": int(seed), "n_features": n_features, "gen": gen}
    ydtype = np.int64 if kind == "classification" else dtype
    token = dask.base.tokenize(kind, n_samples, params, row_chunks, dtype.str)
    xs, ys = [], []
    start = 0
    for i, rows in enumerate(row_chunks):
        # Only integers travel in the graph; the data are made in the task.
        blk = dask.delayed(_gen_chunk, nout=2, pure=True)(
            kind, start, start + rows, n_samples, params, dtype.str,
            dask_key_name=f"make-{kind}-{token}-{i}")
        xs.append(da.from_delayed(blk[0], (rows, n_features), dtype=dtype,
                                  name=f"make-{kind}-X-{token}-{i}"))
        ys.append(da.from_delayed(blk[1], (rows,), dtype=ydtype,
                                  name=f"make-{kind}-y-{token}-{i}"))
        start += rows
    return da.concatenate(xs, axis=0), da.concatenate(ys, axis=0)


def make_classification(n_samples, n_features, n_classes=2, n_informative=None, *,
                        chunks="auto", seed=0, dtype=np.float64, class_sep=1.0):
    """A learnable classification problem as dask arrays ``(X, y)``, generated on the workers.

    X rows are standard normal. Labels are SAMPLED from a fixed seeded teacher:
    a logistic (binary) or softmax (multiclass) model on ``n_informative``
    seeded columns (default: all) with logits ``4 * class_sep * X[:, cols] @ W``,
    ``W ~ N(0, 1/n_informative)``. Larger ``class_sep`` → cleaner labels
    (binary Bayes accuracy ≈ 0.84 at 1.0, ≈ 0.66 at 0.3). y is int64 in
    ``0..n_classes-1``. ``chunks``: rows per chunk (int), explicit row chunk
    sizes (tuple) or ``"auto"`` (about 128 MiB per chunk). The same seed gives
    the same data whatever the chunking, client or worker count.
    """
    n_classes = int(n_classes)
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    n_informative = int(n_features) if n_informative is None else int(n_informative)
    if not 1 <= n_informative <= int(n_features):
        raise ValueError(f"n_informative must be in [1, n_features={n_features}], "
                         f"got {n_informative}")
    gen = {"n_features": int(n_features), "n_classes": n_classes,
           "n_informative": n_informative, "class_sep": float(class_sep)}
    return _synthetic("classification", n_samples, n_features, chunks, seed, dtype, gen)


def make_regression(n_samples, n_features, noise=0.1, *, chunks="auto", seed=0,
                    dtype=np.float64, coef=False):
    """A linear regression problem as dask arrays ``(X, y)``, generated on the workers.

    ``y = X @ w + noise * eps`` with X, eps standard normal and a seeded
    teacher ``w ~ N(0, 1)`` (no intercept). With ``coef=True`` also returns
    ``w`` (numpy). Same chunking/seed rules as ``make_classification``.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    gen = {"n_features": int(n_features), "noise": float(noise)}
    X, y = _synthetic("regression", n_samples, n_features, chunks, seed, dtype, gen)
    if coef:
        return X, y, _regression_teacher(int(seed), int(n_features))
    return X, y


# --------------------------------------------------------------------------
# File loaders
# --------------------------------------------------------------------------
_NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf", ".h5", ".hdf5")


def _is_zarr(path: Path) -> bool:
    if path.suffix == ".zarr":
        return True
    return path.is_dir() and any(
        (path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup"))


_SPARSE_NPZ_KEYS = {"data", "indices", "indptr", "shape", "format"}


def _open_container(path: Path):
    """Open ``path``: returns ('array', array) or ('group', {name: array-getter})."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".npy":
        return "array", np.load(path, mmap_mode="r")
    if path.suffix == ".npz":
        archive = np.load(path)
        if _SPARSE_NPZ_KEYS <= set(archive.files):     # written by scipy.sparse.save_npz
            import scipy.sparse as sp
            return "array", sp.load_npz(path).tocsr()
        return "group", archive
    if _is_zarr(path):
        import zarr
        obj = zarr.open(str(path), mode="r")
        if isinstance(obj, zarr.Array):
            import dask.array as da
            return "array", da.from_zarr(obj)
        return "group", obj
    if path.suffix in _NETCDF_SUFFIXES:
        import xarray as xr
        return "group", xr.open_dataset(path, chunks={})
    raise ValueError(f"unsupported data file {path}: expected .npy, .npz, a zarr store "
                     f"or netCDF ({', '.join(_NETCDF_SUFFIXES)})")


def _group_keys(group) -> list[str]:
    import xarray as xr
    if isinstance(group, xr.Dataset):
        return [str(k) for k in group.data_vars]
    if hasattr(group, "files"):  # NpzFile
        return list(group.files)
    return sorted(k for k, _ in group.arrays())


def _group_get(group, name, path):
    import dask.array as da
    import xarray as xr
    keys = _group_keys(group)
    if name not in keys:
        raise ValueError(f"{path} has no variable {name!r}; it holds {keys}")
    if isinstance(group, xr.Dataset):
        return group[name].data
    if hasattr(group, "files"):
        return group[name]
    return da.from_zarr(group[name])


def load_arrays(path, labels=None, *, x="X", y="y"):
    """Open a data file as ``(X, y)`` arrays without reading it into memory where possible.

    ``path``: ``.npy`` (memory-mapped numpy), ``.npz`` (numpy's, or a sparse
    matrix written by ``scipy.sparse.save_npz``: X is then CSR), a zarr array or group
    (dask array reading the store on the workers), or netCDF (via xarray,
    dask-backed). For containers with several variables, X is the
    variable ``x`` and y the variable ``y`` (None if absent). ``labels``: a
    second file (any of these formats), a variable name inside ``path``, or
    None. Returns numpy or dask arrays; ``y`` may be None.
    """
    path = Path(path).expanduser()
    kind, obj = _open_container(path)
    if kind == "array":
        X, yv = obj, None
    else:
        X = _group_get(obj, x, path)
        yv = _group_get(obj, y, path) if y in _group_keys(obj) else None
        if isinstance(labels, str) and labels in _group_keys(obj):
            yv, labels = _group_get(obj, labels, path), None
    if labels is not None:
        lpath = Path(labels).expanduser()
        if not lpath.exists():
            raise FileNotFoundError(f"labels not found: {labels!r} is neither a variable of "
                                    f"{path} nor an existing file")
        lkind, lobj = _open_container(lpath)
        yv = lobj if lkind == "array" else _group_get(lobj, y, lpath)
    return X, yv
