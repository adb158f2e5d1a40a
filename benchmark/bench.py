"""`bench`: every chosen backbone through the same two-phase recipe, one MLflow run each, then the table."""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

import backbones

from . import feeds, gradcam, intake, metrics, modelfile, pipeline, plots, report, tracking
from .model import build_classifier
from .phantoms import phantom_dataset
from .trainer import TrainingFailed, train_two_phase


@dataclass
class Prepared:
    """The data every backbone of one benchmark shares."""

    dataset: intake.Dataset
    parts: dict[str, list[intake.Sample]]
    name: str  # experiment and results folder name
    path: str


def data_path(config) -> Path:
    """The configured data, or the embedded phantom set (generated once, cached) when none is given."""
    data = config.data
    if data.path:
        return Path(data.path).resolve()
    return phantom_dataset(data.phantom_mode, data.phantom_per_class, data.phantom_size, config.seed)


def dataset_name(config) -> str:
    """Experiment and results-folder name: the data folder's name, or phantoms-<mode>."""
    if not config.data.path:
        return f"phantoms-{config.data.phantom_mode}"
    return intake.load_dataset(config.data.path, config.data.class_names, config.data.skip_bad).name


def prepare_data(config) -> Prepared:
    """Read and split the data every backbone of this benchmark shares."""
    data = config.data
    path = data_path(config)
    dataset = intake.load_dataset(path, data.class_names, data.skip_bad)
    name = dataset.name if data.path else dataset_name(config)
    return Prepared(dataset, intake.split(dataset, data.val_fraction, config.seed), name, str(path))


def resolve_weights(config) -> dict[str, str]:
    """The weights source each backbone will use, checked before any training starts.

    When the requested source can't be had and `weights_fallback` is set, warn loudly and fall
    back; the source actually used is what gets recorded.
    """
    chosen = {}
    for name in config.model.backbones:
        spec = backbones.get(name)
        try:
            backbones.weights.check(spec, config.model.weights)
            chosen[name] = config.model.weights
        except backbones.WeightsUnavailable as err:
            if not config.model.weights_fallback:
                raise
            print(f"\n!!! WARNING: {err}\n!!! {name} falls back to weights '{config.model.weights_fallback}'; "
                  f"its results are NOT pretrained results.\n", file=sys.stderr)
            chosen[name] = config.model.weights_fallback
    return chosen


def _augment_summary(augment) -> str:
    if not augment.enabled:
        return "off"
    return (f"rotation={augment.rotation_degrees}deg shift={augment.shift} shear={augment.shear} "
            f"zoom={augment.zoom} hflip={augment.horizontal_flip}")


def _log_params(config, prepared: Prepared, spec, size: int, weights_used: str) -> None:
    dataset = prepared.dataset
    train, model = config.train, config.model
    mlflow.log_params({
        "backbone": spec.name, "input_size": size, "weights": weights_used, "weights_requested": model.weights,
        "preprocessing": spec.preprocessing, "lr1": train.lr1, "lr2": train.lr2, "unfreeze": train.unfreeze,
        "epochs1": train.epochs1, "epochs2": train.epochs2, "batch_size": train.batch_size,
        "augmentation": _augment_summary(config.augment), "class_weights": train.class_weights,
        "cache_views": train.cache_views,
        "seed": config.seed, "data_path": prepared.path, "data_fingerprint": dataset.fingerprint,
        "class_names": json.dumps(dataset.class_names), "class_to_index": json.dumps(dataset.class_to_index),
        "head_units": model.head_units, "dropout": model.dropout,
        "n_train": len(prepared.parts["train"]), "n_val": len(prepared.parts["val"]),
    })
    mlflow.log_text(config.to_toml(), "config.toml")


def _evaluate(model, dataset, samples, spec, size, batch_size, split_name: str) -> dict:
    ds = pipeline.make_dataset(dataset, samples, spec.preprocess, size, batch_size)
    probabilities = model.predict(ds, verbose=0)
    y_true = [s.label for s in samples]
    result = metrics.compute(y_true, probabilities, dataset.class_names)
    mlflow.log_metrics(metrics.flatten(result, split_name))
    tracking.log_figure(plots.confusion_matrix(result["confusion_matrix"], dataset.class_names,
                                               f"{spec.name} {split_name}"), f"confusion_matrix_{split_name}.png")
    mlflow.log_text(metrics.report_text(result, dataset.class_names), f"classification_report_{split_name}.txt")
    tracking.log_json(result, f"metrics_{split_name}.json")
    return result


