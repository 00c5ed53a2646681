"""Building the model, strategy and optimizer of a checked configuration.

What is specific to a kind lives on its class, found through
``dmlcore.registry``; the runner reads these members and no per-kind table:

* model: ``inferred_keys`` (keywords filled in from the data),
  ``extra_keys`` (file keys beyond the constructor's), ``accepts_sparse``,
  ``binary`` (labels 0/1), ``for_data(n_features, n_outputs, **config)``
  (None sizes: placeholders, for checking a file), ``fixed_classes(config)``
  and, on the instance, ``is_classifier``;
* strategy: ``unit`` ("steps" or "rounds": what ``train`` lengths count),
  ``optimizer_keys`` (keywords holding a ``{kind: ...}`` optimizer),
  ``full_batch(config)``;
* optimizer: a batch solver (L-BFGS) says so (``batch_solver``), the others
  ``init``/``update``.
"""
from __future__ import annotations

from .. import registry
from .._util import first_line
from .parse import WorkflowError


def is_batch_solver(kind):
    """Whether optimizer ``kind`` drives full-batch ``(loss, grad)`` evaluations itself."""
    return bool(getattr(registry.resolve("optimizer", kind), "batch_solver", False))


def build_optimizer(kind, kwargs):
    return registry.resolve("optimizer", kind)(**kwargs)


def build_strategy(kind, kwargs):
    """The strategy of ``kind``; nested ``{kind: ...}`` optimizers built first."""
    cls = registry.resolve("strategy", kind)
    kwargs = dict(kwargs)
    for name in cls.optimizer_keys:
        if isinstance(kwargs.get(name), dict):
            okw = dict(kwargs[name])
            kwargs[name] = build_optimizer(okw.pop("kind"), okw)
    return cls(**kwargs)


def build_model(spec, prepared):
    """The model of ``spec`` with sizes inferred from the data."""
    cls = registry.resolve("model", spec.model_kind)
    try:
        return cls.for_data(prepared.n_features, prepared.n_outputs, **spec.model_kwargs)
    except ValueError as exc:
        raise WorkflowError(f"model.{first_line(exc)}") from None
