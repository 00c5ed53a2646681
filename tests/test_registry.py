"""The one registry of kinds (``dmlcore.registry``): what it lists is what the
runner, ``models.from_config`` and ``dmlcore info`` accept, and a kind
registered from outside the library works from a workflow file unchanged."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dmlcore import cli, registry
from dmlcore.models import Linear, from_config
from dmlcore.outputs import load_model
from dmlcore.workflow import WorkflowError, build_strategy, load, validate


class ScaledLinear(Linear):
    """A kind defined outside the library: Linear with one more (float) keyword."""

    kind = "scaled_linear"

    def __init__(self, n_features: int, scale: float = 1.0):
        super().__init__(n_features)
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = float(scale)

    def to_config(self) -> dict:
        return {**super().to_config(), "scale": self.scale}


@pytest.fixture
def scaled_linear():
    registry.register("model", ScaledLinear.kind, ScaledLinear)
    yield ScaledLinear
    registry.unregister("model", ScaledLinear.kind)


@pytest.mark.parametrize("kind", registry.kinds("model"))
def test_every_model_kind_builds_for_data_and_round_trips(kind):
    cls = registry.resolve("model", kind)
    model = cls.for_data(5, 3)                 # the minimal config: sizes from the data
    assert model.to_config()["kind"] == kind
    again = from_config(model.to_config())
    assert type(again) is cls and again == model and again.n_params == model.n_params
    assert registry.resolve("model", kind).accepts_sparse in (True, False)


@pytest.mark.parametrize("section", ["strategy", "optimizer"])
def test_every_strategy_and_optimizer_kind_builds_from_its_defaults(section):
    for kind in registry.kinds(section):
        obj = (build_strategy(kind, {}) if section == "strategy"
               else registry.resolve(section, kind)())
        assert isinstance(obj, registry.resolve(section, kind))


def test_from_config_names_the_registered_kinds():
    with pytest.raises(ValueError, match="model kind 'nope' is not one of linear, logistic, "
                                         "softmax, mlp$"):
        from_config({"kind": "nope"})


def test_cli_info_lists_exactly_the_registry(capsys, scaled_linear):
    assert cli.main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("kinds (dmlcore.registry):") + 1
    listed = {}
    for line in lines[start:start + len(registry.SECTIONS)]:
        section, kinds = line.split(None, 1)
        listed[section] = kinds.split(", ")
    assert listed == {s: registry.kinds(s) for s in registry.SECTIONS}
    assert "scaled_linear" in listed["model"]


def test_register_refuses_a_taken_kind_and_unknown_sections():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("model", "linear", Linear)
    with pytest.raises(ValueError, match="section 'loss' is not one of"):
        registry.register("loss", "huber", object)
    assert registry.resolve("model", "linear") is Linear


WORKFLOW = """\
name: scaled
data:
  source:
    synthetic: {kind: regression, n_samples: 400, n_features: 4}
  partitions: 2
model: {kind: scaled_linear, scale: 2.0}
strategy: {kind: sync, batch_size: 50}
optimizer: {kind: sgd, lr: 0.05}
train: {steps: 5}
output: {dir: OUT, plots: false}
"""


def test_a_registered_model_kind_runs_from_a_workflow(tmp_path, capsys, scaled_linear):
    path = tmp_path / "wf.yaml"
    path.write_text(WORKFLOW.replace("OUT", str(tmp_path / "out")))
    spec = validate(load(path)).runs[0]
    assert spec.model_kind == "scaled_linear" and spec.model_kwargs == {"scale": 2.0}
    assert not spec.classifier
    from distributed import LocalCluster

    # in-process workers: they see the class defined in this test module
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster:
        rc = cli.main(["run", str(path), "--no-progress", "--scheduler",
                       cluster.scheduler_address])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 5 and np.isfinite(metrics["final_loss"])
    model, params, _ = load_model(tmp_path / "out" / "model.npz")
    assert type(model) is ScaledLinear and model.scale == 2.0 and model.n_features == 4
    assert params.shape == (model.n_params,)


@pytest.mark.parametrize("change, where", [
    ("scale: x", "model.scale: expected a number"),          # the type from the default
    ("scale: -1.0", "model.scale: scale must be positive"),  # the constructor's own check
    ("shift: 1.0", "model.shift: unknown key"),              # keys are the constructor's
])
def test_a_registered_kind_is_checked_like_a_builtin(tmp_path, scaled_linear, change, where):
    bad = WORKFLOW.replace("scale: 2.0", change)
    path = tmp_path / "wf.yaml"
    path.write_text(bad.replace("OUT", str(tmp_path / "out")))
    with pytest.raises(WorkflowError, match=where):
        validate(load(path))


def test_an_unregistered_kind_is_refused_with_the_list(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text(WORKFLOW.replace("OUT", str(tmp_path / "out")))
    with pytest.raises(WorkflowError, match=r"wf.yaml:6: model.kind: 'scaled_linear' is not "
                                            r"one of linear, logistic, softmax, mlp"):
        validate(load(path))