def _log_gradcam_examples(model, spec, dataset, samples, size: int, predicted, per_kind: int = 4) -> None:
    """A grid of validation images with Grad-CAM overlays: some classified right, some wrong."""
    truth = [s.label for s in samples]
    right = [i for i, (t, p) in enumerate(zip(truth, predicted)) if t == p][:per_kind]
    wrong = [i for i, (t, p) in enumerate(zip(truth, predicted)) if t != p][:per_kind]
    chosen = right + wrong
    images = np.asarray(pipeline.decoded_images(dataset, samples, size))[chosen]
    maps = gradcam.heatmaps(model, spec, spec.preprocess(images.astype("float32")))
    names = dataset.class_names
    titles = [f"{'ok' if i in right else 'WRONG'}: {names[truth[i]]}\npredicted {names[predicted[i]]}" for i in chosen]
    tracking.log_figure(plots.gradcam_grid(images, [gradcam.overlay(im, m) for im, m in zip(images, maps)], titles,
                                           f"{spec.name}: Grad-CAM on validation images"), "gradcam_examples.png")


def _inference_ms(model, dataset, samples, spec, size, batch_size) -> float:
    """Wall time per image of a second, warm pass over the validation images."""
    ds = pipeline.make_dataset(dataset, samples, spec.preprocess, size, batch_size)
    model.predict(ds, verbose=0)
    started = time.perf_counter()
    model.predict(ds, verbose=0)
    return 1000 * (time.perf_counter() - started) / len(samples)


@dataclass
class Built:
    """One backbone's model and what feeds it, ready to train."""

    spec: object
    size: int
    base: keras.Model
    model: keras.Model
    weights_used: str
    feed: object


def set_precision(train_config) -> str:
    """mixed_float16 when asked, or on `auto` when a GPU is present; float32 otherwise."""
    gpu = bool(tf.config.list_physical_devices("GPU"))
    mixed = train_config.mixed_precision == "on" or (train_config.mixed_precision == "auto" and gpu)
    policy = "mixed_float16" if mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def make_feed(config, prepared: Prepared, spec, size: int, weights_used: str):
    """Cached frozen-layer outputs (train.cache_views > 0) or the full model streamed every epoch."""
    dataset, parts, train = prepared.dataset, prepared.parts, config.train
    n_classes = len(dataset.class_names)
    train_labels = [s.label for s in parts["train"]]
    weights = pipeline.class_weights(train_labels, n_classes) if train.class_weights else None
    if train.cache_views <= 0:
        train_ds = pipeline.make_dataset(dataset, parts["train"], spec.preprocess, size, train.batch_size,
                                         training=True, augment=config.augment, weights=weights, seed=config.seed)
        val_ds = pipeline.make_dataset(dataset, parts["val"], spec.preprocess, size, train.batch_size)
        return feeds.Streamed(train_ds, val_ds)
    key = {"backbone": spec.name, "size": size, "weights": weights_used, "augment": dataclasses.asdict(config.augment),
           "fingerprint": dataset.fingerprint, "train": pipeline.samples_hash(parts["train"]),
           "val": pipeline.samples_hash(parts["val"]), "policy": keras.mixed_precision.global_policy().name}
    return feeds.Cached(
        pipeline.decoded_images(dataset, parts["train"], size), pipeline.label_array(parts["train"], n_classes),
        None if weights is None else weights[train_labels].astype("float32"),
        pipeline.decoded_images(dataset, parts["val"], size), pipeline.label_array(parts["val"], n_classes),
        spec.preprocess, config.augment, train.cache_views, config.seed, train.batch_size, key,
        plan_unfreeze=train.unfreeze if train.epochs2 > 0 else 0)


def build(config, prepared: Prepared, name: str, weights: str) -> Built:
    """The model factory: a fresh Keras session, seeded, base + head, and the feed for it."""
    spec = backbones.get(name)
    size = config.model.input_size or spec.input_size
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    set_precision(config.train)
    base, weights_used = backbones.build_base(spec, size, weights)
    model = build_classifier(base, size, len(prepared.dataset.class_names), config.model.head_units,
                             config.model.dropout)
    return Built(spec, size, base, model, weights_used, make_feed(config, prepared, spec, size, weights_used))


