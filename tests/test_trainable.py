"""Training a subset of layers (``trainable=[...]``) with SyncSGD and FedAvg.

Frozen layers stay bit-identical, the trainable layers follow the same
gradient as in full training, and ``bytes_sent`` per step scales exactly with
the trainable share of the parameters. (That the MLP kernel does no work
below the lowest trainable layer is a speed property: it is measured in
``benchmarks/bench_partial.py``, not asserted here.)
"""
import numpy as np
import pytest

import dmlcore as dml
from dmlcore.strategies.fedavg import FedAvg

MODEL = dml.models.MLP([10, 16, 12, 3])


def _blobs(n=240, d=10, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=2.0, size=(k, d))
    y = rng.integers(k, size=n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def _slices(trainable):
    sl = MODEL.layer_slices
    frozen = [n for n in MODEL.layer_names if n not in trainable]
    return [sl[n] for n in trainable], [sl[n] for n in frozen]


@pytest.mark.parametrize("trainable", [["layer2"], ["layer1"], ["layer0", "layer2"]])
def test_partial_gradient_matches_full(trainable):
    X, y = _blobs()
    X = X.astype(np.float64)
    p = MODEL.init(1, dtype=np.float64)
    full, part = np.empty_like(p), np.full_like(p, np.nan)
    loss_full = MODEL.loss_grad(p, X, y, full)
    loss_part = MODEL.loss_grad(p, X, y, part, trainable=trainable)
    assert loss_part == pytest.approx(loss_full, rel=1e-12)
    trained, frozen = _slices(trainable)
    for s in trained:
        np.testing.assert_allclose(part[s], full[s], rtol=1e-10, atol=1e-12)
    for s in frozen:
        assert (part[s] == 0).all()


def test_sync_full_batch_step_oracle():
    """One full-batch SGD step on layer1 only = w - lr * (full mean gradient) on layer1."""
    X, y = _blobs()
    data = dml.partition(X, y, n_partitions=3, seed=0, client=False)
    p0 = MODEL.init(0, dtype=np.float32)
    res = dml.fit(MODEL, data, dml.SyncSGD(batch_size=None, trainable=["layer1"]),
                  dml.optim.SGD(lr=0.5), steps=1, client=False, progress=False)
    grad = np.empty_like(p0)
    MODEL.loss_grad(p0, X, y, grad)
    expected = p0.copy()
    s = MODEL.layer_slices["layer1"]
    expected[s] -= np.float32(0.5) * (grad[s] / np.float32(len(y)))
    np.testing.assert_allclose(res.params, expected, rtol=0, atol=1e-6)
    mask = MODEL.trainable_mask(["layer1"])
    np.testing.assert_array_equal(res.params[~mask], p0[~mask])


def _share(trainable, model=MODEL):
    return model.trainable_mask(trainable).sum() / model.n_params


# bytes are what the transport counted (headers included): a model whose
# vectors dwarf the ~0.3 KB of headers per message shows the payload's share
WIDE = dml.models.MLP([10, 256, 64, 3])


@pytest.mark.parametrize("transport", ["actors", "tasks"])
def test_sync_frozen_bit_identical_and_bytes_scale(client, transport):
    X, y = _blobs()
    data = dml.partition(X, y, n_partitions=4, seed=0, client=client)
    p0 = WIDE.init(0, dtype=np.float32)
    kw = dict(client=client, steps=3, progress=False)
    opt = dml.optim.SGD(lr=0.1, momentum=0.9)
    part = dml.fit(WIDE, data, dml.SyncSGD(batch_size=16, transport=transport,
                                           trainable=["layer1"]), opt, **kw)
    full = dml.fit(WIDE, data, dml.SyncSGD(batch_size=16, transport=transport), opt, **kw)
    mask = WIDE.trainable_mask(["layer1"])
    np.testing.assert_array_equal(part.params[~mask], p0[~mask])    # bit-identical
    assert np.abs(part.params[mask] - p0[mask]).max() > 1e-4        # and the rest trained
    ratio = part.history["bytes_sent"].values / full.history["bytes_sent"].values
    np.testing.assert_allclose(ratio, _share(["layer1"], WIDE), rtol=0.02)
    assert (full.history["bytes_sent"] > 0).all()


def test_fedavg_frozen_bit_identical_and_bytes_scale(client):
    X, y = _blobs()
    data = dml.partition(X, y, n_partitions=4, seed=0, client=client)
    p0 = WIDE.init(0, dtype=np.float32)
    opt = dml.optim.SGD(lr=0.1)
    kw = dict(client=client, rounds=2, progress=False)
    trainable = ["layer1", "layer2"]
    part = dml.fit(WIDE, data, FedAvg(1.0, local_epochs=1, batch_size=10,
                                      trainable=trainable), opt, **kw)
    full = dml.fit(WIDE, data, FedAvg(1.0, local_epochs=1, batch_size=10), opt, **kw)
    mask = WIDE.trainable_mask(trainable)
    np.testing.assert_array_equal(part.params[~mask], p0[~mask])
    assert np.abs(part.params[mask] - p0[mask]).max() > 1e-4
    ratio = part.history["bytes_sent"].values / full.history["bytes_sent"].values
    np.testing.assert_allclose(ratio, _share(trainable, WIDE), rtol=0.02)


def test_fedavg_partial_equals_local_oracle():
    """FedAvg with a frozen first layer, one client: the local oracle with ``trainable``."""
    from dmlcore import local

    X, y = _blobs()
    data = dml.partition(X, y, n_partitions=1, seed=0, client=False)
    opt = dml.optim.SGD(lr=0.1)
    res = dml.fit(MODEL, data, FedAvg(1, local_epochs=1, batch_size=24, trainable=["layer2"]),
                  opt, rounds=1, client=False, progress=False)
    Xp = np.asarray(data.x_blocks()[0].compute(scheduler="sync"))
    yp = np.asarray(data.y_blocks()[0].compute(scheduler="sync"))
    p0 = MODEL.init(0, dtype=np.float32)
    values, _, _ = local.local_sgd(MODEL, opt, p0, Xp, yp, batch_size=24, n_steps=10, seed=0,
                                   partition=0, view=MODEL.trainable_view(["layer2"]))
    expected = p0.copy()
    expected[MODEL.trainable_mask(["layer2"])] = values
    np.testing.assert_array_equal(res.params, expected)
