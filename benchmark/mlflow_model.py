"""Trained classifiers as MLflow models (a LoggedModel with the python_function flavor), so
`mlflow.pyfunc.load_model`, `mlflow models serve`, the registry and the UI's model pages can use them.

The MLflow model wraps the self-describing `.keras` file(s) (safe-mode loading, tumorbench.json
inside) and applies the backbone's own preprocessing, so it takes raw RGB images at the model's
input size and returns class probabilities. Several files (a cross-validated run's fold models)
are one ensemble: their probabilities are averaged; params={"tta": True} adds test-time views.
Knows only modelfile, pipeline (the views) and the backbones.
"""
from __future__ import annotations

from importlib import metadata as package_metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

MEMBER_PREFIX = "member_"
BATCH_SIZE = 32
REQUIREMENTS = ("tensorflow", "keras", "numpy", "pandas", "pillow", "mlflow")


class Classifier(mlflow.pyfunc.PythonModel):
    """Raw RGB images (N, size, size, 3), 0..255 -> a frame of class probabilities (prob_<class>)."""

    # The logged signature validates inputs; MLflow's type-hint wrapping of predict (and its
    # warning, which MLflow shows whatever the warning filters say) is not wanted on top of it.
    _skip_type_hint_validation = True

    def load_context(self, context):
        import backbones

        from . import modelfile

        self.members = []
        for key in sorted(k for k in context.artifacts if k.startswith(MEMBER_PREFIX)):
            model, description = modelfile.load(Path(context.artifacts[key]))
            self.members.append((model, backbones.get(description["backbone"]).preprocess))
        self.class_names = description["class_names"]

    def predict(self, context, model_input, params=None):
        """params={"tta": True} also averages over the test-time views (pipeline.TTA_VIEWS)."""
        from .pipeline import ensemble_probabilities

        probabilities = ensemble_probabilities(self.members, np.asarray(model_input), BATCH_SIZE,
                                               bool((params or {}).get("tta", False)))
        return pd.DataFrame(probabilities, columns=[f"prob_{name}" for name in self.class_names])


def _requirements() -> list[str]:
    found = []
    for package in REQUIREMENTS:
        try:
            found.append(f"{package}=={package_metadata.version(package)}")
        except package_metadata.PackageNotFoundError:
            continue
    return found


def log(keras_files: list[Path], description: dict, example: np.ndarray, name: str = "classifier"):
    """Log `keras_files` (one model, or an ensemble) as an MLflow model of the active run, with its
    signature, an input example and tumorbench's description as model metadata; returns ModelInfo."""
    import shutil
    import tempfile

    size = description["input_size"]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))]),
        outputs=Schema([ColSpec("double", f"prob_{c}") for c in description["class_names"]]),
        params=ParamSchema([ParamSpec("tta", "boolean", False)]))
    with tempfile.TemporaryDirectory() as tmp:  # unique names: every fold's file is model.keras
        members = {}
        for i, path in enumerate(keras_files):
            members[f"{MEMBER_PREFIX}{i:02d}"] = shutil.copyfile(path, Path(tmp) / f"{MEMBER_PREFIX}{i:02d}.keras")
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(__file__).with_name("mlflow_entry.py")),
            artifacts={k: str(v) for k, v in members.items()},
            signature=signature, input_example=np.asarray(example, dtype=np.uint8),
            metadata={"tumorbench": {**description, "ensemble_members": len(keras_files)}},
            pip_requirements=_requirements())


def member_files(model_dir: Path) -> list[Path]:
    """The `.keras` files inside a downloaded MLflow model of this kind, in member order."""
    files = sorted((model_dir / "artifacts").glob("*.keras"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: not a tumorbench MLflow model (no .keras files in artifacts/)")
    return files
