"""scikit-learn compatible estimators on top of ``dml.fit``.

Each estimator validates its input as scikit-learn does (``validate_data``),
builds a dmlcore model, partitions the data and calls ``dml.fit``; the
fitted parameters become the usual attributes (``coef_``, ``classes_``,
``n_iter_``, ``history_``...). ``client=``: a ``distributed.Client`` (that
cluster), ``False`` (this process), ``None`` (the default client if any,
else this process; no cluster is started). Inside a task on a Dask worker
(dask-ml's or joblib-dask searches) the fit runs in that task. ``clone``
keeps the client object; dask arrays of unknown chunk sizes are measured.

Objectives are scikit-learn's, written as a MEAN data loss over n rows (the
total weight with ``sample_weight``/``class_weight``) plus penalties on the
weights only (intercepts never): ``LinearRegression``: Ridge's ``||y - Xw -
b||^2 + alpha ||w||^2`` -> weight_decay alpha/n, or Lasso/ElasticNet's
objective (``penalty``, ``l1_ratio``); ``LogisticRegression``: ``C sum loss +
r ||W||_1 + (1 - r)/2 ||W||^2`` -> l1 r/(C n), weight_decay (1 - r)/(C n)
(two classes: ``models.Logistic``; more: ``models.Softmax``); MLPs: mean
loss with ``alpha / batch`` weight decay per step.

The GLMs solve with full-batch L-BFGS (OWL-QN with an L1 term) over one
tree-reduced (loss, gradient) per evaluation; with a mini-batch strategy
(``"ps"``, ``"fedavg"``, SyncSGD with a batch size) L2 fits fall back to Adam
over ``max_iter`` epochs. ``fit_intercept=False``: bias fixed at exactly 0.
"""
from __future__ import annotations

import copy
import inspect
import math
import numbers
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from . import optim
from .models.base import Model
from .penalty import l1_share, linear_strengths, logistic_strengths

__all__ = ["LinearRegression", "LogisticRegression", "MLPClassifier", "MLPRegressor"]

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _is_dask(a) -> bool:
    try:
        import dask.array as da
    except ImportError:        # pragma: no cover - dask is a dependency
        return False
    return isinstance(a, da.Array)


def _default_client():
    try:
        from distributed import default_client
        return default_client()
    except (ImportError, ValueError):
        return None


class _Placement:
    """Where a fit runs: ``client`` (None = this process) and who closes what."""

    def __init__(self, client, close=lambda: None):
        self.client = client
        self.close = close

    @property
    def n_workers(self):
        return 1 if self.client is None else max(1, len(self.client.nthreads()))


def _in_dask_task() -> bool:
    """True when called from inside a task running on a Dask worker."""
    try:
        from distributed import get_worker
        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _placement(client, X):
    """Resolve the estimator's ``client`` parameter for input ``X`` (see module doc)."""
    from .cluster import prepare

    if client is False:
        return _Placement(None)
    if _in_dask_task():
        # A fit inside a worker task (dask-ml's searches, joblib's dask backend):
        # creating executors on the same cluster would wait for worker threads
        # that the outer tasks hold. Fit this block here instead.
        return _Placement(None)
    if client is not None:
        return _Placement(prepare(client))
    found = _default_client()
    if found is None:
        # No running client: run here, as dask-ml does on dask's local
        # scheduler; never start (and tear down) a cluster per fit.
        return _Placement(None)
    return _Placement(prepare(found))


def _validate_dask(estimator, X, y, *, reset, classifier, multi_output=False):
    """Light validation of dask input (the values are checked when partitioned)."""
    if X.ndim == 2 and any(math.isnan(c) for c in X.chunks[0]):
        X = X.compute_chunk_sizes()          # as dask-ml does for ``ddf.values``
    if X.ndim != 2:
        raise ValueError(f"Expected a 2-dimensional array, got shape {X.shape}; reshape "
                         "your data.")
    if X.dtype.kind not in "fiub":
        raise ValueError(f"X must be numeric, got dtype {X.dtype}")
    n_features = int(X.shape[1])
    if reset:
        estimator.n_features_in_ = n_features
    elif n_features != estimator.n_features_in_:
        raise ValueError(f"X has {n_features} features, but {type(estimator).__name__} is "
                         f"expecting {estimator.n_features_in_} features as input.")
    if y is None:
        return X, None
    y = np.asarray(y.compute() if _is_dask(y) else y)
    from sklearn.utils.validation import column_or_1d

    if not (multi_output and y.ndim == 2):
        y = column_or_1d(y, warn=True)
    if len(y) != X.shape[0]:
        raise ValueError(f"Found input variables with inconsistent numbers of samples: "
                         f"[{X.shape[0]}, {len(y)}]")
    if not classifier:
        y = y.astype(np.float64)
        if not np.isfinite(y).all():
            raise ValueError("Input y contains NaN or infinity.")
    return X, y


def _float_dtype(X):
    return np.float32 if np.dtype(X.dtype) == np.float32 else np.float64


def _check_positive(name, value, *, integer=False, allow_zero=False):
    kinds = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {what} {bound}, got {value!r}")


def _resolve_strategy(strategy, *, batch_size):
    """A Strategy instance from the ``strategy`` parameter (strategies hold
    configuration only, so a given one serves as it is: fits never mutate it)."""
    from .strategies import SyncSGD
    from .strategies.base import Strategy

    if isinstance(strategy, Strategy):
        return strategy
    if strategy == "sync":
        return SyncSGD(batch_size=batch_size)
    if strategy in ("ps", "fedavg"):
        import dmlcore

        name = "ParameterServer" if strategy == "ps" else "FedAvg"
        cls = getattr(dmlcore, name, None)
        if cls is None:
            try:
                from . import strategies
                cls = getattr(strategies, name)
            except AttributeError:
                raise ValueError(f"strategy={strategy!r} needs dml.{name}, which this "
                                 "installation does not provide") from None
        kwargs = {}
        params = inspect.signature(cls).parameters
        if "batch_size" in params:
            kwargs["batch_size"] = batch_size
        if strategy == "fedavg" and "clients_per_round" in params:
            kwargs["clients_per_round"] = 1.0
        return cls(**kwargs)
    raise ValueError(f"strategy must be 'sync', 'ps', 'fedavg' or a dmlcore Strategy, "
                     f"got {strategy!r}")


