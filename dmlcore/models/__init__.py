"""Models: parameter layout + compiled loss/gradient kernels (see ``base.Model``)."""
from .. import registry
from .base import Model
from .glm import Linear, Logistic, Softmax
from .mlp import MLP


def from_config(config: dict) -> Model:
    """Rebuild a model from ``model.to_config()`` (a dict with ``kind``: ``dmlcore.registry``)."""
    config = dict(config)
    kind = config.pop("kind")
    if kind not in registry.REGISTRY["model"]:
        raise ValueError(f"model kind {kind!r} is not one of "
                         f"{', '.join(registry.kinds('model'))}")
    return registry.resolve("model", kind)(**config)


__all__ = ["Model", "Linear", "Logistic", "Softmax", "MLP", "from_config"]
