"""Where a backbone's starting weights come from: `imagenet`, a file path, `none`, or a spec's extra source."""
from __future__ import annotations

import os
from pathlib import Path

import keras


class WeightsUnavailable(RuntimeError):
    """The requested weights can't be had; raised before any training starts."""


def keras_cache_dir() -> Path:
    """The folder Keras' get_file keeps application weights in ($KERAS_HOME/models)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def imagenet_file(spec) -> str:
    """The cached ImageNet weights file, downloading it with Keras' own get_file when missing (or
    making it locally, for a spec whose weights come from an installed package)."""
    cached = keras_cache_dir() / spec.imagenet_file
    if spec.imagenet_make is not None:
        if not spec.imagenet_check(cached):
            spec.imagenet_make(cached)
        return str(cached)
    if cached.is_file():
        return str(cached)
    try:
        return keras.utils.get_file(
            spec.imagenet_file, spec.imagenet_origin, cache_subdir="models", file_hash=spec.imagenet_hash
        )
    except Exception as err:  # get_file raises plain Exception on network failure
        raise WeightsUnavailable(
            f"ImageNet weights for {spec.name} are not cached and could not be downloaded ({err}). "
            f"Put the file {spec.imagenet_file} into {cached.parent} (from {spec.imagenet_origin}) "
            f"or choose other weights (none, hed for vgg16, or a path)."
        ) from err


def check(spec, weights: str) -> tuple[str, str | None]:
    """(label of the source, file to load or None) for `weights`; raises WeightsUnavailable early."""
    if weights in (None, "", "none"):
        return "none", None
    if weights == "imagenet":
        return "imagenet", imagenet_file(spec)
    if weights in spec.extra_weights:
        return weights, None
    path = Path(weights)
    if path.is_file():
        return f"file:{path.name}", str(path)
    sources = ["imagenet", "none", *spec.extra_weights, "<path to a weights file>"]
    raise WeightsUnavailable(
        f"weights {weights!r} for {spec.name}: not a known source nor an existing file; choose one of {sources}"
    )


def build_base(spec, input_size: int, weights: str):
    """Build `spec`'s base with the named weights source; returns (model, weights source used)."""
    label, path = check(spec, weights)
    base = spec.build(input_size, path)
    if label in spec.extra_weights:
        spec.extra_weights[label](base)
    return base, label
