"""A model whose mini-batches on one worker wait for a gate the test opens.

``GatedLogistic(n_features, worker, gate)`` is ``Logistic`` except that its
``loss_grad``, when called on the Dask worker at address ``worker``, first
waits for the ``distributed.Event`` named ``gate`` (``gate_timeout`` s at
most, then raises). Tests of the parameter server use it to hold one
partition back for an exact number of updates instead of slowing it down
with sleeps. The workers import this module (``tests/`` is on their
``sys.path``, inherited from pytest) to unpickle the model.
"""
import dmlcore as dml


class GatedLogistic(dml.models.Logistic):
    gate_timeout = 30.0

    def __init__(self, n_features, worker, gate):
        super().__init__(n_features)
        self.worker, self.gate = worker, gate

    def loss_grad(self, params, X, y, grad, trainable=None, **kwargs):
        from distributed import Event, get_worker

        try:
            here = get_worker().address
        except ValueError:                     # on the driver: never gated
            here = None
        if here == self.worker and not Event(self.gate).wait(self.gate_timeout):
            raise TimeoutError(f"gate {self.gate!r} not opened in {self.gate_timeout} s")
        return super().loss_grad(params, X, y, grad, trainable=trainable, **kwargs)
