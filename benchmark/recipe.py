"""The run recipe every command shares: the data prepared once for all backbones, the weights each
can have, the model factory (`build`), and one run's probe, two-phase training, evaluation and MLflow
logging (`train_and_log`) inside the active run. `bench` runs it per backbone and fold, `sweep` per
trial, `perf` to time it."""
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
import pandas as pd
import tensorflow as tf

import backbones

from . import (audit, feeds, gradcam, intake, metrics, mlflow_model, modelfile, pipeline, plots, probe, redact, stats,
               stopwatch, tracking)
from .model import (adapt_batchnorm, batchnorm_statistics, batchnorm_statistics_set_to, build_classifier,
                    set_batchnorm_momentum)
from .phantoms import phantom_dataset
from .trainer import TrainingFailed, train_two_phase


@dataclass
class Prepared:
    """The data every backbone of one benchmark shares."""

    dataset: intake.Dataset
    parts: dict[str, list[intake.Sample]]
    name: str  # experiment and results folder name
    path: str
    groups: dict[str, int] | None = None  # source -> duplicate group (data.group_duplicates)
    excluded: pd.DataFrame | None = None  # images left out as copies of data.exclude_copies_of (audit.copies_in)
    stages: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds of intake, duplicate groups


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
    return intake.data_set_name(config.data.path)


def prepare_data(config) -> Prepared:
    """Read and split the data every backbone of this benchmark shares; duplicates are grouped
    first, so no group straddles train and val."""
    data = config.data
    path = data_path(config)
    with stopwatch.running(stopwatch.Stopwatch()) as watch:
        with stopwatch.stage("intake"):
            dataset = intake.load_dataset(path, data.class_names, data.skip_bad)
        for problem in dataset.not_followed:
            print(f"skipped {problem}", file=sys.stderr)
        excluded = _copies_of_other_sets(dataset, data) if data.exclude_copies_of else None
        if excluded is not None:
            dataset = intake.without(dataset, set(excluded["source"]))
        with stopwatch.stage("duplicate groups"):
            groups = audit.duplicate_groups(dataset, data.duplicate_distance) if data.group_duplicates else None
    return Prepared(dataset, intake.split(dataset, data.val_fraction, config.seed, groups), dataset_name(config),
                    str(path), groups, excluded, watch.seconds)


def _copies_of_other_sets(dataset: intake.Dataset, data) -> pd.DataFrame:
    """Every image of `dataset` within data.exclude_distance bits of an image of a data set in
    data.exclude_copies_of (one row each, the closest copy; `other_data` names its set)."""
    found = []
    for other_path in data.exclude_copies_of:
        other = intake.load_dataset(other_path, skip_bad=data.skip_bad)
        found.append(audit.copies_in(dataset, other, data.exclude_distance).assign(other_data=str(other.root)))
    copies = pd.concat(found, ignore_index=True).drop_duplicates("source")
    print(f"== {len(copies)} image(s) of {dataset.name} left out: an exact or near copy (at most "
          f"{data.exclude_distance} bits apart) in {', '.join(data.exclude_copies_of)}", flush=True)
    return copies


def fold_data(config, prepared: Prepared) -> list[Prepared]:
    """One Prepared per cross-validation fold (data.folds), the same folds for every backbone."""
    parts = intake.folds(prepared.dataset, config.data.folds, config.seed, prepared.groups)
    return [dataclasses.replace(prepared, parts=fold) for fold in parts]


RUN_WEIGHTS = "run:"  # weights = "run:<MLflow run id>": the base of the model that run trained


