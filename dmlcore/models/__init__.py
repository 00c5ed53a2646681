"""Models: parameter layout + compiled loss/gradient kernels (see ``base.Model``)."""
from .base import Model
from .glm import Linear, Logistic, Softmax
from .mlp import MLP

_KINDS = {"linear": Linear, "logistic": Logistic, "softmax": Softmax, "mlp": MLP}


def from_config(config: dict) -> Model:
    """Rebuild a model from ``model.to_config()`` (a dict with ``kind``)."""
    config = dict(config)
    kind = config.pop("kind")
    if kind not in _KINDS:
        raise ValueError(f"model kind {kind!r} is not one of {', '.join(_KINDS)}")
    return _KINDS[kind](**config)


__all__ = ["Model", "Linear", "Logistic", "Softmax", "MLP", "from_config"]
