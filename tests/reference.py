"""Plain NumPy reference implementations of the GLM losses and gradients.

Independent oracles for the compiled kernels: two passes over X, float64
arithmetic, NumPy / SciPy special functions.  Each returns (loss_sum, grad)
with grad in the Model layout (W row-major, then b), sums over rows.
"""
import numpy as np
from scipy.special import expit, logsumexp


def squared(X, y, coef):
    X = np.asarray(X, np.float64)
    w, b = coef[:-1].astype(np.float64), float(coef[-1])
    r = X @ w + b - np.asarray(y, np.float64)
    return 0.5 * float(r @ r), np.concatenate([X.T @ r, [r.sum()]])


def logistic(X, y, coef):
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    w, b = coef[:-1].astype(np.float64), float(coef[-1])
    z = X @ w + b
    # log(1 + exp(z)) - y z, computed with logaddexp (stable for any |z|)
    loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
    r = expit(z) - y
    return loss, np.concatenate([X.T @ r, [r.sum()]])


def softmax(X, y, coef, n_classes):
    X = np.asarray(X, np.float64)
    p = X.shape[1]
    W = coef[:p * n_classes].astype(np.float64).reshape(p, n_classes)
    b = coef[p * n_classes:].astype(np.float64)
    Z = X @ W + b
    lse = logsumexp(Z, axis=1)
    rows = np.arange(X.shape[0])
    loss = float(np.sum(lse - Z[rows, y]))
    R = np.exp(Z - lse[:, None])
    R[rows, y] -= 1.0
    return loss, np.concatenate([(X.T @ R).ravel(), R.sum(axis=0)])


def fd_gradient(f, theta, h=1e-4):
    """4th-order central finite differences of scalar f at theta (float64)."""
    theta = np.array(theta, dtype=np.float64)
    g = np.empty_like(theta)
    for i in range(theta.size):
        def at(d):
            t = theta.copy()
            t[i] += d
            return f(t)
        g[i] = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
    return g