def base_weights_of_run(run_id: str, backbone: str) -> str:
    """The base (backbone without head) of the model MLflow run `run_id` trained, as a weights file
    for `backbone`, exported once into the Keras cache: fine-tuning that starts where another data
    set's training ended (e.g. a brain-MRI backbone for a smaller brain-MRI set)."""
    target = backbones.weights.keras_cache_dir() / f"tumorbench-run-{run_id}-{backbone}-base.weights.h5"
    if not target.is_file():
        client = mlflow.tracking.MlflowClient()
        where = f"weights {RUN_WEIGHTS}{run_id} ({client.tracking_uri})"
        try:
            client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            raise backbones.WeightsUnavailable(f"{where}: no such run in this tracking store") from None
        try:
            path = tracking.run_model_file(client, run_id)
        except (mlflow.exceptions.MlflowException, OSError):
            raise backbones.WeightsUnavailable(
                f"{where}: the run has no model/model.keras (a cross-validation parent keeps its models "
                f"in its fold runs: name one of those)") from None
        model, description = modelfile.load(path)
        if description["backbone"] != backbone:
            raise backbones.WeightsUnavailable(f"{where}: that run trained {description['backbone']}, "
                                               f"not {backbone}")
        [base] = [layer for layer in model.layers if isinstance(layer, keras.Model)]
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.partial.weights.h5")
        base.save_weights(partial)
        partial.replace(target)
    return str(target)


def _backbone_weights(spec, weights: str) -> str:
    """What the registry loads for `weights`: for run:<id> the file holding that run's base."""
    if weights.startswith(RUN_WEIGHTS):
        return base_weights_of_run(weights.removeprefix(RUN_WEIGHTS), spec.name)
    return weights


def resolve_weights(config) -> dict[str, str]:
    """The weights source each backbone will use, checked before any training starts.

    When the requested source can't be had, the sources in `weights_fallback` (comma-separated,
    e.g. "imagenet,none") are tried in order, with a loud warning; the source actually used is
    what gets recorded.
    """
    chosen = {}
    for name in config.model.backbones:
        spec = backbones.get(name)
        candidates = [config.model.weights] + [w.strip() for w in config.model.weights_fallback.split(",") if w.strip()]
        errors = []
        for weights in candidates:
            try:
                backbones.weights.check(spec, _backbone_weights(spec, weights))
            except backbones.WeightsUnavailable as err:
                errors.append(err)
                continue
            chosen[name] = weights
            break
        else:
            raise errors[-1] if len(errors) == 1 else backbones.WeightsUnavailable(
                f"{name}: none of the weights {candidates} can be had:\n  " + "\n  ".join(map(str, errors)))
        if errors:
            print(f"\n!!! WARNING: {errors[0]}\n!!! {name} falls back to weights '{chosen[name]}'"
                  + ("; its results are NOT pretrained results." if chosen[name] == "none" else ".") + "\n",
                  file=sys.stderr)
    return chosen


def _augment_summary(augment) -> str:
    if not augment.enabled:
        return "off"
    intensity = "".join(f" {name}={getattr(augment, name)}" for name in ("contrast", "brightness", "sharpness")
                        if getattr(augment, name))
    return (f"rotation={augment.rotation_degrees}deg shift={augment.shift} shear={augment.shear} "
            f"zoom={augment.zoom} hflip={augment.horizontal_flip}{intensity}")


# What a run computes from a given config changes with the code now and then (2: the probe is fitted
# on the plain images, not augmented views; 3: BatchNormalization trained from scratch uses momentum
# 0.9). Cross-validation reuses only finished fold runs of the same recipe version, so a resumed CV
# never mixes folds of an older recipe into its means.
RECIPE_VERSION = 3