def _partition(X, y, placement, n_partitions, seed, in_place=False, sample_weight=None):
    """PartitionedData for ``(X, y)`` where the fit runs.

    ``in_place`` (full-batch solvers, whose gradient does not depend on how
    the rows are split): dask input on a cluster, with ``n_partitions=None``,
    keeps its balanced chunks where they lie (``data.partition_in_place``)
    instead of moving every row into iid partitions.
    """
    from .data import partition, partition_in_place

    if in_place and n_partitions is None and placement.client is not None and _is_dask(X):
        return partition_in_place(X, y, client=placement.client, seed=seed,
                                  sample_weight=sample_weight)

    if n_partitions is None:
        n_partitions = placement.n_workers
    n_partitions = max(1, min(int(n_partitions), int(X.shape[0])))
    if placement.client is None:
        # client=False + persist=False: the partitions stay in this process even
        # when a default client exists (computed with the synchronous scheduler).
        return partition(X, y, n_partitions=n_partitions, seed=seed, client=False,
                         persist=False, check_finite=_is_dask(X), sample_weight=sample_weight)
    return partition(X, y, n_partitions=n_partitions, seed=seed, client=placement.client,
                     check_finite=_is_dask(X), sample_weight=sample_weight)


def _row_weights(estimator, X, sample_weight, codes=None):
    """Row weights of a fit: ``sample_weight`` (validated as scikit-learn does)
    times the class weights of ``estimator.class_weight`` (None, "balanced" or
    {label: weight}) for class codes ``codes``; None when every weight is 1.
    Checked as ``data.partition`` checks weights (finite, >= 0, a positive
    total), before anything uses them (the MLPs' input statistics)."""
    from sklearn.utils.class_weight import compute_class_weight
    from sklearn.utils.validation import _check_sample_weight

    from .data import _prepare_weights

    class_weight = getattr(estimator, "class_weight", None)
    if sample_weight is None and class_weight is None:
        return None
    n = X.shape[0]
    if _is_dask(sample_weight):
        sample_weight = sample_weight.compute()
    w = _check_sample_weight(sample_weight, np.empty((n, 0)), dtype=np.float64)
    if class_weight is not None:
        if codes is None or codes.ndim != 1:
            raise ValueError("class_weight needs 1-D class labels (not a multilabel y)")
        # "balanced" counts the rows by their sample weights, as scikit-learn does
        factors = compute_class_weight(class_weight, classes=estimator.classes_,
                                       y=estimator.classes_[codes],
                                       sample_weight=None if sample_weight is None else w)
        w = w * factors[codes]
    return _prepare_weights(w, np.dtype(np.float64), n)


def _total_weight(n, weights):
    """The n of the objectives: the row count, or the total weight."""
    return float(n) if weights is None else float(np.sum(weights, dtype=np.float64))


def _seed(random_state):
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


class _NoIntercept(Model):
    """A GLM with its bias pinned at 0: bias gradient zeroed, bias initialised to 0."""

    def __init__(self, inner):
        self.inner = inner
        self._bias = ~inner.weight_mask()

    def _layer_shapes(self):
        return self.inner._layer_shapes()

    @property
    def is_classifier(self):
        return self.inner.is_classifier

    @property
    def n_features(self):
        return self.inner.n_features

    @property
    def n_outputs(self):
        return getattr(self.inner, "n_outputs", None)

    def init(self, seed=0, dtype=np.float64):
        params = self.inner.init(seed, dtype=dtype)
        params[self._bias] = 0
        return params

    def loss_grad(self, params, X, y, grad, trainable=None, sample_weight=None):
        loss = self.inner.loss_grad(params, X, y, grad, trainable=trainable,
                                    sample_weight=sample_weight)
        grad[self._bias] = 0
        return loss

    def predict(self, params, X):
        return self.inner.predict(params, X)

    def to_config(self):
        return self.inner.to_config()


def _glm_params(model, params, n_features):
    """``(coef (k, n_features), intercept (k,))`` from a one-layer model's parameters."""
    (layer,) = model.views(params).values()
    W = np.asarray(layer["W"])
    b = np.asarray(layer["b"]).reshape(-1)
    k = b.shape[0]
    if W.shape == (n_features, k) or W.shape == (n_features,):
        coef = W.reshape(n_features, k).T
    else:                                   # a (k, n_features) layout
        coef = W.reshape(k, n_features)
    return np.ascontiguousarray(coef), b.copy()


class _Resume:
    """Optimizer mixin: ``init`` returns a copy of the state a previous fit ended
    with (``partial_fit`` continues the optimizer, as scikit-learn's does)."""

    _resume = None

    def init(self, params, decay_mask=None):
        fresh = super().init(params, decay_mask)
        saved = self._resume
        if saved is None or type(saved) is not type(fresh) or any(
                isinstance(a, np.ndarray) and (not isinstance(b, np.ndarray) or a.shape != b.shape)
                for a, b in zip(fresh, saved)):
            return fresh
        return type(fresh)(*[b.copy() if isinstance(b, np.ndarray) else b for b in saved])

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if k not in ("schedule", "_resume"))
        return f"{type(self).__mro__[2].__name__}({args})"


class _AdamFrom(_Resume, optim.Adam):
    pass


class _SGDFrom(_Resume, optim.SGD):
    pass


def _resumed(optimizer, state):
    """``optimizer`` (Adam or SGD) whose ``init`` returns ``state``."""
    cls = _AdamFrom if type(optimizer) is optim.Adam else (
        _SGDFrom if type(optimizer) is optim.SGD else None)
    if cls is None or state is None:
        return optimizer
    out = cls.__new__(cls)
    out.__dict__.update(vars(optimizer))
    out._resume = state
    return out


