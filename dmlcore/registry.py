"""The one registry of kinds: ``kind`` names -> the classes (or functions) they build.

``REGISTRY[section][kind]`` is a class or a ``"module:attribute"`` string,
imported on first ``resolve``; sections are ``model``, ``strategy``,
``optimizer`` and ``synthetic`` (data generators), and the order of a
section is the order errors and ``dmlcore info`` list its kinds in.
The workflow runner, ``dmlcore.models.from_config`` and ``dmlcore info``
read this table and nothing else. A registered class carries what is
specific to its kind (see ``dmlcore.workflow.build``): adding a kind is
one line here, or ``register(section, kind, cls)`` from any module.
"""
from __future__ import annotations

import importlib

__all__ = ["REGISTRY", "SECTIONS", "register", "unregister", "resolve", "kinds"]

REGISTRY = {
    "model": {"linear": "dmlcore.models.glm:Linear", "logistic": "dmlcore.models.glm:Logistic",
              "softmax": "dmlcore.models.glm:Softmax", "mlp": "dmlcore.models.mlp:MLP"},
    "strategy": {"sync": "dmlcore.strategies.sync:SyncSGD",
                 "ps": "dmlcore.strategies.ps:ParameterServer",
                 "fedavg": "dmlcore.strategies.fedavg:FedAvg"},
    "optimizer": {"sgd": "dmlcore.optim:SGD", "adam": "dmlcore.optim:Adam",
                  "lbfgs": "dmlcore.optim:LBFGS", "owlqn": "dmlcore.optim:OWLQN"},
    "synthetic": {"classification": "dmlcore.datasets:make_classification",
                  "regression": "dmlcore.datasets:make_regression"},
}
SECTIONS = tuple(REGISTRY)


def register(section, kind, target):
    """Make ``kind`` in ``section`` build ``target`` (a class or "module:attribute").

    A kind already registered is a ValueError (``unregister`` it first).
    """
    if section not in REGISTRY:
        raise ValueError(f"registry section {section!r} is not one of {', '.join(SECTIONS)}")
    if kind in REGISTRY[section]:
        raise ValueError(f"{section} kind {kind!r} is already registered")
    REGISTRY[section][kind] = target
    return target


def unregister(section, kind):
    """Remove ``kind`` from ``section`` (a KeyError when it is not there)."""
    del REGISTRY[section][kind]


def kinds(section):
    """The kind names of ``section``, in registry order."""
    return list(REGISTRY[section])


def resolve(section, kind):
    """The class (or function) registered for ``kind`` in ``section`` (KeyError if none)."""
    target = REGISTRY[section][kind]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target