def _log_params(config, prepared: Prepared, spec, size: int, weights_used: str, train_seed: int) -> None:
    dataset = prepared.dataset
    train, model = config.train, config.model
    mlflow.log_params({
        "backbone": spec.name, "input_size": size, "weights": weights_used, "weights_requested": model.weights,
        "preprocessing": spec.preprocessing, "lr1": train.lr1, "lr2": train.lr2, "unfreeze": train.unfreeze,
        "schedule2": train.schedule2, "keep": train.keep,
        "epochs1": train.epochs1, "epochs2": train.epochs2, "batch_size": train.batch_size,
        "augmentation": _augment_summary(config.augment), "class_weights": train.class_weights,
        "cache_views": train.cache_views, "label_smoothing": train.label_smoothing,
        "mixup": train.mixup, "ema_epochs": train.ema_epochs,
        "batchnorm": "train" if batch_statistics(config, weights_used) else "frozen",
        "seed": config.seed, "train_seed": train_seed, "data_path": redact.mask(prepared.path),
        "data_fingerprint": dataset.fingerprint,
        "class_names": json.dumps(dataset.class_names), "class_to_index": json.dumps(dataset.class_to_index),
        "head_units": model.head_units, "dropout": model.dropout,
        "n_train": len(prepared.parts["train"]), "n_val": len(prepared.parts["val"]),
        "n_test": len(prepared.parts.get("test", [])), "group_duplicates": config.data.group_duplicates,
        "duplicate_distance": config.data.duplicate_distance, "recipe_version": RECIPE_VERSION,
        tracking.SCORED_ON: intake.scored_on([prepared.parts["val"], prepared.parts.get("test", [])]),
    })
    mlflow.log_text(config.to_toml(), "config.toml")
    log_excluded(prepared)
    tracking.log_dataset_inputs(prepared.name, prepared.path, {
        split: (f"{dataset.fingerprint}-{intake.samples_hash(samples)[:8]}", len(samples))
        for split, samples in prepared.parts.items()})


def log_excluded(prepared: Prepared) -> None:
    """How many images data.exclude_copies_of left out, and which (excluded_copies.csv)."""
    if prepared.excluded is not None:
        mlflow.log_param("excluded_copies", len(prepared.excluded))
        mlflow.log_text(prepared.excluded.to_csv(index=False), "excluded_copies.csv")


def _predict(model, dataset, samples, spec, size, batch_size) -> np.ndarray:
    return metrics.class_probabilities(
        model.predict(pipeline.make_dataset(dataset, samples, spec.preprocess, size, batch_size), verbose=0))


def _choose_threshold(dataset, samples, probabilities, evaluate) -> float | None:
    """Two classes with a target sensitivity: the threshold reaching it on validation (never test)."""
    if len(dataset.class_names) != 2 or evaluate.target_sensitivity <= 0:
        return None
    return stats.threshold_for_sensitivity([s.label for s in samples], probabilities[:, 1],
                                           evaluate.target_sensitivity)


def probability_columns(class_names) -> list[str]:
    """The per-class probability columns of a predictions frame, in class-index order."""
    return [f"prob_{name}" for name in class_names]


def predictions_frame(dataset, samples, probabilities) -> pd.DataFrame:
    """One row per image: source, true label, probability per class (what the paired tests need)."""
    frame = pd.DataFrame({"source": [s.source for s in samples], "label": [s.label for s in samples]})
    for i, column in enumerate(probability_columns(dataset.class_names)):
        frame[column] = probabilities[:, i]
    return frame


def score_split(dataset, samples, probabilities, spec, split_name: str, evaluate, threshold) -> dict:
    """Metrics, figures, report and per-image predictions of one split, logged to the active run."""
    y_true = [s.label for s in samples]
    result = metrics.compute(y_true, probabilities, dataset.class_names, evaluate.calibration_bins)
    if threshold is not None:
        result.update(metrics.at_threshold(y_true, probabilities, threshold))
    mlflow.log_metrics(metrics.flatten(result, split_name))
    title = f"{spec.name} {split_name}"
    tracking.log_figure(plots.confusion_matrix(result["confusion_matrix"], dataset.class_names, title),
                        f"confusion_matrix_{split_name}.png")
    tracking.log_figure(plots.reliability_diagram(result["reliability"], result["ece"], title),
                        f"reliability_{split_name}.png")
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


