"""Plain NumPy reference MLP: forward, loss and backward, written independently
of the compiled kernels (its own parameter unpacking, textbook formulas).

Layout: for each layer l, W_l (sizes[l], sizes[l+1]) row-major then b_l.
Loss is the SUM over rows: softmax cross-entropy (integer labels),
1/2 sum (y_hat - y)^2, or (sigmoid, multilabel) the binary cross-entropy
-sum_k [y_k log p_k + (1 - y_k) log(1 - p_k)]; the gradient is the SUM over
rows too.
"""
import numpy as np


def unpack(params, sizes):
    """List of (W, b) views into the flat vector."""
    layers, start = [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        W = params[start:start + n_in * n_out].reshape(n_in, n_out)
        start += n_in * n_out
        b = params[start:start + n_out]
        start += n_out
        layers.append((W, b))
    assert start == params.shape[0]
    return layers


def _act(z, activation):
    return {"relu": lambda: np.maximum(z, 0), "tanh": lambda: np.tanh(z),
            "identity": lambda: z.copy(), "logistic": lambda: 1 / (1 + np.exp(-z))}[activation]()


def _act_grad(a, activation):
    """act'(z) written from a = act(z)."""
    return {"relu": lambda: (a > 0).astype(a.dtype), "tanh": lambda: 1 - a * a,
            "identity": lambda: np.ones_like(a), "logistic": lambda: a * (1 - a)}[activation]()


def forward(params, sizes, X, activation="relu", output="softmax"):
    """Returns (hidden activations [A_0 .. A_{L-2}], output z, prediction)."""
    layers = unpack(params, sizes)
    acts, a = [], X
    for W, b in layers[:-1]:
        a = _act(a @ W + b, activation)
        acts.append(a)
    W, b = layers[-1]
    z = a @ W + b
    if output == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        pred = e / e.sum(axis=1, keepdims=True)
    elif output == "sigmoid":
        pred = 1 / (1 + np.exp(-z))
    else:
        pred = z
    return acts, z, pred


def loss_grad(params, sizes, X, y, activation="relu", output="softmax"):
    """(loss_sum, grad_sum) of the whole network, in the dtype of params."""
    layers = unpack(params, sizes)
    acts, z, pred = forward(params, sizes, X, activation, output)
    n = X.shape[0]
    if output == "softmax":
        y = np.asarray(y, dtype=np.int64)
        zmax = z.max(axis=1)
        lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))
        loss = float(np.sum(lse - z[np.arange(n), y]))
        delta = pred.copy()
        delta[np.arange(n), y] -= 1
    elif output == "sigmoid":
        Y = np.asarray(y, dtype=np.float64).reshape(n, -1)
        p = pred.astype(np.float64)
        loss = -float(np.sum(Y * np.log(p) + (1 - Y) * np.log(1 - p)))
        delta = (p - Y).astype(params.dtype)
    else:
        Y = np.asarray(y, dtype=params.dtype).reshape(n, -1)
        delta = z - Y
        loss = 0.5 * float(np.sum(delta.astype(np.float64) ** 2))
    grads = []
    inputs = [X] + acts
    for l in range(len(layers) - 1, -1, -1):
        W, _ = layers[l]
        grads.append((inputs[l].T @ delta, delta.sum(axis=0)))
        if l > 0:
            delta = (delta @ W.T) * _act_grad(inputs[l], activation)
    grads.reverse()
    flat = np.concatenate([np.concatenate([gW.ravel(), gb]) for gW, gb in grads])
    return loss, flat.astype(params.dtype)


# ---- local SGD and one FedAvg round, from the documented contract --------------------
def batch_order(n_rows, batch_size, seed, epoch, partition):
    """The row slices one epoch of one partition visits, in order: contiguous
    slices of ``batch_size`` rows (the whole partition when batch_size is None
    or >= n_rows), ordered by ``default_rng((seed, epoch, partition)).permutation``."""
    if batch_size is None or batch_size >= n_rows:
        return [slice(0, n_rows)]
    n_batches = (n_rows + batch_size - 1) // batch_size
    order = np.random.default_rng((seed, epoch, partition)).permutation(n_batches)
    return [slice(j * batch_size, min((j + 1) * batch_size, n_rows)) for j in order]


def local_sgd(params, sizes, X, y, *, lr, batch_size, epochs, seed, partition, first_epoch=0,
              mu=0.0, activation="relu", output="softmax"):
    """One client's local training in float64: ``epochs`` epochs of plain SGD
    (no momentum, no weight decay) on the MEAN gradient of each mini-batch,
    plus FedProx's ``mu * (w - w_start)``. Returns the new parameters (float64)."""
    w = np.array(params, dtype=np.float64)
    start = w.copy()
    X = np.asarray(X, dtype=np.float64)
    for epoch in range(first_epoch, first_epoch + epochs):
        for rows in batch_order(X.shape[0], batch_size, seed, epoch, partition):
            _, g = loss_grad(w, sizes, X[rows], y[rows], activation, output)
            w -= lr * (g / (rows.stop - rows.start) + mu * (w - start))
    return w


def fedavg_round(params, sizes, parts, clients, *, lr, batch_size, epochs, seed, round_=0,
                 mu=0.0, activation="relu", output="softmax"):
    """One FedAvg round over ``parts`` (a list of (X_k, y_k)): each client in
    ``clients`` trains locally from ``params`` (``local_sgd``, local epochs
    continuing at ``round_ * epochs``), and the new global model is the average
    of the clients' models weighted by their row counts n_k (float64)."""
    models = [local_sgd(params, sizes, *parts[k], lr=lr, batch_size=batch_size, epochs=epochs,
                        seed=seed, partition=k, first_epoch=round_ * epochs, mu=mu,
                        activation=activation, output=output) for k in clients]
    weights = np.array([parts[k][0].shape[0] for k in clients], dtype=np.float64)
    return np.einsum("k,kp->p", weights / weights.sum(), np.stack(models))