class _EpochMonitor:
    """``dml.fit`` callback: per-epoch mean loss and scikit-learn's no-improvement stop."""

    def __init__(self, steps_per_epoch, tol, n_iter_no_change, stop, validate=None):
        """``validate(params) -> score`` (higher is better): stop on the
        validation score instead of the training loss (``early_stopping``)."""
        self.per_epoch = max(1, int(steps_per_epoch))
        self.sync_every = self.per_epoch        # reads losses only; stops at epoch ends
        self.tol, self.patience, self.stop = float(tol), int(n_iter_no_change), bool(stop)
        self.curve, self.best, self.bad = [], math.inf, 0
        self.validate, self.scores = validate, []
        self.best_score, self.best_params = -math.inf, None
        self._sum, self._count = 0.0, 0
        self.stopped = False

    def __call__(self, step, record, params):
        self._sum += float(record["loss"])
        self._count += 1
        if step % self.per_epoch:
            return False
        return self._end_epoch(params)

    def _end_epoch(self, params=None):
        loss = self._sum / self._count
        self._sum, self._count = 0.0, 0
        if not np.isfinite(loss):
            raise FloatingPointError(
                "the training loss became non-finite; lower learning_rate_init")
        self.curve.append(loss)
        if self.validate is not None and params is not None:
            score = float(self.validate(params))
            self.scores.append(score)
            improved = score >= self.best_score + self.tol
            if score > self.best_score:
                self.best_score, self.best_params = score, np.array(params, copy=True)
        else:
            improved = loss <= self.best - self.tol
        self.bad = 0 if improved else self.bad + 1
        self.best = min(self.best, loss)
        if self.stop and self.bad > self.patience:
            self.stopped = True
            return True
        return False

    def finish(self):
        if self._count:
            self._end_epoch()


# ---------------------------------------------------------------------------
# base
# ---------------------------------------------------------------------------
class _DMLEstimator(BaseEstimator):
    """Shared plumbing: validation, placement, partitioning and the call to ``dml.fit``."""

    _is_classifier = False
    _multi_output = False       # takes a 2-D y (n, outputs)
    _sparse = False             # takes scipy.sparse X (used as CSR)

    def _validate(self, X, y=None, *, reset=True):
        """Validated ``(X, y)``; y is 1-D, or 2-D (n, k >= 2) for multi-output
        estimators (an (n, 1) y becomes 1-D with a DataConversionWarning, as
        scikit-learn's MLPs do)."""
        if _is_dask(X):
            X, y = _validate_dask(self, X, y, reset=reset, classifier=self._is_classifier,
                                  multi_output=self._multi_output)
        else:
            X, y = validate_data(self, X, y, reset=reset, dtype=[np.float64, np.float32],
                                 y_numeric=not self._is_classifier,
                                 multi_output=self._multi_output,
                                 accept_sparse="csr" if self._sparse else False)
        if y is not None and y.ndim == 2 and y.shape[1] == 1:
            from sklearn.utils.validation import column_or_1d

            y = column_or_1d(y, warn=True)
        return X, y

    def _check_X(self, X):
        """Prediction input (numpy), validated against the fit."""
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=[np.float64, np.float32],
                             accept_sparse="csr" if self._sparse else False)

    def _blockwise(self, method, X, n_columns=None, dtype=np.float64):
        """``method`` applied to every row block of a dask ``X`` (lazy dask result).

        The blocks are computed by a copy of the fitted estimator without its
        ``client`` (a client does not travel to the workers) and ``history_``.
        """
        check_is_fitted(self)
        _validate_dask(self, X, None, reset=False, classifier=self._is_classifier)
        X = X.rechunk({1: -1})
        fitted = copy.copy(self)
        fitted.client = None
        fitted.__dict__.pop("history_", None)
        method = getattr(fitted, method.__name__)
        if n_columns is None:
            return X.map_blocks(method, drop_axis=1, dtype=dtype)
        return X.map_blocks(method, chunks=(X.chunks[0], (n_columns,)), dtype=dtype)

    def _run(self, model, X, y, plan, *, seed, in_place=False, sample_weight=None):
        """Place, partition and fit; ``plan(data) -> (strategy, optimizer, fit kwargs)``.

        Returns the ``FitResult`` (and sets ``history_``).
        """
        from .train import fit

        where = _placement(self.client, X)
        try:
            data = _partition(X, y, where, self.n_partitions, seed, in_place=in_place,
                              sample_weight=sample_weight)
            strategy, optimizer, kwargs = plan(data)
            result = fit(model, data, strategy, optimizer, client=where.client or False,
                         seed=seed, progress=False, **kwargs)
        finally:
            where.close()
        self.history_ = result.history
        return result

    def __sklearn_clone__(self):
        """``sklearn.clone``: parameters cloned as scikit-learn does, except
        ``client``, which is shared (a ``distributed.Client`` cannot be copied)."""
        from sklearn.base import clone

        params = self.get_params(deep=False)
        client = params.pop("client", None)
        new = type(self)(**{k: clone(v, safe=False) for k, v in params.items()})
        new.client = client
        return new

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = self._sparse
        return tags


# ---------------------------------------------------------------------------
# generalised linear models
# ---------------------------------------------------------------------------
class _GLM(_DMLEstimator):
    _sparse = True              # the CSR kernels stream scipy.sparse rows

    def _solve(self, model, X, y, weight_decay, *, seed, sample_weight=None, l1=0.0):
        """Fit a GLM from zero; returns the flat parameters and sets ``n_iter_``.
        ``l1 > 0``: the objective gains ``l1 ||w||_1``, solved by OWL-QN."""
        from .strategies import SyncSGD

        dtype = _float_dtype(X)
        init = np.zeros(model.n_params, dtype=dtype)
        strategy = _resolve_strategy(self.strategy, batch_size=None)
        full_batch = (isinstance(strategy, SyncSGD) and strategy.batch_size is None
                      and strategy.local_steps == 1)
        if l1 and not full_batch:
            raise ValueError(f"{type(self).__name__}: an L1 penalty needs the full-batch "
                             "solver (strategy='sync' with batch_size=None)")
        if full_batch:
            solver = (optim.OWLQN(l1=l1, max_iter=self.max_iter, tol=self.tol,
                                  weight_decay=weight_decay) if l1 else
                      optim.LBFGS(max_iter=self.max_iter, tol=self.tol,
                                  weight_decay=weight_decay))
            result = self._run(model, X, y, lambda data: (
                strategy, solver, {"steps": self.max_iter, "init_params": init}), seed=seed,
                in_place=True, sample_weight=sample_weight)
            done = result.solver_result
            self.n_iter_ = int(result.steps)
            # In float32 the line search may stop at the precision of the sums
            # (scipy's ABNORMAL...): that is convergence to float32 precision.
            if done is None or (not done.success and dtype == np.float64):
                why = "max_iter was reached" if done is None else done.message
                warnings.warn(f"{type(self).__name__}: {type(solver).__name__} did not "
                              f"converge ({why}); "
                              "increase max_iter or scale the data.", ConvergenceWarning)
        else:
            if isinstance(strategy, SyncSGD) and strategy.batch_size is None:
                strategy = strategy.replace(batch_size=256)
            solver = optim.Adam(lr=0.01, weight_decay=weight_decay)
            result = self._run(model, X, y, lambda data: (
                strategy, solver, {"epochs": self.max_iter, "init_params": init}), seed=seed,
                sample_weight=sample_weight)
            self.n_iter_ = int(self.max_iter)
        params = np.asarray(result.params)
        if not np.isfinite(params).all():
            raise FloatingPointError(f"{type(self).__name__}: the solver diverged")
        return params


