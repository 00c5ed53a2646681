"""Fashion-MNIST loader, synthetic generators built on the workers, file loaders."""
import gzip
import pickle
import struct

import numpy as np
import pytest

from dmlcore import datasets
from dmlcore.datasets import (fashion_mnist, load_arrays,
                              make_classification, make_regression)

from conftest import FASHION_MNIST_SKIP, fashion_mnist_available


def _write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _fake_fmnist(directory, n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[split] = (images, labels)
    return out


# ---------------------------------------------------------------- Fashion-MNIST
@pytest.mark.skipif(not fashion_mnist_available(default_location=True),
                    reason=FASHION_MNIST_SKIP)
def test_fashion_mnist_real_files(monkeypatch):
    monkeypatch.delenv("DMLCORE_DATA", raising=False)
    X, y = fashion_mnist("train")
    assert X.shape == (60000, 784) and X.dtype == np.float32 and X.flags.writeable
    assert y.shape == (60000,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    assert np.bincount(y).tolist() == [6000] * 10
    Xt, yt = fashion_mnist("test", flatten=False)
    assert Xt.shape == (10000, 28, 28) and yt.shape == (10000,) and set(yt) == set(range(10))
    X[0] = -1.0                                   # callers get their own copy
    assert fashion_mnist("train")[0][0].min() == 0.0
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("validation")


def test_fashion_mnist_env_override(tmp_path, monkeypatch):
    fake = _fake_fmnist(tmp_path / "here")
    monkeypatch.setenv("DMLCORE_DATA", str(tmp_path / "here"))
    X, y = fashion_mnist("train")
    images, labels = fake["train"]
    assert X.shape == (5, 784) and X.dtype == np.float32
    np.testing.assert_allclose(X, images.reshape(5, -1) / np.float32(255), rtol=1e-6)
    np.testing.assert_array_equal(y, labels)
    Xt, yt = fashion_mnist("test", flatten=False)
    assert Xt.shape == (3, 28, 28)
    np.testing.assert_array_equal(yt, fake["test"][1])
    # DMLCORE_DATA may also point at a parent holding a ``fashion-mnist`` folder.
    fake2 = _fake_fmnist(tmp_path / "root" / "fashion-mnist", n_train=4, seed=1)
    monkeypatch.setenv("DMLCORE_DATA", str(tmp_path / "root"))
    np.testing.assert_array_equal(fashion_mnist("train")[1], fake2["train"][1])


def test_fashion_mnist_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("DMLCORE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        fashion_mnist("train")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "DMLCORE_DATA" in message
    assert "train-images-idx3-ubyte.gz" in message


def test_fashion_mnist_corrupt_file(tmp_path, monkeypatch):
    _fake_fmnist(tmp_path)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x01\x02")  # says 10, has 2
    monkeypatch.setenv("DMLCORE_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist("train")


# ---------------------------------------------------------------- synthetic
def test_make_classification_reproducible_and_chunk_independent():
    X, y = make_classification(1000, 7, n_classes=3, chunks=300, seed=4)
    assert X.chunks == ((300, 300, 300, 100), (7,)) and y.chunks == ((300, 300, 300, 100),)
    assert X.dtype == np.float64 and y.dtype == np.int64
    X2, y2 = make_classification(1000, 7, n_classes=3, chunks=300, seed=4)
    X3, y3 = make_classification(1000, 7, n_classes=3, chunks=(1, 999), seed=4)
    Xn, yn = X.compute(), y.compute()
    for Xo, yo in ((X2, y2), (X3, y3)):
        np.testing.assert_array_equal(Xo.compute(), Xn)
        np.testing.assert_array_equal(yo.compute(), yn)
    assert set(np.unique(yn)) == {0, 1, 2}
    X4, _ = make_classification(1000, 7, n_classes=3, chunks=300, seed=5)
    assert not np.allclose(X4.compute(), Xn)
    X32, y32 = make_classification(1000, 7, n_classes=3, chunks=300, seed=4, dtype=np.float32)
    assert X32.dtype == np.float32
    np.testing.assert_array_equal(X32.compute(), Xn.astype(np.float32))
    np.testing.assert_array_equal(y32.compute(), yn)


def _linear_accuracy(X, y, n_train):
    """Accuracy of a least-squares linear classifier (targets +-1) on held-out rows."""
    A = np.column_stack([X, np.ones(len(X))])
    w, *_ = np.linalg.lstsq(A[:n_train], 2.0 * y[:n_train] - 1.0, rcond=None)
    return float(((A[n_train:] @ w > 0) == (y[n_train:] == 1)).mean())


def test_make_classification_is_learnable():
    X, y = make_classification(6000, 10, chunks=2000, seed=0, class_sep=1.0)
    Xn, yn = X.compute(), y.compute()
    assert 0.3 < yn.mean() < 0.7
    assert _linear_accuracy(Xn, yn, 4000) > 0.75             # teacher's Bayes rate ~0.84
    Xh, yh = make_classification(6000, 10, chunks=2000, seed=0, class_sep=0.02)
    assert _linear_accuracy(Xh.compute(), yh.compute(), 4000) < 0.6


def test_make_regression_recovers_teacher():
    X, y, w = make_regression(3000, 6, noise=0.01, chunks=1000, seed=2, coef=True,
                              dtype=np.float32)
    assert X.dtype == np.float32 and y.dtype == np.float32 and w.shape == (6,)
    coef, *_ = np.linalg.lstsq(X.compute().astype(np.float64), y.compute(), rcond=None)
    np.testing.assert_allclose(coef, w, atol=1e-3)


def test_generators_build_chunks_on_the_workers(client):
    X, y = make_classification(200_000, 50, chunks=25_000, seed=1)
    graph_bytes = len(pickle.dumps(X.__dask_graph__())) + len(pickle.dumps(y.__dask_graph__()))
    assert X.nbytes == 80_000_000 and graph_bytes < 50_000       # no data in the graph
    # Same numbers on the cluster as in this process, chunk by chunk.
    local = X.blocks[3].compute(scheduler="sync")
    remote = client.compute(X.blocks[3]).result()
    np.testing.assert_array_equal(local, remote)
    sums = client.compute([X.sum(axis=0), y.sum()])
    col_sums, label_sum = [f.result() for f in sums]
    assert col_sums.shape == (50,) and np.abs(col_sums).max() < 5 * np.sqrt(200_000)
    assert 0 < label_sum < 200_000
    Xr, yr = make_regression(100_000, 40, chunks=10_000)
    assert len(pickle.dumps(Xr.__dask_graph__())) < Xr.nbytes / 1000


def test_generator_argument_errors():
    with pytest.raises(ValueError, match="n_classes"):
        make_classification(10, 2, n_classes=1)
    with pytest.raises(ValueError, match="n_informative"):
        make_classification(10, 2, n_informative=3)
    with pytest.raises(ValueError, match="dtype"):
        make_regression(10, 2, dtype=np.int32)
    with pytest.raises(ValueError, match="add up"):
        make_regression(10, 2, chunks=(4, 4))


# ---------------------------------------------------------------- load_arrays
def test_load_arrays_formats(tmp_path):
    import dask.array as da
    import xarray as xr
    import zarr

    X = np.arange(24, dtype=np.float32).reshape(8, 3)
    y = np.arange(8) % 2
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    Xl, yl = load_arrays(tmp_path / "X.npy", labels=tmp_path / "y.npy")
    assert isinstance(Xl, np.memmap) or Xl.base is not None       # memory-mapped, not read
    np.testing.assert_array_equal(Xl, X)
    np.testing.assert_array_equal(yl, y)
    assert load_arrays(tmp_path / "X.npy")[1] is None

    np.savez(tmp_path / "d.npz", X=X, target=y)
    Xz, yz = load_arrays(tmp_path / "d.npz", labels="target")
    np.testing.assert_array_equal(yz, y)

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("X", data=X, chunks=(4, 3))
    group.create_array("y", data=y, chunks=(4,))
    Xg, yg = load_arrays(tmp_path / "g.zarr")
    assert isinstance(Xg, da.Array) and Xg.chunks == ((4, 4), (3,))
    np.testing.assert_array_equal(Xg.compute(), X)
    np.testing.assert_array_equal(yg.compute(), y)

    xr.Dataset({"pixels": (("s", "f"), X), "y": ("s", y)}).to_netcdf(tmp_path / "d.nc")
    Xn, yn = load_arrays(tmp_path / "d.nc", x="pixels")
    assert isinstance(Xn, da.Array)
    np.testing.assert_array_equal(Xn.compute(), X)
    np.testing.assert_array_equal(yn.compute(), y)

    with pytest.raises(ValueError, match="no variable 'X'"):
        load_arrays(tmp_path / "d.nc")
    with pytest.raises(FileNotFoundError):
        load_arrays(tmp_path / "missing.npy")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_arrays(tmp_path / "x.csv")
