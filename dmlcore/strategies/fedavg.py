"""Federated Averaging (McMahan et al. 2017), FedProx and server optimizers (FedAvgM).

Clients are the partitions (K = ``data.n_partitions``). Round r:

1. sample m = max(round(C * K), 1) clients with ``default_rng((seed, r))``;
2. each sampled client runs ``local_epochs`` epochs of mini-batch SGD on its
   rows (``batch_size=None``: the whole local set; ``local_epochs=1`` then is
   FedSGD) from the global trainable values with the fit's optimizer (fresh
   state each round, local steps continuing at ``r * steps per round``),
   plus FedProx's ``proximal_mu/2 ||w - w_global||^2``;
3. each worker sums ``n_k * w_k`` and ``n_k`` over its clients in float64, the
   driver adds the workers' sums and divides once (exact n_k-weighted mean);
   ``compression``: clients upload w_k - w_global encoded (a top-k residual
   per client), decoded before the mean;
4. the global model becomes that mean, or, with ``server_optimizer`` (any
   ``dml.optim`` (init, update) optimizer: ``SGD(momentum=0.9)`` is FedAvgM),
   takes a step along ``w_global - w_avg``; its state persists across rounds.

Failures: a dead worker's clients are dropped for the round, then train on a
live worker (``dmlcore.recovery``); a failing client (raises, non-finite
weights) is dropped (``accept_failures``) or raises ``RuntimeError`` naming
it; a round with no client leaves the model as it was (``loss`` NaN). The
history adds ``participants``, ``sampled``, ``failed`` and ``participation``
((step, client) int8: 1 counted, -1 failed, 0 not sampled).
"""
from __future__ import annotations

import math
import numbers
import time

import numpy as np

from .. import compression as codecs
from .. import local
from ..aggregate import add_partials
from ..checkpoint import restore_state
from ..executors import ExecutorPool, hosted
from ..messages import ClientSums
from ..recovery import RecoveringPool
from .base import Strategy


def sample_clients(seed, round_, n_clients, n_sampled):
    """Sorted ids of the ``n_sampled`` clients of round ``round_`` (no replacement)."""
    rng = np.random.default_rng((int(seed), int(round_)))
    return np.sort(rng.choice(int(n_clients), size=int(n_sampled), replace=False))


class _Uploads:
    """An executor's client encoders (one ``Compressor`` per client id)."""

    def __init__(self, spec, seed):
        self.spec, self.seed, self.clients = spec, seed, {}

    def encode(self, pid, delta, round_):
        if pid not in self.clients:
            self.clients[pid] = codecs.Compressor(self.spec, self.seed)
        return self.clients[pid].encode(delta, (round_, pid))


def _uploads(executor, compression, seed):
    state = executor.run_state
    spec = codecs.parse(compression)
    if not isinstance(state, _Uploads) or state.spec != spec or state.seed != int(seed):
        state = executor.run_state = _Uploads(spec, int(seed))
    return state