def _pooled_features(built: Built, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, F) pooled features of the base, one plain (unaugmented) pass."""
    extractor = keras.Model(built.base.inputs, keras.layers.GlobalAveragePooling2D()(built.base.output))
    return np.concatenate([np.asarray(extractor.predict_on_batch(built.spec.preprocess(batch)))
                           for _, _, batch in pipeline.view_batches(images, None, 1, 0, batch_size)])


def run_probe(config, prepared: Prepared, built: Built, score_test: bool = True) -> dict:
    """The linear-probe baseline on the frozen base (before any fine-tuning), logged as probe_<split>_*
    metrics with its per-image predictions; with train.head_init = "probe" it also sets the linear head
    to it. {} for a base trained from scratch, or with evaluate.probe off and no probe head wanted.

    The baseline always sees the network as loaded (ImageNet BatchNormalization statistics). When
    the model factory adapted those statistics (train.batchnorm = "train"), the head starts instead
    at a probe of the adapted features it will be fine-tuned on, logged as probe_adapted_val_*."""
    if built.from_scratch or not (config.evaluate.probe or config.train.head_init == "probe"):
        return {}
    dataset, parts, batch_size = prepared.dataset, prepared.parts, config.train.batch_size
    labels = [s.label for s in parts["train"]]

    def features(split):
        return _pooled_features(built, pipeline.decoded_images(dataset, parts[split], built.size), batch_size)

    def train_and_val():
        if isinstance(built.feed, feeds.Cached):  # the cache phase 1 trains on; its view 0 is the plain images
            train_views, val_features = built.feed.pooled(built.base, built.spec)
            return train_views[:1], val_features
        return features("train")[None], features("val")

    splits = ["val"] + (["test"] if parts.get("test") and score_test else [])
    with batchnorm_statistics_set_to(built.base, built.loaded_statistics):
        if built.loaded_statistics is None:
            train_features, val_features = train_and_val()
        else:  # the cache holds the adapted features
            train_features, val_features = features("train")[None], features("val")
        inputs = {"val": val_features, **{split: features(split) for split in splits if split != "val"}}
    fitted = probe.fit(train_features, labels, config.seed)
    mlflow.log_metric("probe_C", probe.regularisation(fitted))
    scores = {}
    for split in splits:
        probabilities = fitted.predict_proba(np.asarray(inputs[split], dtype=np.float32))
        result = metrics.compute([s.label for s in parts[split]], probabilities, dataset.class_names,
                                 config.evaluate.calibration_bins)
        mlflow.log_metrics(metrics.flatten(result, f"probe_{split}"))
        mlflow.log_text(predictions_frame(dataset, parts[split], probabilities).to_csv(index=False),
                        f"predictions_probe_{split}.csv")
        scores[split] = result
    if config.train.head_init == "probe":  # LP-FT: the linear head starts at the probe
        if built.loaded_statistics is not None:
            adapted_train, adapted_val = train_and_val()
            fitted = probe.fit(adapted_train, labels, config.seed)
            result = metrics.compute([s.label for s in parts["val"]], fitted.predict_proba(adapted_val),
                                     dataset.class_names, config.evaluate.calibration_bins)
            mlflow.log_metrics({f"probe_adapted_val_{key}": result[key] for key in ("accuracy", "macro_f1", "loss")})
        built.model.get_layer("head_output").set_weights(list(probe.head_weights(fitted)))
    return scores


# Images the inference timing uses: enough for a stable per-image figure, where two passes over a
# 1,142-image validation split cost about 30 s of a 15-minute run on 2 cores.
INFERENCE_TIMING_IMAGES = 256


def _inference_ms(model, dataset, samples, spec, size, batch_size) -> float:
    """Wall time per image of a second, warm pass over (up to INFERENCE_TIMING_IMAGES of) the
    validation images."""
    samples = samples[:INFERENCE_TIMING_IMAGES]
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
    # BatchNormalization statistics as loaded, kept when the factory adapted them (train.batchnorm)
    loaded_statistics: dict | None = None
    seed: int = 0  # its training seed (training_seed)
    stages: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds of building it, decoding included

    @property
    def from_scratch(self) -> bool:
        """Random init: every group and BatchNormalization train from the start (no probe)."""
        return self.weights_used == "none"


def set_precision(train_config) -> str:
    """mixed_float16 when asked, or on `auto` when a GPU is present; float32 otherwise."""
    gpu = bool(tf.config.list_physical_devices("GPU"))
    mixed = train_config.mixed_precision == "on" or (train_config.mixed_precision == "auto" and gpu)
    policy = "mixed_float16" if mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def adapts_batchnorm(config, weights_used: str) -> bool:
    """A pretrained base whose BatchNormalization trains: its statistics are adapted first (AdaBN)."""
    return weights_used != "none" and config.train.batchnorm == "train"


def batch_statistics(config, weights_used: str) -> bool:
    """Whether unfrozen BatchNormalization layers normalise with batch statistics while training."""
    return weights_used == "none" or adapts_batchnorm(config, weights_used)


def training_seed(config, member: int = 0) -> int:
    """The seed of seed-ensemble member `member` (0-based; train.members): initialisation, shuffling
    and augmentation. Member 0 trains from `seed` itself, as a run without members does."""
    return config.seed + member


def make_feed(config, prepared: Prepared, spec, size: int, weights_used: str, seed: int):
    """Cached frozen-layer outputs (train.cache_views > 0) or the full model streamed every epoch,
    augmented and shuffled from `seed`."""
    dataset, parts, train = prepared.dataset, prepared.parts, config.train
    n_classes = len(dataset.class_names)
    train_labels = [s.label for s in parts["train"]]
    weights = pipeline.class_weights(train_labels, n_classes) if train.class_weights else None
    train_ds = pipeline.make_dataset(dataset, parts["train"], spec.preprocess, size, train.batch_size,
                                     training=True, augment=config.augment, weights=weights, seed=seed,
                                     mix=train.mixup)
    streamed = feeds.Streamed(train_ds, pipeline.make_dataset(dataset, parts["val"], spec.preprocess, size,
                                                              train.batch_size))
    if train.cache_views <= 0:
        return streamed
    key = {"backbone": spec.name, "size": size, "weights": weights_used, "augment": dataclasses.asdict(config.augment),
           "fingerprint": dataset.fingerprint, "train": intake.samples_hash(parts["train"]),
           "val": intake.samples_hash(parts["val"]), "policy": keras.mixed_precision.global_policy().name,
           "batchnorm": "adapted" if adapts_batchnorm(config, weights_used) else "as loaded"}
    return feeds.Cached(
        pipeline.decoded_images(dataset, parts["train"], size), pipeline.label_array(parts["train"], n_classes),
        None if weights is None else weights[train_labels].astype("float32"),
        pipeline.decoded_images(dataset, parts["val"], size), pipeline.label_array(parts["val"], n_classes),
        spec.preprocess, config.augment, train.cache_views, seed, train.batch_size, key,
        plan_unfreeze=train.unfreeze if train.epochs2 > 0 else 0, stream=streamed,
        batch_statistics=batch_statistics(config, weights_used), mix=train.mixup, n_classes=n_classes,
        probe_head=train.head_init == "probe" and weights_used != "none")


# Moving-statistics momentum of BatchNormalization trained from scratch. Keras' 0.99 needs hundreds of
# steps to forget its initial statistics; a 200-image set gives 13 steps an epoch, so at 0.99 the
# statistics used for validation lagged the weights and an efficientnetb0 from scratch scored as a
# constant guess in inference mode while learning in training mode (yes/no, 2026-12-04).
SCRATCH_BATCHNORM_MOMENTUM = 0.9


def input_size(config, spec) -> int:
    """The configured input size, or the backbone's own (model.input_size = 0)."""
    return config.model.input_size or spec.input_size


