"""Atomic checkpoints and the tree reduction's pure parts."""
import numpy as np
import pytest

from dmlcore import checkpoint as ckpt
from dmlcore.aggregate import add_partials, tree_reduce, weighted_sum
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


def test_add_partials_and_weighted_sum():
    a = (1.0, np.array([1.0, 2.0]), 3)
    b = (2.0, np.array([10.0, 20.0]), 4)
    total = add_partials(a, b)
    assert total[0] == 3.0 and total[2] == 7
    np.testing.assert_array_equal(total[1], [11.0, 22.0])
    np.testing.assert_array_equal(a[1], [1.0, 2.0])          # inputs untouched
    vec, weight = weighted_sum([(np.array([1.0, 0.0]), 3), (np.array([0.0, 1.0]), 1)])
    np.testing.assert_array_equal(vec / weight, [0.75, 0.25])


@pytest.mark.parametrize("fan_in", [2, 3, 8])
def test_tree_reduce_on_cluster(client, fan_in):
    futures = [client.submit(lambda i: (float(i), np.full(3, float(i)), 1), i, pure=False)
               for i in range(11)]
    loss, vec, rows = tree_reduce(client, futures, fan_in).result()
    assert (loss, rows) == (55.0, 11)
    np.testing.assert_array_equal(vec, np.full(3, 55.0))
