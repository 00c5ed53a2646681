"""YAML workflows: the file, its validation, and running it on a Dask cluster.

One file describes one experiment (DESIGN.md, "Workflow file"): ``name,
cluster, data, model, strategy, optimizer, train, output, sweep``. Every key
of ``model``, ``strategy``, ``optimizer``, ``train`` and the partitioning
keys of ``data`` is a keyword of the Python API: ``kind`` names come from
``dmlcore.registry``, allowed keys from the constructors' signatures, ranges
from building the objects, all before a cluster starts. Bad input is a
``WorkflowError`` whose text is one line naming the file, the YAML line (or
the ``--set``) and the key path. The package, one job per module:

    parse     the file: YAML with lines, --set          schema    types, keys, kinds
    sections  cluster/model/strategy/optimizer/train/output checks
    sources   data sources: checks and loading           labels    label checks
    validate  Workflow -> Plan of RunSpecs               build     model/strategy/optimizer
    prepare   load, split, partition the data            client    the run's client
    fitting   one fit, checkpoints, metrics              sweep     a grid of fits
    runner    run(): the whole file, outputs written only on success
"""
# parse first: it defines WorkflowError, which dmlcore.outputs imports from here
from .parse import WorkflowError, Workflow, apply_overrides, load, parse_text, set_path  # noqa
from .. import registry
from ..registry import REGISTRY
from .build import build_model, build_optimizer, build_strategy
from .client import open_client
from .fitting import RunResult, _checkpoint_dirs, _prepare_checkpoints  # noqa: F401
from .prepare import PreparedData, prepare_data
from .runner import _resolved_config, run  # noqa: F401 (private: for the tests)
from .validate import TOP_KEYS, Plan, RunSpec, describe, validate

__all__ = ["WorkflowError", "REGISTRY", "load", "validate", "run", "resolve_kind",
           "Workflow", "RunSpec", "Plan", "PreparedData", "RunResult", "describe",
           "prepare_data", "build_model", "build_strategy", "build_optimizer", "open_client",
           "parse_text", "apply_overrides", "set_path", "TOP_KEYS"]


def resolve_kind(section, kind):
    """The class (or function) registered for ``kind`` in ``section`` (``dmlcore.registry``)."""
    return registry.resolve(section, kind)