@hosted
def client_train(executor, values, optimizer, *, round_, batch_size, seed, local_epochs=None,
                 local_steps=None, proximal_mu=0.0, partitions=None, fail=(), compression=None):
    """Local SGD on each selected client (partition) of ``executor`` from
    ``values``; a ``ClientSums`` summed here (the first level of the tree).

    Client k runs ``local_steps`` steps, or ``local_epochs`` epochs of its
    mini-batches, of ``batch_size`` rows; its local step counter starts at
    ``round_ * (its steps per round)`` so every round visits fresh mini-batch
    orders. ``partitions``: ids to train (None = all). Clients are isolated:
    one that raises, or whose weights are not finite, is reported in
    ``failed`` and left out of the sums. ``fail``: ids that raise on purpose
    (the failure-policy testing hook). ``n_k`` = client k's rows (its total
    row weight on weighted data). ``compression``: each client's delta goes
    into ``uploads`` encoded, and ``weighted`` stays None.
    """
    if (local_epochs is None) == (local_steps is None):
        raise ValueError("give exactly one of local_epochs, local_steps")
    params = executor.full_params(values)
    wanted = None if partitions is None else set(int(p) for p in partitions)
    fail = set(int(p) for p in fail)
    coder = None if compression is None else _uploads(executor, compression, seed)
    sums = ClientSums(None, 0, 0.0, 0, [], [], None if coder is None else [])
    for pid, X, y, w in executor.parts:
        if wanted is not None and pid not in wanted:
            continue
        n_k = int(X.shape[0])
        n_steps = local_steps or local_epochs * local.n_batches(n_k, batch_size)
        if w is not None:
            n_k = float(w.sum(dtype=np.float64))
        try:
            if pid in fail:
                raise RuntimeError(f"injected failure of client {pid} in round {round_}")
            new, loss_k, rows_k = local.local_sgd(
                executor.model, optimizer, params, X, y, batch_size=batch_size,
                n_steps=n_steps, seed=seed, partition=pid, first_step=int(round_) * n_steps,
                view=executor.view, proximal_mu=proximal_mu, w=w)
            if not (np.isfinite(new).all() and np.isfinite(loss_k)):
                raise FloatingPointError(f"client {pid}: non-finite weights or loss")
        except Exception as exc:  # noqa: BLE001 — the failure policy is the caller's
            sums.failed.append((pid, f"{type(exc).__name__}: {exc}"))
            continue
        if coder is not None:
            sums.uploads.append((pid, n_k, coder.encode(pid, new - values, round_)))
            contribution = None
        else:
            contribution = n_k * new.astype(np.float64)     # exact: n_k * float32 in float64
            if sums.weighted is not None:
                contribution += sums.weighted
        sums = sums._replace(weighted=contribution, weight=sums.weight + n_k,
                             loss=sums.loss + loss_k, rows=sums.rows + rows_k)
        sums.ids.append(pid)
    return sums


def client_sums(results, values):
    """``(weighted, weight, loss, rows)`` over the executors' ``ClientSums``
    (at least one client counted): encoded uploads decoded into n_k * (values + delta)."""
    base = np.asarray(values, dtype=np.float64)
    totals = []
    for r in results:
        if r.uploads is None:
            totals.append(r[:4])
            continue
        weighted = np.zeros_like(base)
        for _, n_k, delta in r.uploads:
            weighted += n_k * (base + codecs.decode(delta, np.float64))
        totals.append((weighted, r.weight, r.loss, r.rows))
    return add_partials(*totals)


def weighted_average(weighted, weight, dtype):
    """``weighted / weight`` in float64, cast to ``dtype`` (the server's average)."""
    return (np.asarray(weighted, dtype=np.float64) / float(weight)).astype(dtype)


