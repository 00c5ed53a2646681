"""The GLM penalties: scikit-learn's meanings turned into the strengths the
batch solvers take on the MEAN loss (``optim.LBFGS(weight_decay=)``,
``optim.OWLQN(l1=, weight_decay=)``); intercepts are never penalised.

* logistic, softmax: ``C sum_i w_i loss_i + r ||W||_1 + (1 - r)/2 ||W||^2``,
  divided by ``C n``: ``l1 = r / (C n)``, ``weight_decay = (1 - r) / (C n)``;
* linear, ``penalty="l2"`` (no L1 share): Ridge, ``||y - Xw - b||^2 + alpha
  ||w||^2`` divided by 2n: ``weight_decay = alpha / n``;
* linear, ``"l1"`` | ``"elasticnet"``: Lasso/ElasticNet, ``1/(2n) ||y - Xw -
  b||^2 + alpha r ||w||_1 + alpha (1 - r)/2 ||w||^2``: ``l1 = alpha r``,
  ``weight_decay = alpha (1 - r)``.

``r`` is the L1 share: 1 for "l1", ``l1_ratio`` for "elasticnet" (and for
"l2" when given, as scikit-learn >= 1.8), 0 otherwise; ``n`` the row count or
total row weight. Used by the estimators and by a workflow's model section.
"""
from __future__ import annotations

import numbers


def l1_share(penalty, l1_ratio, allowed):
    """The L1 share r in [0, 1] of a GLM's penalty (``r ||w||_1 + (1 - r)/2 ||w||^2``)."""
    if penalty not in allowed:
        names = ", ".join(repr(p) for p in allowed)
        raise ValueError(f"penalty must be one of {names}; got {penalty!r}")
    if penalty == "elasticnet" and l1_ratio is None:
        raise ValueError("penalty='elasticnet' needs l1_ratio (a number in [0, 1])")
    if l1_ratio is not None and (isinstance(l1_ratio, bool) or
                                 not isinstance(l1_ratio, numbers.Real) or
                                 not 0.0 <= float(l1_ratio) <= 1.0):
        raise ValueError(f"l1_ratio must be a number in [0, 1], got {l1_ratio!r}")
    if penalty == "l1":
        return 1.0
    if penalty is None:
        if l1_ratio:
            raise ValueError(f"penalty=None takes no l1_ratio, got {l1_ratio!r}")
        return 0.0
    return 0.0 if l1_ratio is None else float(l1_ratio)


def _number(name, value, allow_zero):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")
    return float(value)


def logistic_strengths(penalty, l1_ratio, C, n):
    """``(l1, weight_decay)`` of scikit-learn's LogisticRegression objective over ``n``."""
    r = l1_share(penalty, l1_ratio, ("l2", "l1", "elasticnet", None))
    scale = 0.0 if penalty is None else 1.0 / (_number("C", C, False) * n)
    return scale * r, scale * (1.0 - r)


def linear_strengths(penalty, l1_ratio, alpha, n):
    """``(l1, weight_decay)`` of Ridge (``penalty="l2"``) or Lasso/ElasticNet over ``n``."""
    r = l1_share(penalty, l1_ratio, ("l2", "l1", "elasticnet"))
    alpha = _number("alpha", alpha, True)
    if penalty == "l2" and not r:
        return 0.0, alpha / n
    return alpha * r, alpha * (1.0 - r)
