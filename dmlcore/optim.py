"""Optimizers on one flat parameter vector, as (init, update) pairs.

``state = opt.init(params, decay_mask=None)`` builds a small named tuple;
``state = opt.update(grad, state, params)`` applies one step IN PLACE to
``params`` (and to the state's arrays) with the compiled kernels of
``dmlcore._ext.optim`` and returns the new state (its ``step`` advanced).
``grad`` is the MEAN gradient of the loss (the driver divides the tree-summed
gradient once by the row count).

``decay_mask`` (bool, shape (n_params,)) marks the entries that weight decay
(L2) applies to: weights of trainable layers, never intercepts.

Learning rates may follow a schedule: ``lr * schedule(step)`` where a schedule
is any callable ``step -> factor``; the classes below are picklable and carry
their horizon (``total_steps``), which ``dml.fit`` fills in when left None.

``LBFGS`` is not an (init, update) optimizer: it is a full-batch solver that
drives a ``(loss, grad)`` function (one tree-reduced evaluation per call).
"""
from __future__ import annotations

import copy

import math
from typing import NamedTuple

import numpy as np

from ._ext import optim as _kernels


# ---- learning-rate schedules ------------------------------------------------
class Constant:
    """Factor 1 at every step."""

    total_steps = None

    def __call__(self, step):
        return 1.0


