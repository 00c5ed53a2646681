"""What every strategy shares: the run context and the strategy contract.

A strategy turns a ``RunContext`` into a stream of steps. ``run(ctx)`` is a
generator: before yielding the record of a step that is a multiple of
``ctx.sync_every`` (or the last step) it has updated ``ctx.params`` (the full
flat vector, on the driver) and ``ctx.opt_state``; the record is a dict of
scalars with at least ``loss`` (mean training loss of the step) and
``bytes_sent`` (parameter/gradient bytes that crossed process boundaries in
the step), and optionally ``_time``, the ``time.perf_counter()`` at which the
step ended when that was before the record was yielded. The loop in
``dml.fit`` owns history, evaluation, checkpoints and stopping; closing the
generator ends the strategy (its ``finally`` cleans up).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunContext:
    model: object
    data: object                    # PartitionedData
    optimizer: object               # an (init, update) optimizer, or LBFGS
    params: np.ndarray              # full flat parameter vector (driver copy)
    opt_state: object               # optimizer state over the TRAINABLE entries
    client: object                  # distributed.Client, or None (in-process)
    seed: int
    start_step: int                 # first step to run (> 0 after resume)
    total_steps: int                # stop after this step count
    trainable: list | None = None   # layer names, None = all
    trainable_idx: np.ndarray | None = None
    extra: dict = field(default_factory=dict)   # strategy state to checkpoint
    # ``params``/``opt_state`` must be current after every step that is a
    # multiple of this (strategies that keep them elsewhere between steps
    # sync them there; the last step is always synced)
    sync_every: int = 1
    # the longest any data-plane wait may take (seconds): a frozen or cut-off
    # worker ends the run with an error naming it after about this long
    timeout: float = 60.0

    def trainable_values(self):
        """The trainable entries of ``params`` (the vector itself when all train)."""
        return self.params if self.trainable_idx is None else self.params[self.trainable_idx]

    def set_trainable_values(self, values):
        if self.trainable_idx is None:
            if values is not self.params:
                self.params[:] = values
        else:
            self.params[self.trainable_idx] = values


class Strategy:
    """Base class: ``trainable`` and the step accounting; subclasses implement ``run``."""

    name = "strategy"

    def __init__(self, trainable=None):
        self.trainable = None if trainable is None else list(trainable)

    def default_optimizer(self):
        """The optimizer ``dml.fit`` uses when none is given."""
        from ..optim import Adam

        return Adam()

    def steps_per_epoch(self, data) -> int:
        """Steps that make one pass over the data."""
        raise NotImplementedError

    def run(self, ctx: RunContext):
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