class LinearRegression(RegressorMixin, _GLM):
    """Least squares (ridge, lasso or elastic net) trained on a Dask cluster.

    ``penalty="l2"`` (default): minimises ``||y - X w - b||^2 + alpha ||w||^2``
    (scikit-learn's ``Ridge``; ``alpha=0`` is ordinary least squares) with
    full-batch L-BFGS. ``penalty="l1"`` | ``"elasticnet"``: scikit-learn's
    ``Lasso``/``ElasticNet`` objective ``1/(2n) ||y - X w - b||^2 + alpha r
    ||w||_1 + alpha (1 - r)/2 ||w||^2`` with ``r = l1_ratio`` (1 for "l1"),
    solved by OWL-QN. The intercept ``b`` is never penalised. ``tol`` is the
    solver's gradient tolerance (on the objective divided by 2n for "l2"),
    ``max_iter`` its iteration limit. ``strategy``, ``n_partitions``, ``client``: see the
    module docstring. ``fit(X, y, sample_weight)``: the weighted objective
    ``sum_i w_i (y_i - x_i w - b)^2 + alpha ||w||^2``. Fitted: ``coef_``
    (n_features,), ``intercept_``, ``n_features_in_``, ``n_iter_``, ``history_``.
    """

    def __init__(self, alpha=0.0, fit_intercept=True, tol=1e-6, max_iter=200,
                 strategy="sync", n_partitions=None, client=None, random_state=None,
                 penalty="l2", l1_ratio=None):
        self.alpha = alpha
        self.penalty = penalty
        self.l1_ratio = l1_ratio
        self.fit_intercept = fit_intercept
        self.tol = tol
        self.max_iter = max_iter
        self.strategy = strategy
        self.n_partitions = n_partitions
        self.client = client
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None):
        from .models import Linear

        _check_positive("alpha", self.alpha, allow_zero=True)
        _check_positive("tol", self.tol, allow_zero=True)
        _check_positive("max_iter", self.max_iter, integer=True)
        X, y = self._validate(X, y, reset=True)
        dtype = _float_dtype(X)
        y = np.asarray(y, dtype=dtype)
        weights = _row_weights(self, X, sample_weight)
        n = _total_weight(X.shape[0], weights)
        model = Linear(self.n_features_in_)
        if not self.fit_intercept:
            model = _NoIntercept(model)
        l1, decay = linear_strengths(self.penalty, self.l1_ratio, self.alpha, n)
        params = self._solve(model, X, y, decay, l1=l1, seed=_seed(self.random_state),
                             sample_weight=weights)
        coef, intercept = _glm_params(model, params, self.n_features_in_)
        self.coef_ = coef[0]
        self.intercept_ = float(intercept[0]) if self.fit_intercept else 0.0
        return self

    def predict(self, X):
        if _is_dask(X):
            return self._blockwise(self.predict, X)
        X = self._check_X(X)
        return X @ self.coef_.astype(X.dtype, copy=False) + self.intercept_


