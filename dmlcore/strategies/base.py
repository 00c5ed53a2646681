"""What every strategy shares: the run context and the strategy contract.

A strategy turns a ``RunContext`` into a stream of steps. ``run(ctx)`` is a
generator: before yielding the record of a step that is a sync point
(``ctx.next_sync``; the last step always is) it has updated ``ctx.params``
(the full flat vector, on the driver) and ``ctx.opt_state``; the record is a
dict of scalars with at least ``loss`` (mean training loss of the step) and
``bytes_sent`` (parameter/gradient bytes that crossed process boundaries in
the step), and optionally ``_time``, the ``time.perf_counter()`` at which the
step ended when that was before the record was yielded. What a run reports
beyond per-step scalars goes into ``ctx.outputs`` (name -> DataArray, merged
into the history) and ``ctx.events``. The loop in ``dml.fit`` owns history,
evaluation, checkpoints and stopping; closing the generator ends the strategy
(its ``finally`` cleans up). A strategy object holds configuration only: a
run's state lives in the generator, so one strategy serves many fits.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunContext:
    model: object
    data: object                    # PartitionedData
    optimizer: object               # an (init, update) optimizer, or a batch solver (LBFGS)
    params: np.ndarray              # full flat parameter vector (driver copy)
    opt_state: object               # optimizer state over the TRAINABLE entries
    client: object                  # distributed.Client, or None (in-process)
    seed: int
    start_step: int                 # first step to run (> 0 after resume)
    total_steps: int                # stop after this step count
    view: object = None             # models.base.TrainableView
    extra: dict = field(default_factory=dict)   # strategy state to checkpoint
    # the driver needs current ``params``/``opt_state`` after every step that is
    # a multiple of one of these (evaluations, checkpoints, epoch ends,
    # callbacks); strategies that keep them elsewhere sync at those steps
    sync_periods: tuple = (1,)
    # the longest any data-plane wait may take (seconds): a frozen or cut-off
    # worker ends the run with an error naming it after about this long
    timeout: float = 60.0
    outputs: dict = field(default_factory=dict)   # name -> xarray.DataArray for the history
    events: list = field(default_factory=list)    # dicts: time, worker, what happened

    def __post_init__(self):
        if self.view is None:
            self.view = self.model.trainable_view(None)

    @property
    def trainable(self):
        """Layer names that train (None = all)."""
        return self.view.trainable

    def trainable_values(self):
        """The trainable entries of ``params`` (the vector itself when all train)."""
        return self.view.gather(self.params)

    def set_trainable_values(self, values):
        self.view.scatter(self.params, values)

    def next_sync(self, step):
        """The first sync point after ``step`` (a step count; ``total_steps`` at most)."""
        ends = [(step // k + 1) * k for k in self.sync_periods if k]
        return min(ends + [self.total_steps])

    @property
    def syncs_every_step(self):
        return 1 in self.sync_periods


class Strategy:
    """Base class: configuration (``trainable``); subclasses implement ``run_steps``
    for (init, update) optimizers and, where they can, ``run_batch`` for a
    batch solver (``optimizer.batch_solver``: L-BFGS)."""

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
        """The step generator: the batch solver's or the stepwise one."""
        if getattr(ctx.optimizer, "batch_solver", False):
            return self.run_batch(ctx)
        return self.run_steps(ctx)

    def run_steps(self, ctx: RunContext):
        raise NotImplementedError

    def run_batch(self, ctx: RunContext):
        raise ValueError(f"{type(self).__name__} needs an (init, update) optimizer such as "
                         f"dml.optim.SGD or Adam, not {ctx.optimizer!r}")

    def config(self) -> dict:
        """The constructor's arguments that give this strategy."""
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        return {name: getattr(self, name) for name in names}

    def replace(self, **changes):
        """A new strategy of this type with ``changes`` to its configuration."""
        return type(self)(**{**self.config(), **changes})

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