def build(config, prepared: Prepared, name: str, weights: str, member: int = 0) -> Built:
    """The model factory: a fresh Keras session seeded for seed-ensemble member `member`, base +
    head, and the feed for it. With train.batchnorm = "train" the pretrained base's
    BatchNormalization statistics are first adapted to the plain training images (AdaBN), so the
    probe, the head and fine-tuning share them."""
    with stopwatch.running(stopwatch.Stopwatch()) as watch, stopwatch.stage("build"):
        built = _build(config, prepared, backbones.get(name), weights, member)
    built.stages = watch.seconds
    return built


def _build(config, prepared: Prepared, spec, weights: str, member: int) -> Built:
    size = input_size(config, spec)
    keras.backend.clear_session()
    seed = training_seed(config, member)
    keras.utils.set_random_seed(seed)
    set_precision(config.train)
    base, weights_used = backbones.build_base(spec, size, _backbone_weights(spec, weights))
    if weights.startswith(RUN_WEIGHTS):
        weights_used = weights  # the run, not the cache file's name, says where the weights came from
    if weights_used == "none":
        set_batchnorm_momentum(base, SCRATCH_BATCHNORM_MOMENTUM)
    loaded = None
    if adapts_batchnorm(config, weights_used):
        loaded = batchnorm_statistics(base)
        images = pipeline.decoded_images(prepared.dataset, prepared.parts["train"], size)
        batches = pipeline.view_batches(images, None, 1, 0, config.train.batch_size)
        adapt_batchnorm(base, spec, config.train.unfreeze, (spec.preprocess(batch) for _, _, batch in batches))
    model = build_classifier(base, size, len(prepared.dataset.class_names), config.model.head_units,
                             config.model.dropout, batch_statistics=batch_statistics(config, weights_used))
    return Built(spec, size, base, model, weights_used, make_feed(config, prepared, spec, size, weights_used, seed),
                 loaded, seed)