class LogisticRegression(ClassifierMixin, _GLM):
    """Logistic regression, binary and multinomial, trained on a Dask cluster.

    Minimises scikit-learn's objective ``C sum_i loss_i + r ||W||_1 + (1 - r)/2
    ||W||^2`` with ``r = l1_ratio``: ``penalty="l2"`` (r = 0 unless
    ``l1_ratio`` says otherwise, as scikit-learn >= 1.8), ``"l1"`` (r = 1),
    ``"elasticnet"`` (``l1_ratio`` required), ``None`` (no penalty);
    intercepts are never penalised. Full-batch L-BFGS, or OWL-QN when r > 0
    (exact zeros in ``coef_``). Two classes use one coefficient vector (log-loss), more classes
    the multinomial (softmax) model. Labels may be any values; ``classes_``
    maps them. ``tol``: L-BFGS's gradient tolerance on the objective divided
    by ``C n`` (as scikit-learn's lbfgs); ``max_iter``: its iteration limit.
    ``fit(X, y, sample_weight)`` and ``class_weight`` (None, "balanced" or
    {label: weight}): ``C sum_i w_i loss_i + 1/2 ||W||^2``, as scikit-learn.
    Fitted: ``coef_`` (1 or K, n_features), ``intercept_``, ``classes_``,
    ``n_features_in_``, ``n_iter_`` (shape (1,), as scikit-learn's lbfgs),
    ``history_``.
    """

    _is_classifier = True

    def __init__(self, C=1.0, penalty="l2", fit_intercept=True, tol=1e-4, max_iter=100,
                 strategy="sync", n_partitions=None, client=None, random_state=None,
                 class_weight=None, l1_ratio=None):
        self.C = C
        self.l1_ratio = l1_ratio
        self.class_weight = class_weight
        self.penalty = penalty
        self.fit_intercept = fit_intercept
        self.tol = tol
        self.max_iter = max_iter
        self.strategy = strategy
        self.n_partitions = n_partitions
        self.client = client
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None):
        from .models import Logistic, Softmax

        _check_positive("C", self.C)
        _check_positive("tol", self.tol, allow_zero=True)
        _check_positive("max_iter", self.max_iter, integer=True)
        l1_share(self.penalty, self.l1_ratio, ("l2", "l1", "elasticnet", None))
        X, y = self._validate(X, y, reset=True)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        if k < 2:
            raise ValueError("This solver needs samples of at least 2 classes in the data, "
                             f"but the data contains only one class: {self.classes_[0]!r}")
        codes = codes.astype(np.int64)
        weights = _row_weights(self, X, sample_weight, codes)
        n = _total_weight(X.shape[0], weights)
        model = Logistic(self.n_features_in_) if k == 2 else Softmax(self.n_features_in_, k)
        if not self.fit_intercept:
            model = _NoIntercept(model)
        l1, decay = logistic_strengths(self.penalty, self.l1_ratio, self.C, n)
        params = self._solve(model, X, codes, decay, l1=l1,
                             seed=_seed(self.random_state), sample_weight=weights)
        self.coef_, intercept = _glm_params(model, params, self.n_features_in_)
        self.intercept_ = intercept if self.fit_intercept else np.zeros_like(intercept)
        # scikit-learn's shape: (1,) for binary and multinomial fits
        self.n_iter_ = np.array([self.n_iter_], dtype=np.int32)
        return self

    def decision_function(self, X):
        """Scores: (n,) for two classes (positive means ``classes_[1]``), else (n, K)."""
        if _is_dask(X):
            k = len(self.classes_)
            return self._blockwise(self.decision_function, X, None if k == 2 else k)
        X = self._check_X(X)
        scores = X @ self.coef_.T.astype(X.dtype, copy=False) + self.intercept_
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict(self, X):
        if _is_dask(X):
            return self._blockwise(self.predict, X, dtype=self.classes_.dtype)
        scores = self.decision_function(X)
        idx = (scores > 0).astype(np.intp) if scores.ndim == 1 else scores.argmax(axis=1)
        return self.classes_[idx]

    def predict_proba(self, X):
        from scipy.special import expit, softmax

        if _is_dask(X):
            return self._blockwise(self.predict_proba, X, len(self.classes_))
        scores = self.decision_function(X)
        if scores.ndim == 1:
            p = expit(scores)
            return np.column_stack([1 - p, p])
        return softmax(scores, axis=1)

    def predict_log_proba(self, X):
        from scipy.special import log_expit, log_softmax

        if _is_dask(X):
            return self._blockwise(self.predict_log_proba, X, len(self.classes_))
        scores = self.decision_function(X)
        if scores.ndim == 1:
            return np.column_stack([log_expit(-scores), log_expit(scores)])
        return log_softmax(scores, axis=1)


# ---------------------------------------------------------------------------
# multi-layer perceptrons
# ---------------------------------------------------------------------------
# batch_size="auto": rows per partition per step. Capped at AUTO_BATCH; on small
# partitions it shrinks so that an epoch still has about MIN_STEPS_PER_EPOCH steps.
AUTO_BATCH = 128
MIN_STEPS_PER_EPOCH = 16


