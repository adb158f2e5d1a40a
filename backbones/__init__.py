"""Registry of backbone adapters: `get(name)`, `names()`, `register`; one module per backbone."""
from ._registry import BackboneSpec, get, load_plugins, names, register
from . import weights
from .weights import WeightsUnavailable, build_base
from . import efficientnet_lite0, efficientnet_lite2, efficientnetb0, resnet50, vgg16  # noqa: F401  (registers the built-in backbones)

__all__ = ["BackboneSpec", "WeightsUnavailable", "build_base", "get", "load_plugins", "names", "register", "weights"]