class StepDecay:
    """Factor ``gamma ** (step // every)``."""

    total_steps = None

    def __init__(self, every, gamma=0.1):
        if every <= 0:
            raise ValueError(f"StepDecay: every must be positive, got {every}")
        self.every, self.gamma = int(every), float(gamma)

    def __call__(self, step):
        return self.gamma ** (step // self.every)


class Cosine:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final`` at ``total_steps``."""

    def __init__(self, total_steps=None, warmup=0, final=0.0):
        self.total_steps, self.warmup, self.final = total_steps, int(warmup), float(final)

    def __call__(self, step):
        if self.total_steps is None:
            raise ValueError("Cosine schedule: total_steps is not set")
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total_steps - self.warmup, 1)
        t = min((step - self.warmup) / span, 1.0)
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * t))


SCHEDULES = {"constant": Constant, "step": StepDecay, "cosine": Cosine}


def make_schedule(schedule):
    """None, a callable, a name, or ``{"kind": name, **kwargs}`` -> a schedule callable."""
    if schedule is None:
        return Constant()
    if callable(schedule):
        return schedule
    if isinstance(schedule, str):
        schedule = {"kind": schedule}
    if isinstance(schedule, dict):
        kwargs = dict(schedule)
        kind = kwargs.pop("kind", None)
        if kind not in SCHEDULES:
            raise ValueError(f"schedule kind {kind!r} is not one of {', '.join(SCHEDULES)}")
        return SCHEDULES[kind](**kwargs)
    raise ValueError(f"schedule: expected a name, a dict or a callable, got {schedule!r}")


def _mask_bytes(decay_mask, n):
    if decay_mask is None:
        return None
    mask = np.ascontiguousarray(decay_mask, dtype=np.uint8)
    if mask.shape != (n,):
        raise ValueError(f"decay_mask: expected shape ({n},), got {mask.shape}")
    return mask


class _Optimizer:
    """Shared plumbing: the schedule and the learning rate at a step."""

    batch_solver = False        # an (init, update) optimizer: one update per step

    def __init__(self, lr, schedule):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.lr = float(lr)
        self.schedule = make_schedule(schedule)

    def set_horizon(self, total_steps):
        """Give a schedule without a horizon its total number of steps."""
        if getattr(self.schedule, "total_steps", 0) is None and hasattr(self.schedule, "warmup"):
            self.schedule.total_steps = int(total_steps)

    def lr_at(self, step):
        return self.lr * self.schedule(step)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "schedule")
        return f"{type(self).__name__}({args})"


# ---- SGD ---------------------------------------------------------------------
class SGDState(NamedTuple):
    step: int
    velocity: np.ndarray        # (n_params,), empty when momentum == 0
    decay_mask: np.ndarray | None


class SGD(_Optimizer):
    """SGD with optional (Nesterov) momentum and L2 weight decay (PyTorch semantics)."""

    def __init__(self, lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, schedule=None):
        super().__init__(lr, schedule)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.weight_decay = float(weight_decay)

    def init(self, params, decay_mask=None):
        n = params.shape[0]
        velocity = np.zeros(n if self.momentum else 0, dtype=params.dtype)
        return SGDState(0, velocity, _mask_bytes(decay_mask, n))

    def update(self, grad, state, params):
        _kernels.sgd_update(params, grad, state.velocity, self.lr_at(state.step),
                            self.momentum, self.nesterov, self.weight_decay, state.decay_mask)
        return state._replace(step=state.step + 1)


# ---- Adam --------------------------------------------------------------------
class AdamState(NamedTuple):
    step: int
    m: np.ndarray
    v: np.ndarray
    decay_mask: np.ndarray | None


class Adam(_Optimizer):
    """Adam (Kingma & Ba) with bias correction; AdamW when ``decoupled=True``."""

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 decoupled=False, schedule=None):
        super().__init__(lr, schedule)
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {beta}")
        if eps <= 0 or weight_decay < 0:
            raise ValueError("eps must be > 0 and weight_decay >= 0")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.weight_decay, self.decoupled = float(weight_decay), bool(decoupled)

    def init(self, params, decay_mask=None):
        n = params.shape[0]
        return AdamState(0, np.zeros(n, params.dtype), np.zeros(n, params.dtype),
                         _mask_bytes(decay_mask, n))

    def update(self, grad, state, params):
        step = state.step + 1
        _kernels.adam_update(params, grad, state.m, state.v, self.lr_at(state.step),
                             self.beta1, self.beta2, self.eps, step, self.weight_decay,
                             state.decay_mask, self.decoupled)
        return state._replace(step=step)


# ---- L-BFGS --------------------------------------------------------------------
class LBFGS:
    """Full-batch L-BFGS (scipy's L-BFGS-B) over a tree-reduced ``(loss, grad)``.

    Every function evaluation, line-search trials included, is ONE call of the
    ``(loss, grad)`` function, hence one scheduler round trip. The objective is
    ``mean loss + weight_decay / 2 * ||params[decay_mask]||^2``.
    ``max_iter`` counts L-BFGS iterations (one history step each); ``tol`` is
    the projected-gradient tolerance (scikit-learn's meaning for lbfgs).
    """

    batch_solver = True         # drives its own iterations (``iterations``); no init/update

    def __init__(self, max_iter=100, tol=1e-6, history=10, weight_decay=0.0, ftol=None):
        if max_iter < 1 or history < 1 or tol < 0 or weight_decay < 0:
            raise ValueError("LBFGS: need max_iter >= 1, history >= 1, tol >= 0, weight_decay >= 0")
        self.max_iter, self.tol, self.history = int(max_iter), float(tol), int(history)
        self.weight_decay = float(weight_decay)
        self.ftol = 64 * np.finfo(float).eps if ftol is None else float(ftol)

    def minimize(self, loss_grad, x0, decay_mask=None, callback=None):
        """Minimise; ``loss_grad(x) -> (mean loss, mean grad)``; returns scipy's result.

        ``callback(x, loss)`` is called after each iteration with the data loss.
        """
        from scipy.optimize import minimize

        dtype = x0.dtype
        smooth = self._smooth(loss_grad, dtype, _mask(x0, decay_mask))
        last = {}

        def objective(x):
            last["loss"], f, g = smooth(x)
            return f, g

        def on_iteration(intermediate_result):
            if callback is not None:
                callback(intermediate_result.x.astype(dtype), last.get("loss"))

        return minimize(objective, x0.astype(np.float64), jac=True, method="L-BFGS-B",
                        callback=on_iteration,
                        options={"maxiter": self.max_iter, "gtol": self.tol,
                                 "ftol": self.ftol, "maxcor": self.history,
                                 "maxfun": 20 * self.max_iter})

    def _smooth(self, loss_grad, dtype, mask):
        """``x -> (mean loss, mean loss + weight_decay/2 ||x[mask]||^2, its gradient)``
        for float64 ``x``, ``loss_grad`` called in ``dtype`` (one call each)."""
        lam = self.weight_decay

        def smooth(x):
            loss, grad = loss_grad(x.astype(dtype, copy=False))
            grad = np.array(grad, dtype=np.float64)
            w = x * mask
            return float(loss), float(loss) + 0.5 * lam * float(w @ w), grad + lam * w

        return smooth

    def iterations(self, loss_grad, x0, decay_mask=None, max_iter=None):
        """Run ``minimize`` in a thread; yields ``(x, data loss)`` after each
        iteration and returns scipy's result (``result = yield from ...``).

        At most ``max_iter`` iterations (default ``self.max_iter``). Closing
        the generator stops the solver at its next evaluation; an error in
        ``loss_grad`` is raised here.
        """
        import queue
        import threading

        solver = copy.copy(self)
        solver.max_iter = int(max_iter or self.max_iter)
        records: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def checked(x):
            if stop.is_set():
                raise StopIteration
            return loss_grad(x)

        def solve():
            try:
                result = solver.minimize(checked, x0, decay_mask,
                                         callback=lambda x, loss: records.put(("step", x, loss)))
                records.put(("done", result, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                records.put(("error", exc, None))

        thread = threading.Thread(target=solve, name="dmlcore-lbfgs", daemon=True)
        thread.start()
        try:
            while True:
                kind, payload, loss = records.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    return payload
                yield payload, float(loss)
        finally:
            stop.set()
            while thread.is_alive():        # unblock a solver waiting to put a record
                try:
                    records.get(timeout=0.05)
                except queue.Empty:
                    pass

    def __repr__(self):
        return (f"LBFGS(max_iter={self.max_iter}, tol={self.tol}, history={self.history}, "
                f"weight_decay={self.weight_decay})")


# ---- OWL-QN (L1 and elastic net) ----------------------------------------------------
class OWLQN(LBFGS):
    """Orthant-wise limited-memory quasi-Newton (Andrew & Gao, ICML 2007) over a
    tree-reduced ``(loss, grad)``: L-BFGS for objectives with an L1 term.

    Objective: ``mean loss + weight_decay/2 ||w||^2 + l1 ||w||_1`` over the
    weight entries ``w = params[decay_mask]`` (intercepts unpenalised). Every
    function evaluation is ONE call of ``loss_grad``. Entries that the
    orthant projection sets to zero are exactly 0.0. Stops after ``max_iter``
    iterations, when the pseudo-gradient's largest entry is <= ``tol``, or
    when an iteration lowers the objective by <= ``ftol`` relative. Returns a
    ``scipy.optimize.OptimizeResult`` (x, fun, nit, nfev, success, message).
    """

    def __init__(self, l1=0.0, max_iter=100, tol=1e-6, history=10, weight_decay=0.0,
                 ftol=None):
        super().__init__(max_iter=max_iter, tol=tol, history=history,
                         weight_decay=weight_decay, ftol=ftol)
        if not l1 >= 0:
            raise ValueError(f"OWLQN: l1 must be >= 0, got {l1}")
        self.l1 = float(l1)

    def minimize(self, loss_grad, x0, decay_mask=None, callback=None):
        """Minimise; ``loss_grad(x) -> (mean loss, mean grad)``; ``callback(x,
        data loss)`` after each iteration."""
        from scipy.optimize import OptimizeResult

        dtype = x0.dtype
        mask = _mask(x0, decay_mask)
        l1 = np.where(mask, self.l1, 0.0)              # per-entry L1 weight
        penalised, nfev = self._smooth(loss_grad, dtype, mask), [0]

        def smooth(x):
            nfev[0] += 1
            return penalised(x)

        x = x0.astype(np.float64)
        loss, f, g = smooth(x)
        F = f + float(l1 @ np.abs(x))
        S, Y, message, success, nit = [], [], "max_iter was reached", False, 0
        while nit < self.max_iter:
            pg = _pseudo_gradient(x, g, l1)
            if np.abs(pg).max() <= self.tol:
                message, success = "the pseudo-gradient is below tol", True
                break
            d = -_two_loop(pg, S, Y)
            d[d * pg >= 0] = 0.0                       # keep to the descent orthant
            if not (d @ pg) < 0:                       # no descent left in these pairs
                S, Y = [], []
                d = -pg
            orthant = np.where(x != 0, np.sign(x), -np.sign(pg))
            step = 1.0 if S else 1.0 / max(np.abs(pg).sum(), 1.0)
            for _ in range(40):                        # projected backtracking (Armijo)
                x_new = x + step * d
                x_new[(np.sign(x_new) != orthant) & (l1 > 0)] = 0.0
                loss_new, f_new, g_new = smooth(x_new)
                F_new = f_new + float(l1 @ np.abs(x_new))
                if F_new <= F + 1e-4 * float(pg @ (x_new - x)):
                    break
                step *= 0.5
            else:
                message = "the line search found no decrease (precision reached)"
                success = True
                break
            s_k, y_k = x_new - x, g_new - g
            if s_k @ y_k > 1e-12 * max(float(y_k @ y_k), 1e-300):
                S.append(s_k)
                Y.append(y_k)
                if len(S) > self.history:
                    S.pop(0)
                    Y.pop(0)
            decrease = (F - F_new) / max(abs(F), abs(F_new), 1.0)
            x, loss, g, F = x_new, loss_new, g_new, F_new
            nit += 1
            if callback is not None:
                callback(x.astype(dtype), loss)
            if decrease <= self.ftol:
                message, success = "the relative decrease is below ftol", True
                break
        return OptimizeResult(x=x, fun=F, nit=nit, nfev=nfev[0], success=success,
                              message=message)

    def __repr__(self):
        return (f"OWLQN(l1={self.l1}, max_iter={self.max_iter}, tol={self.tol}, "
                f"history={self.history}, weight_decay={self.weight_decay})")


def _mask(x0, decay_mask):
    """The penalised entries as a boolean vector (all of them for None)."""
    return np.ones(x0.shape[0], bool) if decay_mask is None else np.asarray(decay_mask, bool)


def _pseudo_gradient(x, g, l1):
    """The L1 objective's steepest-descent pseudo-gradient (Andrew & Gao, eq. 4)."""
    right, left = g + l1, g - l1
    pg = np.where(x > 0, right, np.where(x < 0, left, 0.0))
    at_zero = x == 0
    pg = np.where(at_zero & (right < 0), right, pg)
    return np.where(at_zero & (left > 0), left, pg)


def _two_loop(q, S, Y):
    """The L-BFGS inverse-Hessian approximation from pairs (S, Y) times ``q``."""
    q = q.copy()
    alphas = []
    for s, y in zip(reversed(S), reversed(Y)):
        a = (s @ q) / (y @ s)
        alphas.append(a)
        q -= a * y
    if S:
        q *= (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1])
    for (s, y), a in zip(zip(S, Y), reversed(alphas)):
        q += (a - (y @ q) / (y @ s)) * s
    return q
