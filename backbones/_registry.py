"""One dict of backbone specs, filled by the `register` decorator (as torchvision's models/_api.py)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

_REGISTRY: dict[str, "BackboneSpec"] = {}


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the trainer needs to know about one ImageNet backbone.

    build(input_size, weights) returns the base model (include_top=False); `weights` is what
    `backbones.weights.resolve` returned: None for random init, or a path to a weights file.
    preprocess maps float32 RGB images in 0..255 to what the weights expect.
    layer_groups is ordered from input to output: (group name, layer-name prefixes).
    """

    name: str
    build: Callable
    preprocess: Callable
    preprocessing: str
    input_size: int
    layer_groups: tuple[tuple[str, tuple[str, ...]], ...]
    last_conv_layer: str
    imagenet_file: str = ""
    imagenet_origin: str = ""
    imagenet_hash: str = ""
    # ImageNet weights made locally from an installed package, where Keras' own file (imagenet_file)
    # is not in the Keras cache: imagenet_make(path) writes imagenet_made_file there with a checksum
    # (weights.save_made); a file whose checksum disagrees is made again.
    imagenet_make: Callable | None = None
    imagenet_made_file: str = ""
    extra_weights: dict[str, Callable] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def group_names(self) -> list[str]:
        return [name for name, _ in self.layer_groups]

    def group_of(self, layer_name: str) -> str:
        """The group whose prefix matches `layer_name`; KeyError if none does."""
        for group, prefixes in self.layer_groups:
            if layer_name.startswith(prefixes):
                return group
        raise KeyError(f"layer {layer_name!r} of {self.name} belongs to no layer group")


def register(factory: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
    """Register the spec returned by `factory`; a second spec with the same name is an error."""
    spec = factory()
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return factory


def get(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(names())}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def load_plugins(modules: list[str]) -> None:
    """Import modules named in the config so their `@register` calls run."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"backbone plugin module {module!r} could not be imported: {err}") from err
