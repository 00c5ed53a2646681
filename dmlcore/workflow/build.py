"""Building the model, strategy and optimizer of a checked configuration.

What is specific to a kind lives on its class, found through
``dmlcore.registry``; the runner reads these members and no per-kind table:

* model: ``inferred_keys`` (keywords filled in from the data),
  ``extra_keys`` (file keys beyond the constructor's), ``accepts_sparse``,
  ``binary`` (labels 0/1), ``for_data(n_features, n_outputs, **config)``
  (None sizes: placeholders, for checking a file), ``fixed_classes(config)``,
  optionally ``penalty_keys`` with ``penalty(config, n) -> (l1, weight_decay)``
  (a model-section penalty, solved by OWL-QN or L-BFGS) and, on the instance,
  ``is_classifier``;
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


def build_run_optimizer(spec, n):
    """The optimizer of a run (None: the strategy's default). A model-section penalty
    (``spec.penalty``) sets the batch solver's ``l1``/``weight_decay`` over total weight
    ``n``: OWL-QN when it has an L1 term, else L-BFGS, unless the file names one."""
    if not spec.penalty:
        return build_optimizer(spec.optimizer_kind, spec.optimizer_kwargs) \
            if spec.optimizer_kind else None
    l1, decay = registry.resolve("model", spec.model_kind).penalty(spec.penalty, n)
    kind = spec.optimizer_kind or ("owlqn" if l1 else "lbfgs")
    kwargs = dict(spec.optimizer_kwargs, weight_decay=decay)
    if kind == "owlqn":
        kwargs["l1"] = l1
    return build_optimizer(kind, kwargs)


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