def train_and_log(config, prepared: Prepared, built: Built, callbacks: list = (), score_key: str = "",
                  trial: bool = False) -> dict:
    """Inside the active MLflow run: params, both phases, evaluation, figures, timings, the model.

    `callbacks` run on every epoch before the MLflow epoch logger; `score_key` (e.g. macro_f1)
    adds that validation metric to every epoch. A sweep `trial` only scores validation, from the
    outputs its best epoch already had (on cached inputs when the feed caches): no test, no Grad-CAM,
    no inference timing, which at 224 px on a CPU cost more than a head-only trial's training, and
    no test-time views (evaluate.tta: tta_<split>). Returns {split: metrics, ...}.
    """
    with stopwatch.running(stopwatch.Stopwatch()) as watch:
        outcome = _train_and_log(config, prepared, built, callbacks, score_key, trial)
    # Where the run's time went, from reading the data (shared by the backbones of one command) to
    # logging the model: stage_<name>_seconds.
    mlflow.log_metrics(stopwatch.as_metrics({**prepared.stages, **built.stages, **watch.seconds}))
    return outcome


def _train_and_log(config, prepared: Prepared, built: Built, callbacks, score_key: str, trial: bool) -> dict:
    spec, size, model, train = built.spec, built.size, built.model, config.train
    dataset, parts = prepared.dataset, prepared.parts
    n_classes = len(dataset.class_names)
    score = (score_key, [s.label for s in parts["val"]], dataset.class_names) if score_key else None
    _log_params(config, prepared, spec, size, built.weights_used, built.seed)
    head_ready = train.head_init == "probe" and not built.from_scratch
    with stopwatch.stage("probe"):
        probe_scores = {} if trial and not head_ready else run_probe(config, prepared, built, score_test=not trial)
    try:
        with stopwatch.stage("training"):
            result = train_two_phase(model, built.base, spec, built.feed, train, n_classes,
                                     callbacks=[*callbacks, tracking.EpochLogger()], score=score,
                                     from_scratch=built.from_scratch, head_ready=head_ready)
        # Model selection (best epoch, threshold) saw validation only; test is scored once, here.
        splits = ["val"] if trial else [split for split in ("val", "test") if parts.get(split)]
        reuse = trial and result.best_val_outputs is not None  # a trial's splits are val alone
        with stopwatch.stage("evaluation"):
            probabilities = {split: metrics.class_probabilities(result.best_val_outputs) if reuse
                             else _predict(model, dataset, parts[split], spec, size, train.batch_size)
                             for split in splits}
            threshold = _choose_threshold(dataset, parts["val"], probabilities["val"], config.evaluate)
            scores = {split: score_split(dataset, parts[split], probabilities[split], spec, split, config.evaluate,
                                         threshold) for split in splits}
        predictions = {split: predictions_frame(dataset, parts[split], probabilities[split]) for split in splits}
        with stopwatch.stage("tta"):
            scores, predictions = _score_tta(config, prepared, built, probabilities, scores, predictions, trial)
        for split, frame in predictions.items():
            mlflow.log_text(frame.to_csv(index=False), f"predictions_{split}.csv")
    except (TrainingFailed, ValueError) as err:
        mlflow.set_tag("failure", str(err))
        raise TrainingFailed(f"{spec.name}: {err}" if isinstance(err, ValueError) else str(err)) from err
    mlflow.log_params({"phase2_start_epoch": result.phase2_start, "best_epoch": result.best_epoch,
                       "unfrozen_groups": ",".join(result.unfrozen) or "none"})
    tracking.log_figure(plots.training_curves(result.epochs, result.phase2_start,
                                              f"{spec.name} ({built.weights_used})"), "training_curves.png")
    costs = {
        "train_seconds": result.seconds,
        **{f"phase{phase}_seconds": seconds for phase, seconds in result.phase_seconds.items()},
        "trainable_params": float(result.trainable_params),
        "total_params": float(model.count_params()),
    }
    if not trial:
        with stopwatch.stage("inference timing"):
            costs["inference_ms_per_image"] = _inference_ms(model, dataset, parts["val"], spec, size, train.batch_size)
        with stopwatch.stage("gradcam"):
            _log_gradcam_examples(model, spec, dataset, parts["val"], size, scores["val"]["predicted"])
    mlflow.log_metrics({**costs, "n_val": float(len(parts["val"]))})
    if config.tracking.log_model:
        with stopwatch.stage("model logging"):
            _log_model(config, prepared, built)
    return {**scores, **{f"probe_{split}": result for split, result in probe_scores.items()},
            "predictions": predictions, "costs": costs, "epochs": len(result.epochs), "seconds": result.seconds}