def train_and_log(config, prepared: Prepared, built: Built, callbacks: list = (), score_key: str = "") -> dict:
    """Inside the active MLflow run: params, both phases, evaluation, figures, timings, the model.

    `callbacks` run on every epoch before the MLflow epoch logger; `score_key` (e.g. macro_f1)
    adds that validation metric to every epoch. Returns {split: metrics, ...}.
    """
    spec, size, model, train = built.spec, built.size, built.model, config.train
    dataset, parts = prepared.dataset, prepared.parts
    n_classes = len(dataset.class_names)
    score = (score_key, [s.label for s in parts["val"]], dataset.class_names) if score_key else None
    _log_params(config, prepared, spec, size, built.weights_used)
    try:
        result = train_two_phase(model, built.base, spec, built.feed, train, n_classes,
                                 callbacks=[*callbacks, tracking.EpochLogger()], score=score)
        scores = {split: _evaluate(model, dataset, parts[split], spec, size, train.batch_size, split)
                  for split in ("val", "test") if split in parts}
    except (TrainingFailed, ValueError) as err:
        mlflow.set_tag("failure", str(err))
        raise TrainingFailed(f"{spec.name}: {err}" if isinstance(err, ValueError) else str(err)) from err
    mlflow.log_params({"phase2_start_epoch": result.phase2_start, "best_epoch": result.best_epoch,
                       "unfrozen_groups": ",".join(result.unfrozen) or "none"})
    tracking.log_figure(plots.training_curves(result.epochs, result.phase2_start,
                                              f"{spec.name} ({built.weights_used})"), "training_curves.png")
    mlflow.log_metrics({
        "train_seconds": result.seconds,
        **{f"phase{phase}_seconds": seconds for phase, seconds in result.phase_seconds.items()},
        "trainable_params": float(result.trainable_params),
        "total_params": float(model.count_params()),
        "inference_ms_per_image": _inference_ms(model, dataset, parts["val"], spec, size, train.batch_size),
        "n_val": float(len(parts["val"])),
    })
    _log_gradcam_examples(model, spec, dataset, parts["val"], size, scores["val"]["predicted"])
    if config.tracking.log_model:
        description = modelfile.describe(spec, dataset.class_names, size, built.weights_used, dataset.fingerprint,
                                         config.plugins)
        with tempfile.TemporaryDirectory() as workdir:
            mlflow.log_artifact(str(modelfile.save(model, Path(workdir) / "model.keras", description)), "model")
        tracking.log_json(description, "model/metadata.json")
    return {**scores, "epochs": len(result.epochs), "seconds": result.seconds}


def run_backbone(config, prepared: Prepared, name: str, weights: str, experiment: str) -> dict:
    """Train and evaluate one backbone inside its own MLflow run; prints one summary line."""
    built = build(config, prepared, name, weights)
    with mlflow.start_run(experiment_id=experiment, run_name=f"{name}-{built.weights_used}") as run:
        mlflow.set_tags({tracking.KIND_TAG: "bench", **tracking.provenance_tags()})
        try:
            outcome = train_and_log(config, prepared, built)
        except TrainingFailed:
            mlflow.end_run(status="FAILED")
            raise
        val = outcome["val"]
        print(f"== {name:<15} weights={built.weights_used:<8} val_accuracy={val['accuracy']:.4f} "
              f"val_macro_f1={val['macro_f1']:.4f} val_loss={val['loss']:.4f} "
              f"epochs={outcome['epochs']} time={outcome['seconds']:.1f}s run={run.info.run_id}", flush=True)
        return {"run_id": run.info.run_id, **val}


def run(config) -> tuple:
    """The whole benchmark: check everything that can fail early, train each backbone, build the table."""
    backbones.load_plugins(config.plugins)
    for name in config.model.backbones:
        backbones.get(name)  # unknown names fail here, listing the registered ones
    client = tracking.connect(config.tracking)
    weights = resolve_weights(config)
    prepared = prepare_data(config)
    experiment = tracking.experiment_id(client, prepared.name, config.tracking)
    counts = ", ".join(f"{split} {len(samples)}" for split, samples in prepared.parts.items())
    print(f"data set {prepared.name} ({prepared.path}): {len(prepared.dataset.class_names)} classes, {counts}; "
          f"fingerprint {prepared.dataset.fingerprint}; tracking {client.tracking_uri}", flush=True)
    for name in config.model.backbones:
        run_backbone(config, prepared, name, weights[name], experiment)
    table, paths = report.build(client, prepared.name, Path(config.tracking.results_dir))
    return table, paths, prepared.name

