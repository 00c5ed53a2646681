"""Atomic checkpoints and the tree reduction's pure parts."""
import numpy as np
import pytest

from dmlcore import checkpoint as ckpt
from dmlcore.aggregate import add_partials, tree_reduce
from dmlcore.optim import SGD


def test_save_load_roundtrip_and_keep(tmp_path):
    opt = SGD(lr=0.1, momentum=0.9)
    params = np.arange(5.0)
    state = opt.init(params, decay_mask=np.array([1, 1, 1, 0, 0], bool))
    state = opt.update(np.ones(5), state, params)
    for step in (1, 2, 3, 4):
        ckpt.save(tmp_path, step, params * step, state, {"loss": [1.0] * step}, keep=2)
    files = ckpt.list_checkpoints(tmp_path)
    assert [f.name for f in files] == ["ckpt-000000003.npz", "ckpt-000000004.npz"]
    saved = ckpt.latest(tmp_path)
    assert saved["step"] == 4
    np.testing.assert_array_equal(saved["params"], params * 4)
    restored = ckpt.restore_state(opt.init(params), saved["opt"])
    assert restored.step == 1
    np.testing.assert_array_equal(restored.velocity, state.velocity)
    assert list(saved["history"]["loss"]) == [1.0] * 4


def test_latest_skips_a_damaged_file(tmp_path):
    ckpt.save(tmp_path, 1, np.ones(3))
    (tmp_path / "ckpt-000000002.npz").write_bytes(b"not a zip file")
    assert ckpt.latest(tmp_path)["step"] == 1


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def failing(f):
        f.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_add_partials():
    a = (1.0, np.array([1.0, 2.0]), 3)
    b = (2.0, np.array([10.0, 20.0]), 4)
    total = add_partials(a, b)
    assert total[0] == 3.0 and total[2] == 7
    np.testing.assert_array_equal(total[1], [11.0, 22.0])
    np.testing.assert_array_equal(a[1], [1.0, 2.0])          # inputs untouched


@pytest.mark.parametrize("fan_in", [2, 3, 8])
def test_tree_reduce_on_cluster(client, fan_in):
    futures = [client.submit(lambda i: (float(i), np.full(3, float(i)), 1), i, pure=False)
               for i in range(11)]
    loss, vec, rows = tree_reduce(client, futures, fan_in).result()
    assert (loss, rows) == (55.0, 11)
    np.testing.assert_array_equal(vec, np.full(3, 55.0))


# ---- two runs in one directory (issue 13) ------------------------------------------
def _problem(n=200, d=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (X @ rng.normal(size=d) > 0).astype(np.float64)
    return X, y


def _fit(model, steps, every, **kw):
    import dmlcore as dml

    X, y = _problem(d=model.n_features)
    data = dml.partition(X, y, n_partitions=2, seed=0, client=False)
    return dml.fit(model, data, dml.SyncSGD(batch_size=20), dml.optim.SGD(lr=0.1),
                   steps=steps, checkpoint_every=every, client=False, progress=False, **kw)


def test_a_second_run_keeps_its_own_checkpoints_and_resumes_itself(tmp_path):
    import dmlcore as dml

    model = dml.models.Logistic(4)
    first = _fit(model, 300, 100, checkpoint_dir=tmp_path)          # steps 100, 200, 300
    second = _fit(model, 20, 5, checkpoint_dir=tmp_path, callbacks=[lambda s, r, p: s == 10])
    ids = {first.history.attrs["run_id"], second.history.attrs["run_id"]}
    assert len(ids) == 2
    mine = ckpt.list_checkpoints(tmp_path, run_id=second.history.attrs["run_id"])
    assert [ckpt.load(p)["step"] for p in mine] == [5, 10]          # not deleted by run 1's
    assert len(ckpt.list_checkpoints(tmp_path, run_id=first.history.attrs["run_id"])) == 3
    resumed = _fit(model, 20, 5, checkpoint_dir=tmp_path, resume=True)
    straight = _fit(model, 20, 5)
    assert resumed.history.attrs["run_id"] == second.history.attrs["run_id"]
    assert list(resumed.history.step.values) == list(range(1, 21))
    np.testing.assert_array_equal(resumed.params, straight.params)
    # asking for run 1 by id: it is at step 300 of 300, so nothing is left to do
    with pytest.raises(ValueError, match="step 300"):
        _fit(model, 300, 100, checkpoint_dir=tmp_path, resume=first.history.attrs["run_id"])


def test_resume_refuses_another_model_or_an_unknown_run(tmp_path):
    import dmlcore as dml

    _fit(dml.models.Logistic(4), 10, 5, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="written for the model"):
        _fit(dml.models.Linear(4), 10, 5, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="no checkpoint of run 0123456789ab"):
        _fit(dml.models.Logistic(4), 10, 5, checkpoint_dir=tmp_path, resume="0123456789ab")


def test_rotation_orders_by_step_number_not_name(tmp_path):
    for step in (9, 10, 999999999, 1000000000):       # the last has ten digits
        ckpt.save(tmp_path, step, np.ones(2), run_id="abc")
    assert [ckpt.load(p)["step"] for p in ckpt.list_checkpoints(tmp_path)] == [
        10, 999999999, 1000000000]
    assert ckpt.latest(tmp_path)["step"] == 1000000000