def _score_tta(config, prepared: Prepared, built: Built, plain: dict, scores: dict, predictions: dict,
               trial: bool) -> tuple[dict, dict]:
    """scores and predictions with tta_<split> added (evaluate.tta; never in a sweep trial): each
    image and its test-time views, probabilities averaged, as `predict --tta` scores them. The
    plain view's are the split's `plain` probabilities, already computed."""
    if not config.evaluate.tta or trial:
        return scores, predictions
    dataset, parts = prepared.dataset, prepared.parts
    for split, probabilities in plain.items():
        other_views = pipeline.view_probabilities(
            [(built.model, built.spec.preprocess)], pipeline.decoded_images(dataset, parts[split], built.size),
            config.train.batch_size, range(1, pipeline.TTA_VIEW_COUNT))
        averaged = np.mean([probabilities, *other_views], axis=0)
        scores[f"tta_{split}"] = metrics.compute([s.label for s in parts[split]], averaged,
                                                 dataset.class_names, config.evaluate.calibration_bins)
        mlflow.log_metrics(metrics.flatten(scores[f"tta_{split}"], f"tta_{split}"))
        predictions[f"tta_{split}"] = predictions_frame(dataset, parts[split], averaged)
    return scores, predictions


def _log_model(config, prepared: Prepared, built: Built) -> None:
    """The run's model file and MLflow model (tagged with its URI) and its description."""
    spec, size, dataset = built.spec, built.size, prepared.dataset
    description = modelfile.describe(spec, dataset.class_names, size, built.weights_used, dataset.fingerprint,
                                     config.plugins)
    with tempfile.TemporaryDirectory() as workdir:
        saved = modelfile.save(built.model, Path(workdir) / "model.keras", description)
        mlflow.log_artifact(str(saved), "model")
        example = np.asarray(pipeline.decoded_images(dataset, prepared.parts["val"][:2], size))
        logged = mlflow_model.log([saved], description, example)
    mlflow.set_tag(tracking.MODEL_URI_TAG, logged.model_uri)
    tracking.log_json(description, "model/metadata.json")
