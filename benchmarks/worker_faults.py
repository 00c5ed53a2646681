"""Models that misbehave in one worker process: the benchmarks' kills and stragglers.

``hooked(cls, pid, hook)`` is a ``cls`` model whose ``loss_grad`` runs as
``hook(n, call)`` in the process ``pid`` (n: that process's count of calls,
from 1; ``call()``: the real ``loss_grad``) and as usual elsewhere. Every
strategy's gradients go through ``loss_grad``, so the fault lands inside a
step however short the fit. The classes and hooks are made in functions:
they travel to the workers by value.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def worker_pid(client, address):
    """The process id of the worker at ``address``."""
    return client.run(os.getpid, workers=[address])[address]


def hooked(cls, pid, hook):
    """``cls`` with ``loss_grad`` wrapped by ``hook`` in process ``pid``."""
    class Hooked(cls):
        def loss_grad(self, *args, **kwargs):
            call = lambda: super(Hooked, self).loss_grad(*args, **kwargs)  # noqa: E731
            if os.getpid() != pid:
                return call()
            self._hook_calls = getattr(self, "_hook_calls", 0) + 1
            return hook(self._hook_calls, call)
    Hooked.__name__ = f"Hooked{cls.__name__}"
    return Hooked


def kill_at(at_call, stamp):
    """A hook: at call ``at_call``, write ``time.time()`` to ``stamp`` and SIGKILL
    the process (before computing)."""
    def hook(n, call):
        if n == at_call:
            Path(stamp).write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return call()
    return hook


def slowed(factor):
    """A hook: each call takes ``factor`` times as long (it sleeps ``factor - 1``
    times the call's own time after it), as on a machine ``factor`` times
    slower; the sleep leaves the CPU to the others, as another machine would."""
    def hook(n, call):
        t0 = time.perf_counter()
        out = call()
        time.sleep((factor - 1.0) * (time.perf_counter() - t0))
        return out
    return hook
