"""MLflow: where runs go, what each run records, per-epoch logging. Knows the trainer's results."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import warnings
from importlib import metadata
from pathlib import Path

import keras
import mlflow
import matplotlib.pyplot as plt
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient

from . import redact
from .phantoms import cache_root

KIND_TAG = "tumorbench.kind"
MEMBER_TAG = "tumorbench.member"  # 1-based seed-ensemble member of a fold run (absent before train.members: 1)
MODEL_URI_TAG = "tumorbench.model_uri"  # the run's MLflow model (models:/<id>)
REGISTERED_TAG = "tumorbench.registered"  # "<registered name> v<version>" when the run became a champion
CHAMPION = "champion"
SCORED_ON = "scored_on"  # param: intake.scored_on of the run's held-out images (absent before it existed)
PACKAGES = ("tensorflow", "keras", "numpy", "scikit-learn", "mlflow", "optuna", "tumorbench")
# The user's setting, read once: mlflow.set_tracking_uri() writes this variable itself, so reading
# it later would return our own last choice instead of the user's.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI", "")


class TrackingUnavailable(RuntimeError):
    """The tracking store can't be reached; raised before any training."""


def tracking_uri(tracking_config) -> str:
    """Config key, else $MLFLOW_TRACKING_URI, else a SQLite file in the results folder."""
    if tracking_config.uri:
        return tracking_config.uri
    if USER_TRACKING_URI:
        return USER_TRACKING_URI
    return f"sqlite:///{Path(tracking_config.results_dir).resolve() / 'mlflow.db'}"


def connect(tracking_config) -> MlflowClient:
    """Point MLflow at the store and prove it answers, so a dead server fails before training."""
    uri = tracking_uri(tracking_config)
    try:
        if uri.startswith(("http://", "https://")):
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        elif uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as err:
        if err.get_http_status_code() in (401, 403):  # no, wrong or too weak credentials
            raise TrackingUnavailable(redact.mask(
                f"MLflow server {uri} refused these credentials: set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to a user of that server (docs/team.md)")) from None
        raise TrackingUnavailable(redact.mask(f"MLflow tracking store {uri} is unreachable: {err}")) from None
    except Exception as err:  # any failure here means: not usable
        raise TrackingUnavailable(redact.mask(f"MLflow tracking store {uri} is unreachable: {err}")) from None
    return client


