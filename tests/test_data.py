"""partition(): plans, placement on the workers, validation, input kinds, skew report."""
import numpy as np
import pytest

import dask.array as da
import xarray as xr
from distributed import get_worker

from dmlcore.data import PartitionedData, partition


def _rows_xy(n=200, d=3, n_classes=10, seed=0, dtype=np.float64):
    """X whose column 0 is the row number, so every row can be traced back."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(dtype)
    X[:, 0] = np.arange(n)
    y = rng.integers(0, n_classes, n)
    return X, y


def _blocks(data):
    X = data.X.compute()
    y = None if data.y is None else data.y.compute()
    bounds = np.concatenate([[0], np.cumsum(data.partition_sizes)])
    return ([X[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
            None if y is None else [y[a:b] for a, b in zip(bounds[:-1], bounds[1:])])


def _is_sum_of_shards(count, shard_counts, used, k):
    """Can ``count`` be written as the sum of ``k`` unused shard count vectors?"""
    if k == 0:
        return not count.any()
    for s, v in enumerate(shard_counts):
        if not used[s] and (v <= count).all():
            used[s] = True
            if _is_sum_of_shards(count - v, shard_counts, used, k - 1):
                return True
            used[s] = False
    return False


# ---------------------------------------------------------------- iid
def test_iid_sizes_and_permutation(client):
    X, y = _rows_xy(n=203)
    data = partition(X, y, n_partitions=6, seed=3, client=client)
    assert isinstance(data, PartitionedData)
    assert data.n_partitions == 6 and data.n_rows == 203 and data.n_features == 3
    sizes = data.partition_sizes
    assert sizes.sum() == 203 and sizes.max() - sizes.min() <= 1
    assert data.X.chunks == (tuple(sizes), (3,)) and data.y.chunks == (tuple(sizes),)
    xs, ys = _blocks(data)
    ids = np.concatenate([b[:, 0] for b in xs]).astype(int)
    assert sorted(ids) == list(range(203))           # union is a permutation of the rows
    assert not np.array_equal(ids, np.arange(203))    # ... and actually shuffled
    for p, (xb, yb) in enumerate(zip(xs, ys)):
        np.testing.assert_array_equal(xb, X[data.source_rows[p]])
        np.testing.assert_array_equal(yb, y[xb[:, 0].astype(int)])
    np.testing.assert_array_equal(data.classes, np.arange(10))
    assert data.n_classes == 10


def test_same_seed_same_split(client):
    X, y = _rows_xy(n=150)
    a = partition(X, y, 4, seed=7, client=client)
    b = partition(X, y, 4, seed=7, client=client)
    c = partition(X, y, 4, seed=8, client=client)
    np.testing.assert_array_equal(a.X.compute(), b.X.compute())
    np.testing.assert_array_equal(a.y.compute(), b.y.compute())
    assert not all(np.array_equal(r, q) for r, q in zip(a.source_rows, c.source_rows))
    for scheme in ("shards", "dirichlet"):
        s1 = partition(X, y, 4, scheme=scheme, seed=1, client=False)
        s2 = partition(X, y, 4, scheme=scheme, seed=1, client=False)
        for r1, r2 in zip(s1.source_rows, s2.source_rows):
            np.testing.assert_array_equal(r1, r2)


def test_default_partition_count(client):
    X, y = _rows_xy(n=40)
    assert partition(X, y, client=client).n_partitions == 2 * len(client.nthreads())
    assert partition(X, y, client=False).n_partitions == 2


# ---------------------------------------------------------------- shards
@pytest.mark.parametrize("balanced", [True, False])
def test_shards_structure(client, balanced):
    n, P, S = 2000, 10, 2
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(10), n // 10) if balanced else rng.integers(0, 10, n)
    X = np.column_stack([np.arange(n), rng.standard_normal(n)])
    data = partition(X, y, P, scheme="shards", shards_per_partition=S, seed=5, client=client)
    assert (data.partition_sizes == n // P).all()
    xs, ys = _blocks(data)
    assert sorted(np.concatenate([b[:, 0] for b in xs]).astype(int)) == list(range(n))
    # The shards are contiguous runs of the label-sorted sequence.
    shard_counts = [np.bincount(s, minlength=10)
                    for s in np.array_split(np.sort(y), P * S)]
    used = [False] * len(shard_counts)
    for yb in ys:
        count = np.bincount(yb, minlength=10)
        assert _is_sum_of_shards(count, shard_counts, used, S)
        n_cls = np.count_nonzero(count)
        assert 1 <= n_cls <= (2 if balanced else 2 * S)    # McMahan et al.: 2 shards, <= 2-4 classes
    assert all(used)
    report = data.skew_report()
    assert float(report["label_tv_distance"].mean()) > 0.7   # strongly non-iid


def test_shards_needs_labels_and_rows():
    X, y = _rows_xy(n=10)
    with pytest.raises(ValueError, match="needs labels"):
        partition(X, None, 2, scheme="shards", client=False)
    with pytest.raises(ValueError, match="shards"):
        partition(X, y, 6, scheme="shards", client=False)


# ---------------------------------------------------------------- dirichlet
def test_dirichlet_alpha_controls_skew(client):
    X, y = _rows_xy(n=3000)
    skewed = partition(X, y, 8, scheme="dirichlet", alpha=0.05, seed=0, client=client)
    near_iid = partition(X, y, 8, scheme="dirichlet", alpha=1000.0, seed=0, client=client)
    tv_small = skewed.skew_report()["label_tv_distance"].values
    tv_large = near_iid.skew_report()["label_tv_distance"].values
    assert tv_small.mean() > 0.5
    assert tv_large.max() < 0.1
    for data in (skewed, near_iid):
        assert (data.partition_sizes > 0).all() and data.n_rows == 3000
        xs, _ = _blocks(data)
        assert sorted(np.concatenate([b[:, 0] for b in xs]).astype(int)) == list(range(3000))


def test_dirichlet_never_empty():
    X, y = _rows_xy(n=40, n_classes=2)
    for seed in range(5):
        data = partition(X, y, 20, scheme="dirichlet", alpha=0.01, seed=seed, client=False)
        assert (data.partition_sizes >= 1).all() and data.n_rows == 40


# ---------------------------------------------------------------- skew report
def test_skew_report_hand_computed(client):
    # 6 rows of class 0 and 3 of class 1, 3 partitions of one shard each:
    # sorted labels 000|000|111 -> two partitions [3, 0], one [0, 3].
    X = np.arange(18, dtype=np.float32).reshape(9, 2)
    y = np.array([1, 0, 0, 1, 0, 0, 1, 0, 0])
    data = partition(X, y, 3, scheme="shards", shards_per_partition=1, seed=2, client=client)
    rep = data.skew_report()
    assert set(rep.dims) == {"partition", "class"}
    assert rep["rows"].values.tolist() == [3, 3, 3]
    assert rep["bytes"].values.tolist() == [3 * (2 * 4 + 8)] * 3    # float32 X + int64 y
    counts = rep["class_count"].values
    assert sorted(map(tuple, counts)) == [(0, 3), (3, 0), (3, 0)]
    # TV from global [2/3, 1/3]: [1, 0] -> 1/3, [0, 1] -> 2/3.
    expected = [2 / 3 if c[1] == 3 else 1 / 3 for c in counts]
    np.testing.assert_allclose(rep["label_tv_distance"].values, expected)
    assert float(rep["imbalance"]) == 1.0
    assert rep["worker"].values.tolist() == data.workers()
    assert rep.attrs["scheme"] == "shards"
    # iid, 10 rows in 3 partitions: 4, 3, 3 -> imbalance 4 / (10 / 3) = 1.2
    iid = partition(np.ones((10, 2)), np.arange(10) % 2, 3, client=client)
    assert float(iid.skew_report()["imbalance"]) == pytest.approx(1.2)
    assert "imbalance 1.20" in repr(iid) and "n_partitions=3" in repr(iid)


def test_regression_report_and_dtypes():
    X = np.arange(40, dtype=np.int32).reshape(20, 2)
    y = np.linspace(0, 1, 20)
    data = partition(X, y, 2, client=False)
    assert data.dtype == np.float64 and data.classes is None and data.n_classes is None
    rep = data.skew_report()
    assert "class_count" not in rep and "label_mean" in rep
    yb = _blocks(data)[1]
    np.testing.assert_allclose(rep["label_mean"].values, [b.mean() for b in yb])
    d32 = partition(X.astype(np.float32), y, 2, client=False)
    assert d32.dtype == np.float32 and d32.y.dtype == np.float32
    dbool = partition(X.astype(np.float32), np.arange(20) % 2 == 0, 2, client=False)
    assert dbool.y.dtype == np.int64 and dbool.classes.tolist() == [0, 1]
    unlabelled = partition(X, None, 4, client=False)
    assert unlabelled.y is None and unlabelled.y_blocks() == [None] * 4


# ---------------------------------------------------------------- placement
def _worker_address():
    return get_worker().address


def test_partitions_live_evenly_on_the_workers(client):
    X, y = _rows_xy(n=800, d=4)
    data = partition(X, y, 8, seed=0, client=client)
    workers = sorted(client.nthreads())
    placed = data.workers()
    assert placed == [workers[p % len(workers)] for p in range(8)]
    futures = data.partition_futures()
    who = client.who_has([f for xf, yf, _ in futures for f in (xf, yf)])
    for p, (xf, yf, wf) in enumerate(futures):
        assert wf is None                                    # unweighted
        assert who[xf.key] == (placed[p],) and who[yf.key] == (placed[p],)
    per_worker = {w: 0 for w in workers}
    for p, w in enumerate(placed):
        per_worker[w] += data.skew_report()["bytes"].values[p]
    assert len(set(per_worker.values())) == 1                 # balanced bytes
    # A task pinned to the partition's worker sees its numpy arrays without transfer.
    out = client.gather([client.submit(lambda a, b: (type(a), a.shape, len(b), _worker_address()),
                                       xf, yf, workers=[placed[p]], allow_other_workers=False)
                         for p, (xf, yf, _) in enumerate(futures)])
    for p, (kind, shape, ny, where) in enumerate(out):
        assert kind is np.ndarray and shape == (data.partition_sizes[p], 4) and ny == shape[0]
        assert where == placed[p]
    assert len(data.x_blocks()) == 8 and data.x_blocks()[3].shape == (100, 4)
    # Unequal partitions: bytes per worker differ by at most one partition.
    skewed = partition(X, y, 6, scheme="dirichlet", alpha=0.3, client=client)
    rep = skewed.skew_report()
    loads = [int(rep["bytes"].values[rep["worker"].values == w].sum()) for w in workers]
    assert max(loads) - min(loads) <= int(rep["bytes"].max())


def _recorded_scatter(monkeypatch, unreachable=False):
    """``Client.scatter`` patched to record each call's ``direct``; with
    ``unreachable``, a direct call fails as it does when a worker cannot be reached."""
    from distributed import Client

    calls = []
    scatter = getattr(Client.scatter, "__wrapped__", Client.scatter)

    def recorded(self, data, **kw):
        calls.append(kw.get("direct"))
        if unreachable and kw.get("direct"):
            raise OSError("Timed out trying to connect to tcp://10.0.0.9:1234")
        return scatter(self, data, **kw)

    recorded.__wrapped__ = scatter
    monkeypatch.setattr(Client, "scatter", recorded)
    return calls


def test_partitions_go_straight_to_their_workers_or_through_the_scheduler(client, monkeypatch,
                                                                        caplog):
    """Parts are scattered to their worker directly; where that connection
    fails, once, the rest go through the scheduler, logged once, and land on
    the same workers."""
    import weakref

    import dmlcore.data as dd

    monkeypatch.setattr(dd, "_VIA_SCHEDULER", weakref.WeakSet())   # restored after the test
    X, y = _rows_xy(n=800, d=4)
    calls = _recorded_scatter(monkeypatch)
    data = partition(X, y, 4, seed=0, client=client)
    assert calls and all(calls)                    # every part sent directly
    direct_blocks = [b.copy() for b in _blocks(data)[0]]

    calls = _recorded_scatter(monkeypatch, unreachable=True)
    with caplog.at_level("WARNING", logger="dmlcore"):
        again = partition(X, y, 4, seed=0, client=client)
        # tried at most once per worker (their threads may try at the same time)
        assert 1 <= calls.count(True) <= 2
        calls.clear()
        partition(X, y, 4, seed=1, client=client)
    assert calls and not any(calls)                # then only the scheduler
    assert sum("through the scheduler" in r.getMessage() for r in caplog.records) == 1
    assert "10.0.0.9" in caplog.text
    workers = sorted(client.nthreads())
    assert again.workers() == [workers[p % 2] for p in range(4)]
    who = client.who_has([xf for xf, _, _ in again.partition_futures()])
    assert [who[xf.key] for xf, _, _ in again.partition_futures()] == [(w,) for w in
                                                                       again.workers()]
    for a, b in zip(_blocks(again)[0], direct_blocks):
        np.testing.assert_array_equal(a, b)


def test_a_client_that_asks_for_the_scheduler_path_gets_it(client, monkeypatch):
    from distributed import Client

    X, y = _rows_xy(n=100, d=2)
    with Client(client.scheduler.address, direct_to_workers=False) as other:
        calls = _recorded_scatter(monkeypatch)
        data = partition(X, y, 2, seed=0, client=other)
        assert calls and not any(calls)
        np.testing.assert_array_equal(np.sort(data.X.compute()[:, 0]), np.arange(100))


def test_dask_input_unknown_chunks_rebalanced(client):
    X, y = _rows_xy(n=1000, d=3)
    Xd = da.from_array(X, chunks=((50, 400, 150, 300, 100), (3,)))
    yd = da.from_array(y, chunks=((50, 400, 150, 300, 100),))
    keep = Xd[:, 1] > -0.3
    Xf, yf = Xd[keep], yd[keep]
    assert np.isnan(Xf.chunks[0][0])                          # unknown chunk sizes
    data = partition(Xf, yf, 4, seed=1, client=client)
    mask = X[:, 1] > -0.3
    n = int(mask.sum())
    assert data.n_rows == n and data.partition_sizes.max() - data.partition_sizes.min() <= 1
    assert data.X.numblocks == (4, 1) and data.y.numblocks == (4,)
    workers = sorted(client.nthreads())       # (checked before computing: a compute may copy)
    who = client.who_has([f for f, _, _ in data.partition_futures()])
    assert [who[f.key] for f, _, _ in data.partition_futures()] == \
        [(workers[p % 2],) for p in range(4)]
    xs, ys = _blocks(data)
    ids = np.concatenate([b[:, 0] for b in xs]).astype(int)
    assert sorted(ids) == sorted(np.flatnonzero(mask))
    for xb, yb in zip(xs, ys):
        np.testing.assert_array_equal(xb, X[xb[:, 0].astype(int)])
        np.testing.assert_array_equal(yb, y[xb[:, 0].astype(int)])
    # One big chunk in, several balanced partitions out; non-iid schemes too.
    one = partition(da.from_array(X, chunks=(1000, 3)), y, 3, scheme="shards", client=client)
    assert one.X.numblocks == (3, 1) and sorted(one.partition_sizes) == [333, 333, 334]


def test_dask_input_without_client_and_lazy(client):
    X, y = _rows_xy(n=300)
    Xd = da.from_array(X, chunks=70)
    keep = Xd[:, 1] > 0
    lazy = partition(Xd[keep], y[X[:, 1] > 0], 3, persist=False, client=client)
    assert not lazy.persisted and "lazy" in repr(lazy)
    with pytest.raises(RuntimeError, match="placed"):
        lazy.partition_futures()
    xs, _ = _blocks(lazy)
    for p, xb in enumerate(xs):
        np.testing.assert_array_equal(xb, X[X[:, 1] > 0][lazy.source_rows[p]])
    on_cluster = lazy.placed(client)
    assert on_cluster.workers() == [sorted(client.nthreads())[p % 2] for p in (0, 1, 0)]
    np.testing.assert_array_equal(on_cluster.X.compute(), lazy.X.compute())
    local = partition(Xd, y, 3, client=False)
    assert local.workers() == [None] * 3 and "in-process" in repr(local)
    moved = local.placed(client)
    np.testing.assert_array_equal(moved.y.compute(), local.y.compute())
    assert len(moved.partition_futures()) == 3
    back = moved.placed(False)
    np.testing.assert_array_equal(back.X.compute(scheduler="sync"), local.X.compute())


# ---------------------------------------------------------------- validation
def test_nan_and_inf_rejected(client):
    X, y = _rows_xy(n=100)
    bad = X.copy()
    bad[37, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*row 37"):
        partition(bad, y, 4, client=client)
    with pytest.raises(ValueError, match=r"NaN.*row 37"):
        partition(da.from_array(bad, chunks=30), y, 4, client=client)
    bad[5, 1] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        partition(bad, y, 4, client=False)
    yr = np.linspace(0, 1, 100)
    yr[3] = np.nan
    with pytest.raises(ValueError, match=r"y contains 1 NaN"):
        partition(X, yr, 4, client=client)
    ok = partition(bad, y, 4, client=False, check_finite=False)
    assert np.isnan(ok.X.compute()).sum() == 1


def test_shape_and_scheme_errors():
    X, y = _rows_xy(n=20)
    with pytest.raises(ValueError, match="2-D"):
        partition(X[:, 0], y, client=False)
    with pytest.raises(ValueError, match="20 rows but y has 19"):
        partition(X, y[:-1], client=False)
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        partition(X, np.zeros((20, 2, 2)), client=False)
    with pytest.raises(ValueError, match="unknown scheme"):
        partition(X, y, scheme="noniid", client=False)
    with pytest.raises(ValueError, match="cannot cut"):
        partition(X, y, 21, client=False)


# ---------------------------------------------------------------- input kinds
def test_xarray_inputs(client):
    X, y = _rows_xy(n=60, dtype=np.float32)
    ds = xr.Dataset({"X": (("sample", "feature"), X), "y": ("sample", y)})
    a = partition(ds, n_partitions=3, client=client)
    b = partition(X, y, 3, client=client)
    np.testing.assert_array_equal(a.X.compute(), b.X.compute())
    np.testing.assert_array_equal(a.y.compute(), b.y.compute())
    assert a.dtype == np.float32
    named = ds.rename({"X": "pixels", "y": "label"}).chunk({"sample": 25})
    c = partition(named, "label", 3, x="pixels", client=client)
    np.testing.assert_array_equal(c.X.compute(), b.X.compute())
    d = partition(named["pixels"], named["label"], 3, client=client)
    np.testing.assert_array_equal(d.y.compute(), b.y.compute())
    with pytest.raises(ValueError, match="no variable 'X'"):
        partition(named, "label", client=client)


def test_npy_zarr_netcdf_paths(client, tmp_path):
    import zarr

    X, y = _rows_xy(n=90)
    ref = partition(X, y, 3, client=client)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    from_npy = partition(str(tmp_path / "X.npy"), str(tmp_path / "y.npy"), 3, client=client)
    np.testing.assert_array_equal(from_npy.X.compute(), ref.X.compute())

    group = zarr.open_group(str(tmp_path / "data.zarr"), mode="w")
    group.create_array("X", data=X, chunks=(25, 3))
    group.create_array("y", data=y, chunks=(25,))
    from_zarr = partition(str(tmp_path / "data.zarr"), None, 3, client=client)
    np.testing.assert_array_equal(from_zarr.X.compute(), ref.X.compute())
    np.testing.assert_array_equal(from_zarr.y.compute(), ref.y.compute())
    arr = zarr.open_array(str(tmp_path / "data.zarr" / "X"), mode="r")
    from_zarr_array = partition(arr, y, 3, client=client)
    np.testing.assert_array_equal(from_zarr_array.X.compute(), ref.X.compute())

    xr.Dataset({"X": (("s", "f"), X), "label": ("s", y)}).to_netcdf(
        tmp_path / "d.nc")
    from_nc = partition(str(tmp_path / "d.nc"), "label", 3, client=client)
    np.testing.assert_array_equal(from_nc.y.compute(), ref.y.compute())


# --------------------------------------------------------------------------
# partition_in_place: balanced persisted chunks stay where they lie
# --------------------------------------------------------------------------
def _chunk_holders(client, Xp):
    from distributed import futures_of, wait

    by_key = {f.key: f for f in futures_of(Xp)}
    wait(list(by_key.values()), timeout=60)
    who = client.who_has([by_key[(Xp.name, b, 0)] for b in range(Xp.numblocks[0])])
    return [sorted(who[(Xp.name, b, 0)])[0] for b in range(Xp.numblocks[0])]


def test_in_place_keeps_balanced_chunks_where_they_lie(client):
    from dmlcore.data import partition_in_place

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5))
    y = rng.integers(0, 3, size=400)
    Xp = client.persist(da.from_array(X, chunks=(100, 5)))
    holders = _chunk_holders(client, Xp)
    assert len(set(holders)) == 2            # the cluster spread them
    data = partition_in_place(Xp, y, client=client)
    assert data.scheme == "chunks"
    assert data.partition_sizes.tolist() == [100] * 4
    assert data.workers() == holders          # no partition moved
    np.testing.assert_array_equal(data.X.compute(), X)
    np.testing.assert_array_equal(data.y.compute(), y)
    np.testing.assert_array_equal(np.concatenate(data.source_rows), np.arange(400))
    counts = data.skew_report()["class_count"].values
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(y))


def test_in_place_falls_back_to_iid_when_skewed(client):
    from dmlcore.data import partition_in_place

    X = np.arange(800.0).reshape(400, 2)
    Xd = da.from_array(X, chunks=((300, 50, 50), (2,)))
    data = partition_in_place(Xd, None, client=client)
    assert data.scheme == "iid"
    expected = partition(Xd, None, scheme="iid", seed=0, client=client)
    for a, b in zip(data.source_rows, expected.source_rows):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.sort(data.X.compute(), axis=0), X)


def test_in_place_rejects_nan_and_converts_dtype(client):
    from dmlcore.data import partition_in_place

    X = np.ones((200, 3), dtype=np.int32)
    data = partition_in_place(da.from_array(X, chunks=(100, 3)), None, client=client)
    assert data.dtype == np.float64 and data.scheme == "chunks"
    bad = np.ones((200, 3))
    bad[150, 1] = np.nan
    with pytest.raises(ValueError, match="NaN .*source row 150"):
        partition_in_place(da.from_array(bad, chunks=(100, 3)), None, client=client)


def test_in_place_moves_only_the_chunks_beyond_a_workers_share(client):
    from dmlcore.data import _keep_or_move, partition_in_place

    workers = sorted(client.nthreads())
    # hand-computed: 4 equal chunks all on worker a -> a keeps 2, b gets the rest
    assert _keep_or_move(np.array([10, 10, 10, 10]), [["a"]] * 4, ["a", "b"]) == \
        ["a", "a", "b", "b"]
    assert _keep_or_move(np.array([10, 10]), [["b"], ["a"]], ["a", "b"]) == ["b", "a"]
    X = np.arange(1200.0).reshape(400, 3)
    Xp = client.persist(da.from_array(X, chunks=(100, 3)), workers=[workers[0]])
    assert set(_chunk_holders(client, Xp)) == {workers[0]}
    data = partition_in_place(Xp, None, client=client)
    assert data.scheme == "chunks"
    assert sorted(data.workers()) == sorted([workers[0]] * 2 + [workers[1]] * 2)
    assert data.workers()[:2] == [workers[0]] * 2
    np.testing.assert_array_equal(data.X.compute(), X)


@pytest.mark.parametrize("where", ["process", "cluster", "in_place"])
def test_two_dimensional_targets_travel_with_their_rows(client, where):
    """A 2-D y (multi-output targets, multilabel indicators) is float targets
    in X's dtype, cut with the same plan as X's rows."""
    import dask.array as da

    from dmlcore.data import partition_in_place

    X, _ = _rows_xy(n=120, dtype=np.float32)
    Y = np.stack([X[:, 0] * 10, X[:, 0] * 10 + 1, np.arange(120) % 2], axis=1).astype(np.int64)
    if where == "process":
        data = partition(X, Y, 4, client=False)
    elif where == "cluster":
        data = partition(X, Y, 4, client=client)
    else:
        data = partition_in_place(client.persist(da.from_array(X, chunks=30)), Y, client=client)
    assert data.y.shape == (120, 3) and data.y.dtype == np.float32
    assert not data.is_classification
    Xp, Yp = data.X.compute(), data.y.compute()
    np.testing.assert_array_equal(Yp[:, 0], Xp[:, 0] * 10)      # each row kept its targets
    np.testing.assert_array_equal(Yp[:, 1], Xp[:, 0] * 10 + 1)
    np.testing.assert_array_equal(Yp[:, 2], Xp[:, 0] % 2)
    for p in range(data.n_partitions):
        assert data.y.blocks[p].compute().shape == (data.partition_sizes[p], 3)


# --------------------------------------------------------------------------
# Pinned partitions: the same seed and scheme give the same partitions, bit
# for bit, on every materialisation path (expected digests were computed with
# the code before the partition()/placed() restructuring)
# --------------------------------------------------------------------------
def _digest(data):
    """sha256 (16 hex) of the plan, the partitions' bytes and the skew report
    (less the worker addresses, which differ between paths)."""
    import hashlib

    h = hashlib.sha256()
    for r in data.source_rows:
        h.update(np.asarray(r, dtype=np.int64).tobytes() + b"|")
    for blocks in (data.x_blocks(), data.y_blocks(), data.w_blocks()):
        for b in blocks:
            if b is None:
                continue
            v = b.compute()
            if hasattr(v, "toarray"):
                v = np.concatenate([v.indptr, v.indices]).tobytes() + v.data.tobytes()
            h.update(np.asarray(v).tobytes() if not isinstance(v, bytes) else v)
            h.update(str(getattr(b, "dtype", "")).encode())
    rep = data.skew_report()
    for name in sorted(rep.data_vars):
        if name != "worker":
            h.update(name.encode() + np.asarray(rep[name].values).tobytes())
    h.update(repr(sorted((k, str(v)) for k, v in rep.attrs.items())).encode())
    return h.hexdigest()[:16]


def _pinned_problem(sparse=False):
    rng = np.random.default_rng(11)
    n, d = 157, 4
    X = rng.standard_normal((n, d))
    X[rng.random((n, d)) < (0.6 if sparse else 0.0)] = 0.0
    y = rng.integers(0, 5, n)
    w = rng.uniform(0.1, 2.0, n)
    return X, y, w


def _pinned_variants(client, X, y, w, kwargs, sparse=False):
    """(path name, PartitionedData) for every way partitions are materialised."""
    import scipy.sparse as sp

    Xsrc = sp.csr_matrix(X) if sparse else X
    chunks = ((40, 57, 60), (X.shape[1],))
    Xdask = da.from_array(X, chunks=chunks)
    out = [("numpy-client", partition(Xsrc, y, client=client, sample_weight=w, **kwargs)),
           ("numpy-local", partition(Xsrc, y, client=False, sample_weight=w, **kwargs)),
           ("numpy-lazy", partition(Xsrc, y, client=False, persist=False, sample_weight=w,
                                    **kwargs))]
    if not sparse:
        out += [("dask-client", partition(Xdask, da.from_array(y, chunks=chunks[:1]),
                                          client=client, sample_weight=w, **kwargs)),
                ("dask-unknown-chunks", partition(Xdask[Xdask[:, 0] < 99], y, client=client,
                                                  sample_weight=w, **kwargs)),
                ("dask-local", partition(Xdask, y, client=False, sample_weight=w, **kwargs)),
                ("dask-lazy", partition(Xdask, y, client=False, persist=False,
                                        sample_weight=w, **kwargs))]
    by_name = dict(out)
    out += [("local.placed(client)", by_name["numpy-local"].placed(client)),
            ("lazy.placed(client)", by_name["numpy-lazy"].placed(client)),
            ("client.placed(False)", by_name["numpy-client"].placed(False))]
    return out


PINNED = {   # (scheme, kwargs) -> (digest, worker index per partition on 2 workers)
    "iid": (dict(n_partitions=6, scheme="iid", seed=3), "10f73bcaaeaa9503",
            [0, 1, 0, 1, 0, 1]),
    "shards": (dict(n_partitions=5, scheme="shards", seed=1, shards_per_partition=3),
               "1a62bcef28366286", [0, 1, 1, 1, 0]),
    "dirichlet": (dict(n_partitions=7, scheme="dirichlet", seed=2, alpha=0.3),
                  "1dd3ae0abb82e977", [1, 1, 1, 1, 0, 0, 0]),
}


@pytest.mark.parametrize("scheme", [             # iid stays in the quick subset
    pytest.param(s, marks=() if s == "iid" else pytest.mark.slow) for s in sorted(PINNED)])
def test_partitions_are_pinned_on_every_path(client, scheme):
    kwargs, digest, where = PINNED[scheme]
    X, y, w = _pinned_problem()
    workers = sorted(client.nthreads())
    for path, data in _pinned_variants(client, X, y, w, kwargs):
        assert _digest(data) == digest, path
        if data.client is not None:
            assert [workers.index(a) for a in data.workers()] == where, path


@pytest.mark.parametrize("scheme", ["iid", pytest.param("dirichlet", marks=pytest.mark.slow)])
def test_sparse_partitions_are_pinned(client, scheme):
    kwargs = PINNED[scheme][0]
    X, y, w = _pinned_problem(sparse=True)
    digests = {path: _digest(data)
               for path, data in _pinned_variants(client, X, y, w, kwargs, sparse=True)}
    assert set(digests.values()) == {SPARSE_PINNED[scheme]}, digests


SPARSE_PINNED = {"iid": "24119d614de228c2", "dirichlet": "25a71c9aa093878f"}


@pytest.mark.slow
def test_regression_partitions_are_pinned(client):
    X, _, w = _pinned_problem()
    y = X @ np.arange(1.0, 5.0)
    digests = {path: _digest(data) for path, data in
               _pinned_variants(client, X, y, w, dict(n_partitions=4, seed=5))}
    assert set(digests.values()) == {REGRESSION_PINNED}, digests


REGRESSION_PINNED = "c3365b12c6076b7c"


_NAN = ("X contains 1 NaN value(s) (first at source row 13); remove or impute them before "
        "partitioning, or pass check_finite=False")
PINNED_ERRORS = {   # messages as the code before the restructuring wrote them
    "nan-numpy-client": _NAN, "nan-numpy-local": _NAN,
    "nan-csr-client": _NAN, "nan-csr-local": _NAN,
    "shards-rows": "cannot cut 20 rows into 22 shards (11 partitions x 2 shards_per_partition)",
    "shards-spp": "shards_per_partition must be >= 1, got 0",
    "shards-nolabels": "scheme 'shards' needs labels y",
    "dirichlet-rows": "cannot cut 20 rows into 21 non-empty partitions",
    "dirichlet-alpha": "alpha must be > 0, got 0",
    "n_partitions": "n_partitions must be >= 1, got 0",
    "scheme": "unknown scheme 'x'; choose one of iid, shards, dirichlet",
}


def test_error_messages_are_pinned(client):
    import scipy.sparse as sp

    X = np.arange(60.0).reshape(20, 3)
    y = np.arange(20) % 4
    bad = X.copy()
    bad[13, 1], bad[17, 2] = np.nan, np.inf
    calls = {
        "nan-numpy-client": lambda: partition(bad, y, 4, client=client),
        "nan-numpy-local": lambda: partition(bad, y, 4, client=False),
        "nan-csr-client": lambda: partition(sp.csr_matrix(bad), y, 4, client=client),
        "nan-csr-local": lambda: partition(sp.csr_matrix(bad), y, 4, client=False),
        "shards-rows": lambda: partition(X, y, 11, scheme="shards", client=False),
        "shards-spp": lambda: partition(X, y, 2, scheme="shards", shards_per_partition=0,
                                        client=False),
        "shards-nolabels": lambda: partition(X, None, 2, scheme="shards", client=False),
        "dirichlet-rows": lambda: partition(X, y, 21, scheme="dirichlet", client=False),
        "dirichlet-alpha": lambda: partition(X, y, 2, scheme="dirichlet", alpha=0,
                                             client=False),
        "n_partitions": lambda: partition(X, y, 0, client=False),
        "scheme": lambda: partition(X, y, 2, scheme="x", client=False),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == PINNED_ERRORS[name], name
    # Chunks checked in parallel (dask source) or lazily name whichever bad row is met first.
    either = r"^X contains 1 (NaN|infinite) value\(s\) \(first at source row (13|17)\); remove"
    with pytest.raises(ValueError, match=either):
        partition(da.from_array(bad, chunks=7), y, 4, client=client)
    for lazy in (partition(bad, y, 4, client=False, persist=False),
                 partition(da.from_array(bad, chunks=7), y, 4, client=False, persist=False)):
        with pytest.raises(ValueError, match=either):
            lazy.X.compute(scheduler="sync")


def _addresses(block):
    """(address, item size) of each array a partition block holds on its worker."""
    arrays = ([block.data, block.indices, block.indptr] if hasattr(block, "indptr")
              else [block])
    return [(int(a.ctypes.data), a.itemsize) for a in arrays]


def test_scattered_partitions_arrive_aligned(client):
    """A scattered block lands wherever its bytes fall in the received frame; each
    one is stored aligned to its item size (784 float32 columns and int64 labels in
    4 partitions put half of them at odd addresses before)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    X = rng.random((6000, 784), dtype=np.float32)
    y = rng.integers(0, 10, 6000)
    w = rng.random(6000).astype(np.float32)
    S = sp.random(3001, 77, density=0.05, format="csr", random_state=0, dtype=np.float64)
    for data in (partition(X, y, 4, seed=0, client=client, sample_weight=w),
                 partition(S, rng.integers(0, 2, 3001), 3, seed=0, client=client)):
        futures = [f for blocks in data.partition_futures() for f in blocks if f is not None]
        where = client.gather(client.map(_addresses, futures, pure=False))
        assert all(addr % size == 0 for arrays in where for addr, size in arrays), where
