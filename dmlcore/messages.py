"""The named messages between the driver, the executors and the parameter server.

Each is a NamedTuple, so it travels over the data plane (``wire`` encodes the
types listed in ``MESSAGES`` by name) and through Dask as itself. Every
quantity named ``loss``, ``grad``, ``weighted`` is a SUM over rows; ``rows``
is the row count, or the rows' total weight on weighted data.
"""
from __future__ import annotations

from typing import Any, NamedTuple


class Partial(NamedTuple):
    """One executor's (or partition's) sums on a step's batch."""
    loss: float
    grad: Any           # (n trainable,) the data's dtype
    rows: float


class ClientSums(NamedTuple):
    """Local training of the clients (partitions) of one executor, summed there."""
    weighted: Any       # sum_k n_k * w_k, float64 (n trainable,), or None if none counted
    weight: float       # sum_k n_k
    loss: float         # loss sum over the local steps
    rows: float         # rows seen over the local steps
    ids: list           # clients that counted
    failed: list        # [(client id, message)]
    # compressed uploads instead of ``weighted``: [(client id, n_k, encoded
    # w_k - w_global)] (``dmlcore.compression``)
    uploads: list = None


class ReplicaRun(NamedTuple):
    """A run of replicated steps: per step, the mean loss, its end time
    (seconds since the call began) and the bytes this replica sent its peers."""
    losses: list
    ends: list
    sent: list


class ReplicaState(NamedTuple):
    """A replica's trainable values and optimizer state; the state is current
    on ``[lo, hi)`` only (the slice this replica updates)."""
    values: Any
    opt_state: Any
    lo: int
    hi: int


class Push(NamedTuple):
    """A parameter-server worker's gradient for one partition mini-batch."""
    partition: int
    clock: int          # the partition's clock the gradient was computed at
    loss: float
    rows: float
    kind: str           # "sum": payload is the gradient sum; "mean": its mean (float16);
                        # "coded": its mean, encoded by ``dmlcore.compression``
    payload: Any
    seconds: float      # the loop's wall time computing it (its worker's speed)


class Pull(NamedTuple):
    """The server's answer to a pull: the partition's clock, the parameters'
    version, and the values (None: the puller's version is current)."""
    clock: int
    version: int
    values: Any


class Update(NamedTuple):
    """One update the parameter server applied."""
    loss: float         # mean over the update's rows
    nbytes: int         # pull and push bytes of it that crossed a process boundary
    staleness: int
    partition: Any      # the partition that pushed it (None under BSP)
    slot: Any           # the worker slot that pushed it (None under BSP)


class Snapshot(NamedTuple):
    """The parameter server's state and the updates since the last snapshot."""
    updates: list       # [Update]
    values: Any
    opt_state: Any
    count: int          # updates applied so far
    clocks: Any         # (n partitions,) int64: the clocks to resume from
    active: Any         # (n partitions,) bool
    stopped: bool
    pushes: dict        # worker slot -> partition mini-batches since the last snapshot
    partition_pushes: Any
    push_seconds: dict  # worker slot -> those mini-batches' compute seconds (Push.seconds)


class Half(NamedTuple):
    """A float vector as float16 ``values`` times a power-of-two ``scale``."""
    values: Any         # (n,) float16
    scale: float


class Int8Blocks(NamedTuple):
    """A float vector as int8 codes times ``scales[i // block] / 127``."""
    codes: Any          # (n,) int8
    scales: Any         # (ceil(n / block),) float32: each block's largest magnitude
    block: int


class TopK(NamedTuple):
    """A sparse float vector of ``size`` entries: ``values * scale`` at ``indices``."""
    size: int
    indices: Any        # (k,) uint32, ascending
    values: Any         # (k,) float16
    scale: float


MESSAGES = {cls.__name__: cls for cls in (Partial, ClientSums, ReplicaRun, ReplicaState,
                                          Push, Pull, Update, Snapshot, Half, Int8Blocks,
                                          TopK)}
