"""Self-describing model files: a `.keras` file carrying `tumorbench.json` (backbone, classes, input
size, preprocessing, weights, threshold, data fingerprint, version) inside its zip, loaded with
Keras safe mode on so a model file can never run code."""
from __future__ import annotations

import json
import zipfile
from importlib import metadata as package_metadata
from pathlib import Path

import keras

import backbones

METADATA_NAME = "tumorbench.json"


class ModelFileError(ValueError):
    """A model file that can't or mustn't be used; names the file and why."""


def describe(spec, class_names, input_size: int, weights: str, fingerprint: str, plugins=(),
             threshold: float | None = None) -> dict:
    try:
        version = package_metadata.version("tumorbench")
    except package_metadata.PackageNotFoundError:
        version = "unknown"
    return {"backbone": spec.name, "class_names": list(class_names), "input_size": input_size,
            "preprocessing": spec.preprocessing, "weights": weights, "threshold": threshold,
            "data_fingerprint": fingerprint, "plugins": list(plugins), "tumorbench_version": version}


def save(model: keras.Model, path: Path, description: dict) -> Path:
    """Weights and architecture only: an uncompiled twin over the same layers is saved, because the
    optimizer's moments (up to twice the trainable weights) are never read back (`load` does not
    compile) and would double every model file in the MLflow store."""
    keras.Model(model.inputs, model.outputs, name=model.name).save(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(METADATA_NAME, json.dumps(description, indent=1))
    return path


def read_description(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(METADATA_NAME))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except zipfile.BadZipFile:
        raise ModelFileError(f"{path}: not a .keras model file") from None
    except KeyError:
        raise ModelFileError(f"{path}: holds no {METADATA_NAME}; not a tumorbench model file") from None


def load(path: Path) -> tuple[keras.Model, dict]:
    """(model, description); refuses files whose layers would execute code (Keras safe mode)."""
    description = read_description(path)
    backbones.load_plugins(description.get("plugins", []))
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as err:
        if "safe_mode" in str(err):
            raise ModelFileError(f"{path}: refused: it holds code (e.g. a Lambda layer) that safe mode will not "
                                 f"run, so loading it could execute anything. ({str(err).split('.')[0]}.)") from None
        raise ModelFileError(f"{path}: could not be loaded ({err})") from None
    return model, description