class FedAvg(Strategy):
    """Federated Averaging over the partitions; see the module docstring.

    The client optimizer's schedule is evaluated at the client's local step
    counter (``round * steps per round + local step``): use a constant
    learning rate or a schedule meant in local steps. A worker whose whole
    call fails counts as a failure of every client it was sampled for.
    ``fail_clients={round: [ids]}`` is the testing hook.
    """

    name = "fedavg"
    # what the workflow runner needs of a registered kind (``dmlcore.workflow.build``)
    unit = "rounds"                   # a step is a round: train.rounds counts them
    optimizer_keys = ("server_optimizer",)

    @classmethod
    def full_batch(cls, config):
        return False

    def __init__(self, clients_per_round=0.1, local_epochs=1, batch_size=10, proximal_mu=0.0,
                 server_optimizer=None, accept_failures=True, trainable=None,
                 fail_clients=None, compression=None):
        super().__init__(trainable)
        c = clients_per_round
        if isinstance(c, bool) or not isinstance(c, numbers.Real):
            raise ValueError(f"clients_per_round must be a float in (0, 1] or a positive int, "
                             f"got {c!r}")
        if isinstance(c, numbers.Integral):
            if int(c) < 1:
                raise ValueError(f"clients_per_round: a count must be >= 1, got {c}")
            c = int(c)
        else:
            if not 0.0 < float(c) <= 1.0:
                raise ValueError(f"clients_per_round: a fraction must be in (0, 1], got {c}")
            c = float(c)
        if isinstance(local_epochs, bool) or int(local_epochs) != local_epochs or local_epochs < 1:
            raise ValueError(f"local_epochs must be a positive integer, got {local_epochs!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        if not float(proximal_mu) >= 0.0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu!r}")
        if server_optimizer is not None and (
                getattr(server_optimizer, "batch_solver", False)
                or not (hasattr(server_optimizer, "init") and hasattr(server_optimizer, "update"))):
            raise ValueError(f"server_optimizer must be an (init, update) optimizer such as "
                             f"dml.optim.SGD, got {server_optimizer!r}")
        self.compression = codecs.parse(compression)
        self.clients_per_round = c
        self.local_epochs = int(local_epochs)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.proximal_mu = float(proximal_mu)
        self.server_optimizer = server_optimizer
        self.accept_failures = bool(accept_failures)
        self.fail_clients = {int(r): [int(i) for i in ids]
                             for r, ids in (fail_clients or {}).items()}

    # ---- accounting ----------------------------------------------------------
    def clients_sampled(self, n_clients):
        """m = max(round(C * K), 1) for a fraction, the count itself for an int."""
        c = self.clients_per_round
        if isinstance(c, int):
            if c > n_clients:
                raise ValueError(f"clients_per_round={c} exceeds the {n_clients} clients "
                                 f"(partitions)")
            return c
        return max(int(round(c * n_clients)), 1)

    def default_optimizer(self):
        """Clients run plain SGD (lr 0.05), as in McMahan et al."""
        from ..optim import SGD

        return SGD(lr=0.05)

    def steps_per_epoch(self, data):
        """Rounds in which, on average, every client participates once: ceil(K / m)."""
        k = int(data.n_partitions)
        return math.ceil(k / self.clients_sampled(k))

    # ---- the loop --------------------------------------------------------------
    def run_batch(self, ctx):
        raise ValueError("FedAvg needs an (init, update) client optimizer such as "
                         "dml.optim.SGD, not L-BFGS")

    def run_steps(self, ctx):
        n_clients = int(ctx.data.n_partitions)
        n_sampled = self.clients_sampled(n_clients)
        def make(groups):
            pool = ExecutorPool(ctx.model, ctx.data, ctx.client, timeout=ctx.timeout,
                                groups=groups)
            if ctx.trainable is not None:
                pool.call("configure", ctx.params, ctx.trainable)
            return pool

        pools = RecoveringPool(ctx, make)
        try:
            server_state = self._server_state(ctx)
            first, participation = self._participation(ctx, n_clients)
            for round_ in range(ctx.start_step, ctx.total_steps):
                if round_ > ctx.start_step:
                    pools.rebalance(round_)      # workers that joined get clients
                where = {int(pid): e for e, ids in enumerate(pools.pool.partition_ids)
                         for pid in ids}    # client id -> executor index
                values = ctx.trainable_values()
                clients = sample_clients(ctx.seed, round_, n_clients, n_sampled)
                by_executor: dict[int, list[int]] = {}
                for pid in clients:
                    by_executor.setdefault(where[int(pid)], []).append(int(pid))
                fail = set(self.fail_clients.get(round_, ()))
                pool = pools.pool
                before = pool.traffic()
                futures = {e: self._submit(pool, e, values, ctx, round_, ids,
                                           [i for i in ids if i in fail])
                           for e, ids in sorted(by_executor.items())}
                partials, failed, lost, loss = [], {}, set(), None
                for e, future in futures.items():
                    try:
                        result = pool.results([future], indices=[e])[0]
                    except Exception as exc:  # the whole worker call failed
                        for pid in by_executor[e]:
                            failed[pid] = f"{type(exc).__name__}: {exc}"
                        gone = pools.lost(exc, [pool.workers[e]])
                        if gone:            # its clients are dropped this round, moved after it
                            lost.update(gone)
                            loss = loss or (time.time(), exc)
                            continue
                        if not self.accept_failures:
                            raise RuntimeError(
                                f"FedAvg round {round_}: the call for clients {by_executor[e]} "
                                f"failed: {type(exc).__name__}: {exc}") from exc
                        continue
                    for pid, message in result.failed:
                        failed[pid] = message
                    if result.failed and not self.accept_failures:
                        pid, message = result.failed[0]
                        raise RuntimeError(f"FedAvg round {round_}: client {pid} failed: "
                                           f"{message}")
                    if result.ids:
                        partials.append(result)
                nbytes = pool.traffic() - before
                if lost:
                    pools.recover(sorted(lost), round_, *loss)
                counted = sorted(pid for p in partials for pid in p.ids)
                row = np.zeros(n_clients, dtype=np.int8)
                row[counted] = 1
                row[sorted(failed)] = -1
                participation.append(row)
                if partials:
                    # second level of the tree: the workers' partial sums
                    weighted, weight, loss, rows = client_sums(partials, values)
                    average = weighted_average(weighted, weight, values.dtype)
                    if self.server_optimizer is None:
                        ctx.set_trainable_values(average)
                    else:
                        delta = values - average             # the pseudo-gradient
                        server_state = self.server_optimizer.update(delta, server_state, values)
                        ctx.set_trainable_values(values)
                        self._save_server_state(ctx, server_state)
                    mean_loss = loss / rows if rows else float("nan")
                else:
                    mean_loss = float("nan")
                ctx.extra["participation"] = np.stack(participation)
                ctx.extra["participation_first"] = np.int64(first)
                ctx.outputs["participation"] = _participation_table(participation, first)
                yield {"loss": mean_loss, "bytes_sent": nbytes,
                       "participants": len(counted), "sampled": len(clients),
                       "failed": len(failed)}
        finally:
            pools.close()

    # ---- helpers ---------------------------------------------------------------
    def _submit(self, pool, executor, values, ctx, round_, ids, fail):
        kwargs = dict(round_=round_, local_epochs=self.local_epochs,
                      batch_size=self.batch_size, seed=ctx.seed,
                      proximal_mu=self.proximal_mu, partitions=ids, fail=fail,
                      compression=self.compression)
        return pool.submit_one(executor, "client_train", values, ctx.optimizer, **kwargs)

    def _server_state(self, ctx):
        if self.server_optimizer is None:
            return None
        state = self.server_optimizer.init(ctx.trainable_values(), ctx.view.decay_mask)
        saved = {k[len("server/"):]: v for k, v in ctx.extra.items() if k.startswith("server/")}
        if saved:
            state = restore_state(state, saved)
        return state

    @staticmethod
    def _save_server_state(ctx, state):
        for name, value in state._asdict().items():
            if value is not None:
                ctx.extra[f"server/{name}"] = np.asarray(value)

    @staticmethod
    def _participation(ctx, n_clients):
        """``(first round, rows)``: the participation table restored from ``ctx.extra``."""
        saved = ctx.extra.get("participation")
        if saved is None or ctx.start_step == 0:
            return ctx.start_step, []
        first = int(ctx.extra.get("participation_first", 0))
        saved = np.asarray(saved, dtype=np.int8).reshape(-1, n_clients)
        rows = list(saved[:max(ctx.start_step - first, 0)])
        if first + len(rows) != ctx.start_step:     # a gap: start afresh
            return ctx.start_step, []
        return first, rows


def _participation_table(participation, first):
    """(step, client) int8 DataArray, step = round + 1 as in the history."""
    import xarray as xr

    table = np.stack(participation)
    return xr.DataArray(
        table, dims=("step", "client"),
        coords={"step": np.arange(first + 1, first + 1 + table.shape[0]),
                "client": np.arange(table.shape[1])},
        name="participation",
        attrs={"meaning": "1 counted, -1 failed (dropped), 0 not sampled"})