# MLflow 3's UI opens an experiment on the page its kind says; this is the value its own front end
# uses for model training (ExperimentKind.CUSTOM_MODEL_DEVELOPMENT), which opens on the runs table.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def experiment_id(client: MlflowClient, name: str, tracking_config) -> str:
    """One experiment per data set, of the model-training kind (existing ones are tagged too); with
    the default local store, artifacts go under results/."""
    found = client.get_experiment_by_name(name)
    if found:
        if found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///") and not tracking_config.uri:
        location = (Path(tracking_config.results_dir).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except mlflow.exceptions.MlflowException:  # another worker created it a moment ago
        return client.get_experiment_by_name(name).experiment_id


def runs_table_links(client: MlflowClient, base_url: str) -> dict[str, str]:
    """{experiment name: the address of its runs table} for the model-training experiments. MLflow
    3's UI opens an experiment on its GenAI overview whatever its kind (the sidebar's GenAI / Model
    training switch is remembered per browser, GenAI at first); `workflowType=machine_learning` in
    the address opens the runs table with the switch on Model training."""
    return {e.name: f"{base_url.rstrip('/')}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning"
            for e in client.search_experiments() if e.tags.get(EXPERIMENT_KIND_TAG) == MODEL_TRAINING}


def run_name(*parts: str) -> str:
    """A run name unique within its experiment: the parts and the start time to the second."""
    return "-".join([*parts, time.strftime("%Y%m%d-%H%M%S")])


def log_dataset_inputs(name: str, path: str, splits: dict[str, tuple[str, int]]) -> None:
    """The data of the active run as MLflow dataset inputs, one per split (context train, validation
    or test), so the UI's Dataset column and filter show them. splits: {split: (digest, images)}."""
    with warnings.catch_warnings():  # a local folder matches two equivalent local source types
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(path)
    for split, (digest, count) in splits.items():
        dataset = MetaDataset(source, name=name, digest=digest)
        context = {"val": "validation"}.get(split, split)
        race_safe(mlflow.log_input, dataset, context=context, tags={"images": str(count)})


def race_safe(write, *args, tries: int = 3, **kwargs):
    """A store write that two workers of one sweep can make at the same moment (the same dataset row,
    the same tag of their study's parent run). The store refuses the second insert of a key (a
    unique-key error from PostgreSQL); tried again, the write finds the row and links or updates it."""
    for attempt in range(tries):
        try:
            return write(*args, **kwargs)
        except mlflow.exceptions.MlflowException:
            if attempt == tries - 1:
                raise
            time.sleep(0.5)


def provenance_tags() -> dict[str, str]:
    tags = {}
    try:
        tags["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        tags["git_commit"] = "unknown"
    for package in PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return tags


class EpochLogger(keras.callbacks.Callback):
    """Logs every epoch of both phases on one step axis, with a `phase` metric marking the boundary
    (the trainer sets `phase` before each fit).

    Names get an `epoch_` prefix (epoch_val_loss, ...) so they never shadow the final metrics.
    """

    def __init__(self):
        super().__init__()
        self.phase = 1

    def on_epoch_end(self, epoch, logs=None):
        values = {f"epoch_{k}": float(v) for k, v in (logs or {}).items() if math.isfinite(float(v))}
        mlflow.log_metrics({**values, "epoch_phase": float(self.phase)}, step=epoch)


def log_figure(figure, name: str) -> None:
    mlflow.log_figure(figure, name)
    plt.close(figure)


def log_json(values, name: str) -> None:
    mlflow.log_text(json.dumps(values, indent=2), name)


def registered_name(data_set: str) -> str:
    return f"tumorbench-{data_set}"


def some_folds_only(run) -> bool:
    """A cross-validation run of only some of its folds (data.only_folds): its mean covers part of the
    data and its ensemble part of the fold models, so it never becomes (or stays) the champion."""
    params = run.data.params
    return "folds_scored" in params and len(params["folds_scored"].split(",")) < int(params["folds"])


def evidence(run) -> int:
    """How much data a run's score rests on: 2 for a whole cross-validation (every image scored once,
    the model an ensemble of the fold models), 1 for one validation split, 0 for some folds only."""
    if "folds" not in run.data.params:
        return 1
    return 0 if some_folds_only(run) else 2


def replaces_champion(run, score: float, champion_run, champion_score: float) -> bool:
    """Whether `run` should take the champion alias: more evidence wins, and on equal evidence the
    higher score. The scores of one split and of a whole cross-validation are not comparable (the
    easiest fold alone scores above the mean), so a whole cross-validation replaces a one-split
    champion whatever the scores, and one split never displaces it."""
    if run.info.run_id == champion_run.info.run_id:
        return False
    return (evidence(run), score) > (evidence(champion_run), champion_score)


def register_champion(client: MlflowClient, data_set: str, run, score_key: str) -> str | None:
    """Register `run`'s MLflow model as the next version of tumorbench-<data set> and move the
    `champion` alias to it, when it replaces the current champion (replaces_champion) or there is none.
    Returns "<name> v<version>" when it did, None when the champion stays where it is."""
    name, score = registered_name(data_set), run.data.metrics.get(score_key)
    uri = run.data.tags.get(MODEL_URI_TAG)
    if uri is None or score is None or some_folds_only(run):
        return None
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        if not replaces_champion(run, score, client.get_run(current.run_id), float(current.tags.get("score", "-inf"))):
            return None
    except mlflow.exceptions.MlflowException:  # no such model or no champion yet
        pass
    version = mlflow.register_model(uri, name, tags={"score": str(score), "score_metric": score_key,
                                                     "source_run": run.info.run_id})
    client.set_model_version_tag(name, version.version, "score", str(score))
    client.set_registered_model_alias(name, CHAMPION, version.version)
    label = f"{name} v{version.version}"
    client.set_tag(run.info.run_id, REGISTERED_TAG, label)
    return label


def run_model_file(client: MlflowClient, run_id: str) -> Path:
    """Run `run_id`'s model/model.keras, downloaded once into the tumorbench cache (a run's artifacts
    never change), for `predict` and for `run:<id>` weights alike; MlflowException/OSError if absent."""
    local = cache_root() / "models" / run_id / "model.keras"
    if not local.is_file():
        with tempfile.TemporaryDirectory() as download:
            fetched = client.download_artifacts(run_id, "model/model.keras", download)
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(fetched, local)
    return local