class _MLP(_DMLEstimator):
    """Shared MLP logic; subclasses define the output layer and the targets."""

    _multi_output = True

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="cosine",
                 learning_rate_init=0.002, max_iter=8, tol=1e-4, n_iter_no_change=10,
                 momentum=0.9, nesterov=False, random_state=None, strategy="sync",
                 n_partitions=None, client=None, standardize=True, warm_start=False,
                 early_stopping=False, validation_fraction=0.1):
        self.warm_start = warm_start
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.momentum = momentum
        self.nesterov = nesterov
        self.random_state = random_state
        self.strategy = strategy
        self.n_partitions = n_partitions
        self.client = client
        self.standardize = standardize

    def _check_params(self):
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, numbers.Integral):
            sizes = (sizes,)
        try:
            sizes = [int(s) for s in sizes]
        except (TypeError, ValueError):
            raise ValueError(f"hidden_layer_sizes must be a tuple of positive integers, "
                             f"got {self.hidden_layer_sizes!r}") from None
        if any(s < 1 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive, got {sizes}")
        if self.activation not in ("relu", "tanh", "identity", "logistic"):
            raise ValueError(f"activation must be 'relu', 'tanh', 'identity' or 'logistic', "
                             f"got {self.activation!r}")
        if self.solver not in ("adam", "sgd", "lbfgs"):
            raise ValueError(f"solver must be 'adam', 'sgd' or 'lbfgs', got {self.solver!r}")
        if self.learning_rate not in ("constant", "cosine"):
            raise ValueError(f"learning_rate must be 'constant' or 'cosine', "
                             f"got {self.learning_rate!r}")
        _check_positive("alpha", self.alpha, allow_zero=True)
        _check_positive("learning_rate_init", self.learning_rate_init)
        _check_positive("max_iter", self.max_iter, integer=True)
        _check_positive("tol", self.tol, allow_zero=True)
        _check_positive("n_iter_no_change", self.n_iter_no_change, integer=True)
        if not (isinstance(self.momentum, numbers.Real) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.batch_size != "auto":
            _check_positive("batch_size", self.batch_size, integer=True)
        if not (isinstance(self.validation_fraction, numbers.Real)
                and 0 < self.validation_fraction < 1):
            raise ValueError(f"validation_fraction must be in (0, 1), "
                             f"got {self.validation_fraction!r}")
        if not isinstance(self.standardize, (bool, np.bool_)):
            raise ValueError(f"standardize must be True or False, got {self.standardize!r}")
        return sizes

    # ---- input standardisation --------------------------------------------------
    def _input_stats(self, X, dtype, sample_weight=None):
        """Per-feature (centre, scale) of X: mean and standard deviation (float64
        sums; weighted by ``sample_weight``), scale 1 for constant features;
        (None, None) when not standardizing."""
        if not self.standardize:
            return None, None
        if sample_weight is not None:
            import dask
            import dask.array as da

            average = da.average if _is_dask(X) else np.average
            center = average(X, axis=0, weights=sample_weight)
            std = average((X - center) ** 2, axis=0, weights=sample_weight) ** 0.5
            center, std = (np.asarray(v, dtype=np.float64) for v in dask.compute(center, std))
        elif _is_dask(X):
            import dask

            center, std = dask.compute(X.mean(axis=0, dtype=np.float64),
                                       X.std(axis=0, dtype=np.float64))
        else:
            center = X.mean(axis=0, dtype=np.float64)
            std = X.std(axis=0, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            finite = (np.isfinite(center) & np.isfinite(std)
                      & np.isfinite(center.astype(dtype)) & np.isfinite(std.astype(dtype)))
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(
                f"X: the values of feature(s) {bad[:10].tolist()} are finite but too large to "
                f"standardize (their mean or standard deviation overflows "
                f"{np.dtype(dtype).name}); rescale X, or pass standardize=False")
        std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(center)), std, 1.0)
        return center.astype(dtype), std.astype(dtype)

    def _standardized(self, X):
        """X in the space the network trains in (a new array; lazy for dask)."""
        if self._center_ is None:
            return X
        dtype = self._center_.dtype
        if _is_dask(X):
            return ((X - self._center_) / self._scale_).astype(dtype)
        out = np.subtract(X, self._center_, dtype=dtype)
        out /= self._scale_
        return out

    def _fold_inputs(self, params):
        """Parameters of the same network on RAW inputs: the first layer absorbs
        the standardisation, W = W' / scale (per input row), b = b' - (centre /
        scale) @ W'."""
        if self._center_ is None:
            return params
        folded = params.copy()
        first = self.model_.views(folded)[self.model_.layer_names[0]]
        W, b = first["W"], first["b"]
        shift = (self._center_.astype(np.float64) / self._scale_) @ W.astype(np.float64)
        b -= shift.astype(b.dtype)
        W /= self._scale_[:, None]
        return folded

    def _batch_rows(self, data):
        """Rows per partition per step for ``data``."""
        per_partition = max(1, int(np.min(data.partition_sizes)))
        if self.batch_size == "auto":
            return int(max(1, min(AUTO_BATCH, math.ceil(per_partition / MIN_STEPS_PER_EPOCH))))
        return int(self.batch_size)

    def _optimizer(self, decay, partial):
        schedule = None if (partial or self.learning_rate == "constant") else optim.Cosine()
        if self.solver == "adam" or (self.solver == "lbfgs" and partial):
            return optim.Adam(lr=self.learning_rate_init, weight_decay=decay, schedule=schedule)
        return optim.SGD(lr=self.learning_rate_init, momentum=self.momentum,
                         nesterov=bool(self.nesterov) and self.momentum > 0,
                         weight_decay=decay, schedule=schedule)

    def _warm(self):
        """True when ``fit`` continues from the fitted weights (``warm_start``)."""
        return bool(self.warm_start) and hasattr(self, "params_")

    def _train(self, X, y, n_out, *, partial, warm=False, sample_weight=None):
        """Fit (or continue, ``partial``: one epoch) the network; sets the fitted attributes."""
        from .models import MLP
        from .strategies import SyncSGD

        sizes = self._check_params()
        dtype = _float_dtype(X)
        if not (partial and hasattr(self, "params_")):
            self.__dict__.pop("_opt_state_", None)   # fit (warm or not): a new optimizer
        if not ((partial or warm) and hasattr(self, "params_")):
            self._seed_ = _seed(self.random_state)
            self.model_ = MLP([self.n_features_in_, *sizes, n_out],
                              activation=self.activation, output=self._model_output())
            self._trained_ = self.model_.init(self._seed_, dtype=dtype)
            self._center_, self._scale_ = self._input_stats(X, dtype, sample_weight)
            self.loss_curve_, self.n_iter_, self.t_ = [], 0, 0
        init = self._trained_.astype(dtype, copy=False)
        validate = None
        if self.early_stopping and not partial and self.solver != "lbfgs":
            X, y, sample_weight, validate = self._validation_split(X, y, sample_weight)
        X = self._standardized(X)
        if warm and not partial:
            self.n_iter_ = 0                    # scikit-learn: epochs of THIS fit
        # fresh batch orders for every partial_fit / warm fit
        seed = self._seed_ + len(self.loss_curve_)
        n = X.shape[0]
        lbfgs = self.solver == "lbfgs" and not partial
        n_weight = _total_weight(n, sample_weight)
        box = {}

        def plan(data):
            if lbfgs:
                solver = optim.LBFGS(max_iter=self.max_iter, tol=self.tol,
                                     weight_decay=float(self.alpha) / n_weight)
                return SyncSGD(batch_size=None), solver, {"steps": self.max_iter,
                                                          "init_params": init}
            batch = self._batch_rows(data)
            strategy = _resolve_strategy(self.strategy, batch_size=batch)
            rows_per_step = min(batch * data.n_partitions, n)
            # FedAvg evaluates the client optimizer's schedule at LOCAL step
            # counters, not at fit's global steps: keep its learning rate constant.
            constant = partial or getattr(strategy, "name", "") == "fedavg"
            optimizer = self._optimizer(float(self.alpha) / rows_per_step, constant)
            if partial:                         # continue the previous call's optimizer
                optimizer = _resumed(optimizer, getattr(self, "_opt_state_", None))
            box["monitor"] = _EpochMonitor(strategy.steps_per_epoch(data), self.tol,
                                           self.n_iter_no_change, stop=not partial,
                                           validate=validate)
            return strategy, optimizer, {"epochs": 1 if partial else int(self.max_iter),
                                         "init_params": init, "callbacks": (box["monitor"],)}

        result = self._run(self.model_, X, y, plan, seed=seed, sample_weight=sample_weight)
        if lbfgs:
            self.loss_curve_ = [float(v) for v in result.history["loss"].values]
            self.n_iter_ = int(result.steps)
        else:
            monitor = box["monitor"]
            monitor.finish()
            self.loss_curve_ = list(self.loss_curve_) + monitor.curve
            self.n_iter_ += len(monitor.curve)
            if validate is not None:
                self.validation_scores_ = list(monitor.scores)
                self.best_validation_score_ = float(monitor.best_score)
                self.best_loss_ = None
            elif not partial or not hasattr(self, "best_loss_") or self.best_loss_ is None:
                self.validation_scores_ = self.best_validation_score_ = None
                self.best_loss_ = float(min(self.loss_curve_))
            else:
                self.best_loss_ = float(min(self.best_loss_, *monitor.curve))
            if not partial and not monitor.stopped and monitor.bad == 0 \
                    and len(monitor.curve) >= self.max_iter and self.learning_rate == "constant":
                warnings.warn(f"{type(self).__name__}: the loss was still improving after "
                              f"max_iter={self.max_iter} epochs.", ConvergenceWarning)
        self.t_ += int(n * (1 if partial else max(1, self.n_iter_)))
        params = np.asarray(result.params)
        if validate is not None and box["monitor"].best_params is not None:
            params = box["monitor"].best_params   # scikit-learn keeps the best epoch's
        if not np.isfinite(params).all():
            raise FloatingPointError(f"{type(self).__name__}: training diverged (non-finite "
                                     "parameters); lower learning_rate_init")
        self._trained_ = params                 # in the standardized input space
        self._opt_state_ = None if lbfgs else result.opt_state
        self.params_ = self._fold_inputs(params)
        self.loss_ = float(self.loss_curve_[-1]) if self.loss_curve_ else float("nan")
        views = self.model_.views(self.params_)
        self.coefs_ = [views[name]["W"] for name in self.model_.layer_names]
        self.intercepts_ = [views[name]["b"] for name in self.model_.layer_names]
        return self

    def _validation_split(self, X, y, sample_weight=None):
        """``(X_train, y_train, w_train, validate)``: ``validation_fraction`` of the
        rows held out (stratified for classifiers, seeded by ``random_state``, as
        scikit-learn's ``early_stopping``); ``validate(params)`` scores them
        (accuracy, or R^2 for regression; weighted by their ``sample_weight``)
        with parameters of the standardized space."""
        from sklearn.metrics import accuracy_score, r2_score
        from sklearn.model_selection import train_test_split

        if _is_dask(X):
            X = X.compute()
        stratify = y if self._is_classifier and y.ndim == 1 else None
        arrays = (X, y) if sample_weight is None else (X, y, sample_weight)
        X_tr, X_val, y_tr, y_val, *weights = train_test_split(
            *arrays, random_state=self._seed_, test_size=self.validation_fraction,
            stratify=stratify)
        w_tr, w_val = weights or (None, None)
        if X_tr.shape[0] < 1 or X_val.shape[0] < 1:
            raise ValueError("early_stopping: too few rows for validation_fraction="
                             f"{self.validation_fraction}")
        Xv = np.ascontiguousarray(self._standardized(X_val))
        model = self.model_

        def validate(params):
            out = np.asarray(model.predict(np.asarray(params, dtype=Xv.dtype), Xv))
            if model.is_multilabel:
                return accuracy_score(y_val, out > 0.5, sample_weight=w_val)   # subset accuracy
            if self._is_classifier:
                return accuracy_score(y_val, out.argmax(axis=1), sample_weight=w_val)
            return r2_score(y_val, out.reshape(np.shape(y_val)), sample_weight=w_val)

        return X_tr, y_tr, w_tr, validate

    def _forward(self, X):
        X = self._check_X(X)
        return self.model_.predict(self.params_, np.ascontiguousarray(X, self.params_.dtype))

    def _model_output(self):
        return self._output

    def _check_outputs(self, k, first):
        """Record (first fit) or check (warm/partial) the number of outputs."""
        if first:
            self.n_outputs_ = int(k)
        elif int(k) != self.n_outputs_:
            raise ValueError(f"y has {k} output(s), the fitted model {self.n_outputs_}; "
                             "fit again from scratch (warm_start=False)")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        if tags.classifier_tags is not None:
            tags.classifier_tags.multi_label = True
        return tags


_MLP_DOC_PARAMS = """
    Parameters follow scikit-learn's ``MLPClassifier``/``MLPRegressor`` where they
    make sense; dmlcore's defaults differ where that trains faster on a cluster:
    ``solver="adam"`` with ``learning_rate="cosine"`` (the learning rate decays
    from ``learning_rate_init`` to 0 over ``max_iter`` epochs; ``"constant"``
    keeps it), ``batch_size="auto"`` = rows PER PARTITION per step (the
    effective batch is that times the number of partitions, DDP semantics):
    min(128, rows per partition / 16). ``max_iter``: epochs; training stops
    early when the epoch's training loss has not improved by ``tol`` for
    ``n_iter_no_change`` consecutive epochs (``best_loss_``); with
    ``early_stopping=True``, ``validation_fraction`` of the rows (stratified
    for classifiers) are held out, the stop watches their score (accuracy or
    R^2: ``validation_scores_``, ``best_validation_score_``) and the fitted
    weights are those of the best-scoring epoch, as in scikit-learn. ``alpha``: L2 penalty on the
    weights, divided by the batch rows as in scikit-learn. ``solver="sgd"``
    uses ``momentum``/``nesterov``; ``solver="lbfgs"``: full-batch L-BFGS.
    ``strategy``: "sync" (default), "ps", "fedavg" or a dmlcore Strategy.
    ``partial_fit`` runs one epoch from the current weights with a constant
    learning rate, continuing the optimizer state (Adam's moments, SGD's
    velocity, the step count) of the previous ``partial_fit`` or ``fit`` call;
    ``fit`` starts a new optimizer. ``fit`` and ``partial_fit`` take
    ``sample_weight`` (weighted mean losses). ``warm_start=True``: ``fit``
    continues from the fitted weights (same classes required); as in
    scikit-learn, ``loss_curve_`` and ``t_`` accumulate and ``n_iter_``
    counts the epochs of the latest fit. ``standardize=True`` (default)
    trains on inputs centred and scaled per feature with the mean and standard
    deviation of the first fit's data (scikit-learn recommends scaling inputs
    for its MLPs; here it is built in, and it takes fewer epochs to the same
    accuracy: see the README); the fitted ``params_``, ``coefs_`` and
    ``intercepts_`` are folded back so that they apply to RAW inputs.
"""


class MLPClassifier(ClassifierMixin, _MLP):
    __doc__ = ("Multi-layer perceptron classifier trained on a Dask cluster: softmax "
               "output and cross-entropy for class labels; for a 2-D 0/1 indicator y "
               "(multilabel, as scikit-learn), one sigmoid output per label and binary "
               "cross-entropy, ``classes_ = arange(n_labels)``, ``predict`` the "
               "indicator matrix.\n" + _MLP_DOC_PARAMS)

    _is_classifier = True
    _output = "softmax"

    def _model_output(self):
        return "sigmoid" if self._multilabel_ else "softmax"

    def _encode(self, y, classes=None, first=True):
        """Targets as the network takes them: int64 class codes, or the float
        indicator matrix (multilabel). Sets ``classes_`` on the first call."""
        check_classification_targets(y)
        if y.ndim == 2:
            from sklearn.utils.multiclass import type_of_target

            if type_of_target(y) != "multilabel-indicator":
                raise ValueError("y: a 2-D y must be a multilabel indicator matrix of 0/1, "
                                 f"got {type_of_target(y)} targets")
            if first:
                self._multilabel_ = True
                self.classes_ = np.arange(y.shape[1])
            elif not self._multilabel_:
                raise ValueError("y: the model was fitted on class labels, got a 2-D y")
            self._check_outputs(y.shape[1], first)
            return (np.asarray(y) != 0).astype(np.float64)    # nonzero = label on, as sklearn
        if first:
            self._multilabel_ = False
            self.classes_ = np.unique(y) if classes is None else np.unique(classes)
            if len(self.classes_) < 2:
                raise ValueError("MLPClassifier needs samples of at least 2 classes in the "
                                 f"data, but the data contains only one class: "
                                 f"{self.classes_[0]!r}")
            self.n_outputs_ = 1 if len(self.classes_) == 2 else len(self.classes_)  # as sklearn
        elif self._multilabel_:
            raise ValueError("y: the model was fitted on a multilabel indicator matrix, "
                             "got 1-D labels")
        unseen = np.setdiff1d(np.unique(y), self.classes_)
        if unseen.size:
            raise ValueError(f"y contains labels not in classes_: {unseen.tolist()}")
        return np.searchsorted(self.classes_, y).astype(np.int64)

    def _targets(self, codes, X):
        if codes.dtype == np.int64:
            return codes
        return codes.astype(_float_dtype(X))

    def fit(self, X, y, sample_weight=None):
        warm = self._warm()
        X, y = self._validate(X, y, reset=not warm)
        if not warm:
            for name in ("params_", "model_", "_trained_"):
                self.__dict__.pop(name, None)
        elif y.ndim == 1 and not self._multilabel_ and not np.array_equal(
                np.unique(y), self.classes_):
            raise ValueError(f"warm_start: y has classes {np.unique(y).tolist()}, the fitted "
                             f"model {self.classes_.tolist()}; pass warm_start=False")
        codes = self._targets(self._encode(y, first=not warm), X)
        return self._train(X, codes, len(self.classes_), partial=False, warm=warm,
                           sample_weight=_row_weights(self, X, sample_weight))

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One epoch on ``(X, y)`` from the current weights; ``classes`` needed on
        the first call (for a multilabel y, ``classes_`` is ``arange(n_labels)``)."""
        first = not hasattr(self, "params_")
        if first and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit")
        X, y = self._validate(X, y, reset=first)
        if (not first and classes is not None and y.ndim == 1
                and not np.array_equal(np.unique(classes), self.classes_)):
            raise ValueError(f"classes={classes!r} differs from the classes of the first "
                             f"call, {self.classes_.tolist()}")
        codes = self._targets(self._encode(y, classes, first=first), X)
        return self._train(X, codes, len(self.classes_), partial=True,
                           sample_weight=_row_weights(self, X, sample_weight))

    def predict_proba(self, X):
        """(n, n_classes) class probabilities; multilabel: (n, n_labels) per-label
        probabilities (each in [0, 1], not summing to 1)."""
        if _is_dask(X):
            return self._blockwise(self.predict_proba, X, len(self.classes_))
        return np.asarray(self._forward(X), dtype=np.float64)

    def predict_log_proba(self, X):
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X):
        """Class labels (n,); multilabel: the (n, n_labels) int 0/1 indicator
        (probability > 0.5)."""
        if _is_dask(X):
            if self._multilabel_:
                return self._blockwise(self.predict, X, len(self.classes_), dtype=np.int64)
            return self._blockwise(self.predict, X, dtype=self.classes_.dtype)
        proba = self._forward(X)
        if self._multilabel_:
            return (proba > 0.5).astype(np.int64)
        return self.classes_[proba.argmax(axis=1)]


class MLPRegressor(RegressorMixin, _MLP):
    __doc__ = ("Multi-layer perceptron regressor (linear output, squared error) trained on "
               "a Dask cluster; y (n,) or (n, n_outputs) (multi-output; ``predict`` "
               "returns the same shape).\n" + _MLP_DOC_PARAMS)

    _output = "linear"

    def _targets(self, y, X, first):
        y = np.asarray(y, dtype=_float_dtype(X))
        k = 1 if y.ndim == 1 else y.shape[1]
        if first:
            self._y_ndim_ = y.ndim
        self._check_outputs(k, first)
        return y

    def fit(self, X, y, sample_weight=None):
        warm = self._warm()
        X, y = self._validate(X, y, reset=not warm)
        if not warm:
            for name in ("params_", "model_", "_trained_"):
                self.__dict__.pop(name, None)
        y = self._targets(y, X, first=not warm)
        return self._train(X, y, self.n_outputs_, partial=False, warm=warm,
                           sample_weight=_row_weights(self, X, sample_weight))

    def partial_fit(self, X, y, sample_weight=None):
        """One epoch on ``(X, y)`` from the current weights."""
        first = not hasattr(self, "params_")
        X, y = self._validate(X, y, reset=first)
        y = self._targets(y, X, first=first)
        return self._train(X, y, self.n_outputs_, partial=True,
                           sample_weight=_row_weights(self, X, sample_weight))

    def predict(self, X):
        """(n,) predictions for a 1-D training y, (n, n_outputs) for a 2-D one."""
        if _is_dask(X):
            if self._y_ndim_ == 2:
                return self._blockwise(self.predict, X, self.n_outputs_, dtype=_float_dtype(X))
            return self._blockwise(self.predict, X, dtype=_float_dtype(X))
        X = self._check_X(X)
        out = self.model_.predict(self.params_, np.ascontiguousarray(X, self.params_.dtype))
        out = np.asarray(out, dtype=_float_dtype(X))
        return out.reshape(-1) if self._y_ndim_ == 1 else out.reshape(len(out), -1)
