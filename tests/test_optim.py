"""Optimizers (dmlcore.optim) through their public (init, update) API."""
import numpy as np
import pytest

from dmlcore import optim


def quadratic(n=6, seed=0):
    rng = np.random.default_rng(seed)
    Q = rng.normal(size=(n, n))
    A = Q @ Q.T / n + np.eye(n)
    b = rng.normal(size=n)
    return A, b, np.linalg.solve(A, b)


def rosenbrock_grad(p):
    x, y = p
    return np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


OPTIMIZERS = {
    "sgd": lambda: optim.SGD(lr=0.1),
    "momentum": lambda: optim.SGD(lr=0.05, momentum=0.9),
    "nesterov": lambda: optim.SGD(lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda: optim.Adam(lr=0.05),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_minimises_quadratic(name, dtype):
    A, b, solution = quadratic()
    opt = OPTIMIZERS[name]()
    x = np.zeros(len(b), dtype)
    state = opt.init(x)
    for _ in range(3000):
        state = opt.update((A @ x - b).astype(dtype), state, x)
    assert state.step == 3000
    tol = 1e-6 if dtype == np.float64 else 1e-3
    np.testing.assert_allclose(x, solution, atol=tol)


@pytest.mark.parametrize("opt", [optim.SGD(lr=1e-3, momentum=0.9), optim.Adam(lr=0.01),
                                 optim.SGD(lr=1e-3, momentum=0.9, nesterov=True)],
                         ids=["momentum", "adam", "nesterov"])
def test_minimises_rosenbrock(opt):
    p = np.array([-1.2, 1.0])
    state = opt.init(p)
    for _ in range(40000):
        state = opt.update(rosenbrock_grad(p), state, p)
    np.testing.assert_allclose(p, [1.0, 1.0], atol=2e-3)


def test_weight_decay_spares_masked_entries():
    opt = optim.SGD(lr=0.1, weight_decay=0.5)
    p = np.ones(4)
    mask = np.array([True, True, False, False])
    state = opt.init(p, decay_mask=mask)
    opt.update(np.zeros(4), state, p)
    np.testing.assert_array_equal(p, [0.95, 0.95, 1.0, 1.0])


def test_adam_first_step_is_lr_sized():
    opt = optim.Adam(lr=0.01)
    p = np.zeros(3)
    state = opt.init(p)
    opt.update(np.array([1.0, -2.0, 1e-3]), state, p)
    np.testing.assert_allclose(p, [-0.01, 0.01, -0.01], rtol=1e-4)


def test_schedules():
    cos = optim.Cosine(total_steps=10, warmup=2, final=0.1)
    assert cos(0) == pytest.approx(0.5) and cos(1) == pytest.approx(1.0)
    assert cos(2) == pytest.approx(1.0) and cos(10) == pytest.approx(0.1)
    step = optim.StepDecay(every=3, gamma=0.5)
    assert [step(i) for i in (0, 2, 3, 7)] == [1.0, 1.0, 0.5, 0.25]
    opt = optim.SGD(lr=0.2, schedule="cosine")
    opt.set_horizon(100)
    assert opt.lr_at(0) == pytest.approx(0.2) and opt.lr_at(100) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule kind"):
        optim.make_schedule({"kind": "nope"})


def test_lbfgs_solves_quadratic():
    A, b, solution = quadratic(n=20)
    result = optim.LBFGS(max_iter=200, tol=1e-10).minimize(
        lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), np.zeros(20))
    np.testing.assert_allclose(result.x, solution, atol=1e-7)


@pytest.mark.parametrize("bad", [dict(lr=0), dict(momentum=1.0), dict(nesterov=True),
                                 dict(weight_decay=-1)])
def test_bad_hyperparameters(bad):
    with pytest.raises(ValueError):
        optim.SGD(**bad)
