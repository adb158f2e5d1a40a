"""`bench`: every chosen backbone through the same two-phase recipe, one MLflow run each, then the table."""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf

import backbones

from . import (audit, feeds, gradcam, intake, metrics, mlflow_model, modelfile, pipeline, plots, probe, report,
               stats, tracking)
from .config import fold_recipe
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
    groups: dict[str, int] | None = None  # source -> duplicate group (data.group_duplicates)


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
    dataset = intake.load_dataset(path, data.class_names, data.skip_bad)
    name = dataset_name(config)
    groups = audit.duplicate_groups(dataset, data.duplicate_distance) if data.group_duplicates else None
    return Prepared(dataset, intake.split(dataset, data.val_fraction, config.seed, groups), name, str(path), groups)


def fold_data(config, prepared: Prepared) -> list[Prepared]:
    """One Prepared per cross-validation fold (data.folds), the same folds for every backbone."""
    parts = intake.folds(prepared.dataset, config.data.folds, config.seed, prepared.groups)
    return [dataclasses.replace(prepared, parts=fold) for fold in parts]


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
                backbones.weights.check(spec, weights)
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
    return (f"rotation={augment.rotation_degrees}deg shift={augment.shift} shear={augment.shear} "
            f"zoom={augment.zoom} hflip={augment.horizontal_flip}")


# What a run computes from a given config changes with the code now and then (2: the probe is fitted
# on the plain images, not augmented views). Cross-validation reuses only finished fold runs of the
# same recipe version, so a resumed CV never mixes folds of an older recipe into its means.
RECIPE_VERSION = 2


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
        "n_test": len(prepared.parts.get("test", [])), "group_duplicates": config.data.group_duplicates,
        "duplicate_distance": config.data.duplicate_distance, "recipe_version": RECIPE_VERSION,
    })
    mlflow.log_text(config.to_toml(), "config.toml")
    tracking.log_dataset_inputs(prepared.name, prepared.path, {
        split: (f"{dataset.fingerprint}-{intake.samples_hash(samples)[:8]}", len(samples))
        for split, samples in prepared.parts.items()})


def _predict(model, dataset, samples, spec, size, batch_size) -> np.ndarray:
    return metrics.class_probabilities(
        model.predict(pipeline.make_dataset(dataset, samples, spec.preprocess, size, batch_size), verbose=0))


def _choose_threshold(dataset, samples, probabilities, evaluate) -> float | None:
    """Two classes with a target sensitivity: the threshold reaching it on validation (never test)."""
    if len(dataset.class_names) != 2 or evaluate.target_sensitivity <= 0:
        return None
    return stats.threshold_for_sensitivity([s.label for s in samples], probabilities[:, 1],
                                           evaluate.target_sensitivity)


def predictions_frame(dataset, samples, probabilities) -> pd.DataFrame:
    """One row per image: source, true label, probability per class (what the paired tests need)."""
    frame = pd.DataFrame({"source": [s.source for s in samples], "label": [s.label for s in samples]})
    for i, name in enumerate(dataset.class_names):
        frame[f"prob_{name}"] = probabilities[:, i]
    return frame


def _score(dataset, samples, probabilities, spec, split_name: str, evaluate, threshold) -> dict:
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
    to it. {} for a base trained from scratch, or with evaluate.probe off and no probe head wanted."""
    if built.from_scratch or not (config.evaluate.probe or config.train.head_init == "probe"):
        return {}
    dataset, parts, batch_size = prepared.dataset, prepared.parts, config.train.batch_size

    def features(split):
        return _pooled_features(built, pipeline.decoded_images(dataset, parts[split], built.size), batch_size)

    if isinstance(built.feed, feeds.Cached):  # the cache phase 1 trains on; its view 0 is the plain images
        train_views, val_features = built.feed.pooled(built.base, built.spec)
    else:
        train_views, val_features = features("train")[None], features("val")
    fitted = probe.fit(train_views[:1], [s.label for s in parts["train"]], config.seed)
    mlflow.log_metric("probe_C", probe.regularisation(fitted))
    if config.train.head_init == "probe":  # LP-FT: the linear head starts at the probe
        built.model.get_layer("head_output").set_weights(list(probe.head_weights(fitted)))
    scores = {}
    test = [("test", features("test"))] if parts.get("test") and score_test else []
    for split, x in [("val", val_features)] + test:
        probabilities = fitted.predict_proba(np.asarray(x, dtype=np.float32))
        result = metrics.compute([s.label for s in parts[split]], probabilities, dataset.class_names,
                                 config.evaluate.calibration_bins)
        mlflow.log_metrics(metrics.flatten(result, f"probe_{split}"))
        mlflow.log_text(predictions_frame(dataset, parts[split], probabilities).to_csv(index=False),
                        f"predictions_probe_{split}.csv")
        scores[split] = result
    return scores


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


def make_feed(config, prepared: Prepared, spec, size: int, weights_used: str):
    """Cached frozen-layer outputs (train.cache_views > 0) or the full model streamed every epoch."""
    dataset, parts, train = prepared.dataset, prepared.parts, config.train
    n_classes = len(dataset.class_names)
    train_labels = [s.label for s in parts["train"]]
    weights = pipeline.class_weights(train_labels, n_classes) if train.class_weights else None
    train_ds = pipeline.make_dataset(dataset, parts["train"], spec.preprocess, size, train.batch_size,
                                     training=True, augment=config.augment, weights=weights, seed=config.seed)
    streamed = feeds.Streamed(train_ds, pipeline.make_dataset(dataset, parts["val"], spec.preprocess, size,
                                                              train.batch_size))
    if train.cache_views <= 0:
        return streamed
    key = {"backbone": spec.name, "size": size, "weights": weights_used, "augment": dataclasses.asdict(config.augment),
           "fingerprint": dataset.fingerprint, "train": intake.samples_hash(parts["train"]),
           "val": intake.samples_hash(parts["val"]), "policy": keras.mixed_precision.global_policy().name}
    return feeds.Cached(
        pipeline.decoded_images(dataset, parts["train"], size), pipeline.label_array(parts["train"], n_classes),
        None if weights is None else weights[train_labels].astype("float32"),
        pipeline.decoded_images(dataset, parts["val"], size), pipeline.label_array(parts["val"], n_classes),
        spec.preprocess, config.augment, train.cache_views, config.seed, train.batch_size, key,
        plan_unfreeze=train.unfreeze if train.epochs2 > 0 else 0, stream=streamed)


def build(config, prepared: Prepared, name: str, weights: str) -> Built:
    """The model factory: a fresh Keras session, seeded, base + head, and the feed for it."""
    spec = backbones.get(name)
    size = config.model.input_size or spec.input_size
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    set_precision(config.train)
    base, weights_used = backbones.build_base(spec, size, weights)
    model = build_classifier(base, size, len(prepared.dataset.class_names), config.model.head_units,
                             config.model.dropout, from_scratch=weights_used == "none")
    return Built(spec, size, base, model, weights_used, make_feed(config, prepared, spec, size, weights_used))


def train_and_log(config, prepared: Prepared, built: Built, callbacks: list = (), score_key: str = "",
                  trial: bool = False) -> dict:
    """Inside the active MLflow run: params, both phases, evaluation, figures, timings, the model.

    `callbacks` run on every epoch before the MLflow epoch logger; `score_key` (e.g. macro_f1)
    adds that validation metric to every epoch. A sweep `trial` only scores validation, from the
    outputs its best epoch already had (on cached inputs when the feed caches): no test, no Grad-CAM,
    no inference timing, which at 224 px on a CPU cost more than a head-only trial's training.
    Returns {split: metrics, ...}.
    """
    spec, size, model, train = built.spec, built.size, built.model, config.train
    dataset, parts = prepared.dataset, prepared.parts
    n_classes = len(dataset.class_names)
    score = (score_key, [s.label for s in parts["val"]], dataset.class_names) if score_key else None
    _log_params(config, prepared, spec, size, built.weights_used)
    head_ready = train.head_init == "probe" and not built.from_scratch
    probe_scores = {} if trial and not head_ready else run_probe(config, prepared, built, score_test=not trial)
    try:
        result = train_two_phase(model, built.base, spec, built.feed, train, n_classes,
                                 callbacks=[*callbacks, tracking.EpochLogger()], score=score,
                                 from_scratch=built.from_scratch, head_ready=head_ready)
        # Model selection (best epoch, threshold) saw validation only; test is scored once, here.
        splits = ["val"] if trial else [split for split in ("val", "test") if parts.get(split)]
        reuse = trial and result.best_val_outputs is not None  # a trial's splits are val alone
        probabilities = {split: metrics.class_probabilities(result.best_val_outputs) if reuse
                         else _predict(model, dataset, parts[split], spec, size, train.batch_size) for split in splits}
        threshold = _choose_threshold(dataset, parts["val"], probabilities["val"], config.evaluate)
        scores = {split: _score(dataset, parts[split], probabilities[split], spec, split, config.evaluate, threshold)
                  for split in splits}
        predictions = {split: predictions_frame(dataset, parts[split], probabilities[split]) for split in splits}
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
        costs["inference_ms_per_image"] = _inference_ms(model, dataset, parts["val"], spec, size, train.batch_size)
        _log_gradcam_examples(model, spec, dataset, parts["val"], size, scores["val"]["predicted"])
    mlflow.log_metrics({**costs, "n_val": float(len(parts["val"]))})
    if config.tracking.log_model:
        description = modelfile.describe(spec, dataset.class_names, size, built.weights_used, dataset.fingerprint,
                                         config.plugins)
        with tempfile.TemporaryDirectory() as workdir:
            saved = modelfile.save(model, Path(workdir) / "model.keras", description)
            mlflow.log_artifact(str(saved), "model")
            example = np.asarray(pipeline.decoded_images(dataset, parts["val"][:2], size))
            logged = mlflow_model.log([saved], description, example)
        mlflow.set_tag(tracking.MODEL_URI_TAG, logged.model_uri)
        tracking.log_json(description, "model/metadata.json")
    return {**scores, **{f"probe_{split}": result for split, result in probe_scores.items()},
            "predictions": predictions, "costs": costs, "epochs": len(result.epochs), "seconds": result.seconds}


def run_backbone(config, prepared: Prepared, name: str, weights: str, experiment: str,
                 fold: int | None = None) -> dict:
    """Train and evaluate one backbone inside its own MLflow run (a child run when it is one
    cross-validation fold); prints one summary line."""
    built = build(config, prepared, name, weights)
    label = f"{name}-{built.weights_used}" + ("" if fold is None else f"-fold{fold + 1}")
    with mlflow.start_run(experiment_id=experiment, run_name=tracking.run_name(label),
                          nested=fold is not None) as run:
        tags = {tracking.KIND_TAG: "bench" if fold is None else "bench-fold", **tracking.provenance_tags()}
        mlflow.set_tags(tags if fold is None else {**tags, "tumorbench.fold": str(fold + 1)})
        try:
            outcome = train_and_log(config, prepared, built)
        except TrainingFailed:
            mlflow.end_run(status="FAILED")
            raise
        val = outcome["val"]
        probe_text = (f" (probe {outcome['probe_val']['accuracy']:.4f})" if "probe_val" in outcome else "")
        print(f"== {label:<24} val_accuracy={val['accuracy']:.4f}{probe_text} val_macro_f1={val['macro_f1']:.4f} "
              f"val_loss={val['loss']:.4f} epochs={outcome['epochs']} time={outcome['seconds']:.1f}s "
              f"run={run.info.run_id}", flush=True)
        return {**outcome, "run_id": run.info.run_id, "weights_used": built.weights_used}


def finished_fold(config, prepared: Prepared, name: str, experiment: str, fold: int) -> dict | None:
    """The outcome of fold `fold` if MLflow already holds it: a finished fold run of this backbone on
    the same data whose saved config equals this one (so an interrupted cross-validation resumes
    where it stopped instead of training finished folds again) by the same RECIPE_VERSION; None otherwise."""
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs(
        [experiment], f"tags.`{tracking.KIND_TAG}` = 'bench-fold' and tags.`tumorbench.fold` = '{fold + 1}' and "
        f"params.backbone = '{name}' and params.data_fingerprint = '{prepared.dataset.fingerprint}' and "
        f"params.recipe_version = '{RECIPE_VERSION}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"])
    wanted = fold_recipe(config.to_toml())
    dataset = prepared.dataset
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                saved = Path(client.download_artifacts(run.info.run_id, "config.toml", tmp)).read_text()
                if fold_recipe(saved) != wanted:
                    continue
                outcome = {"val": json.loads(Path(client.download_artifacts(
                    run.info.run_id, "metrics_val.json", tmp)).read_text())}
                predictions = pd.read_csv(client.download_artifacts(run.info.run_id, "predictions_val.csv", tmp))
                probe_files = [a.path for a in client.list_artifacts(run.info.run_id)
                               if a.path.startswith("predictions_probe_")]
                for artifact in probe_files:
                    frame = pd.read_csv(client.download_artifacts(run.info.run_id, artifact, tmp))
                    split = artifact.removeprefix("predictions_probe_").removesuffix(".csv")
                    outcome[f"probe_{split}"] = metrics.compute(
                        frame["label"], frame[[f"prob_{c}" for c in dataset.class_names]].to_numpy(),
                        dataset.class_names, config.evaluate.calibration_bins)
            except (OSError, ValueError, tomllib.TOMLDecodeError, mlflow.exceptions.MlflowException):
                continue
        m = run.data.metrics
        costs = {key: m[key] for key in ("train_seconds", "phase1_seconds", "phase2_seconds", "trainable_params",
                                         "total_params", "inference_ms_per_image") if key in m}
        print(f"== {name} fold {fold + 1}: already finished in run {run.info.run_id} with this config; reused",
              flush=True)
        return {**outcome, "predictions": {"val": predictions}, "costs": costs, "seconds": m.get("train_seconds", 0.0),
                "run_id": run.info.run_id, "weights_used": run.data.params["weights"], "reused": True}
    return None


def _log_ensemble(prepared: Prepared, fold_run_ids: list[str]) -> None:
    """The fold models as one MLflow model on the cross-validation parent run: an ensemble that
    averages their probabilities (what `predict` does with the parent's run id)."""
    client = mlflow.tracking.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(client.download_artifacts(run_id, "model/model.keras", f"{tmp}/{i}"))
                 for i, run_id in enumerate(fold_run_ids)]
        description = modelfile.read_description(files[0])
        example = np.asarray(pipeline.decoded_images(prepared.dataset, prepared.parts["val"][:2],
                                                     description["input_size"]))
        logged = mlflow_model.log(files, description, example, name="ensemble")
    mlflow.set_tag(tracking.MODEL_URI_TAG, logged.model_uri)


def run_cross_validated(config, folds: list[Prepared], name: str, weights: str, experiment: str) -> dict:
    """A parent MLflow run per backbone with a child run per fold; the parent holds each metric's
    mean and 95% CI over folds, and the out-of-fold predictions (every image scored exactly once).
    Folds already finished with the same config are reused (and moved under this parent). With
    data.fold_limit = N only the first N folds are trained and scored (the run name says N of k)."""
    first = folds[0]
    spec = backbones.get(name)
    scored = folds[:config.data.fold_limit or len(folds)]
    partial = f"-{len(scored)}of{len(folds)}" if len(scored) < len(folds) else ""
    with mlflow.start_run(experiment_id=experiment,
                          run_name=tracking.run_name(f"{name}-{weights}-cv{len(folds)}{partial}")) as parent:
        mlflow.set_tags({tracking.KIND_TAG: "bench-cv", **tracking.provenance_tags()})
        outcomes = []
        for i, fold in enumerate(scored):
            outcome = finished_fold(config, fold, name, experiment, i)
            if outcome is None:
                outcome = run_backbone(config, fold, name, weights, experiment, fold=i)
            else:
                mlflow.tracking.MlflowClient().set_tag(outcome["run_id"], "mlflow.parentRunId", parent.info.run_id)
            outcomes.append(outcome)
        mlflow.log_params({"backbone": name, "weights": outcomes[0]["weights_used"], "weights_requested": weights,
                           "folds": len(folds), "folds_scored": len(scored), "seed": config.seed,
                           "data_path": first.path,
                           "data_fingerprint": first.dataset.fingerprint,
                           "class_names": json.dumps(first.dataset.class_names),
                           "group_duplicates": config.data.group_duplicates,
                           "n_images": sum(len(fold.parts["val"]) for fold in scored)})
        mlflow.log_text(config.to_toml(), "config.toml")
        summary = {}
        for split in ("val", "test", "probe_val", "probe_test"):
            per_fold = [metrics.flatten(outcome[split], split) for outcome in outcomes if split in outcome]
            for key in sorted(set().union(*per_fold)) if per_fold else []:
                mean, low, high = stats.mean_ci([scores.get(key, np.nan) for scores in per_fold])
                summary.update({f"{key}_mean": mean, f"{key}_ci_low": low, f"{key}_ci_high": high})
        mlflow.log_metrics({k: v for k, v in summary.items() if np.isfinite(v)})
        costs = {key: float(np.nanmean([outcome["costs"].get(key, np.nan) for outcome in outcomes]))
                 for key in outcomes[0]["costs"]}
        mlflow.log_metrics({**costs, "train_seconds": float(sum(outcome["seconds"] for outcome in outcomes))})
        out_of_fold = pd.concat([outcome["predictions"]["val"].assign(fold=i + 1)
                                 for i, outcome in enumerate(outcomes)], ignore_index=True)
        mlflow.log_text(out_of_fold.to_csv(index=False), "predictions_oof.csv")
        probabilities = out_of_fold[[f"prob_{c}" for c in first.dataset.class_names]].to_numpy()
        samples = [intake.Sample(source, int(label)) for source, label in zip(out_of_fold.source, out_of_fold.label)]
        _score(first.dataset, samples, probabilities, spec, "oof", config.evaluate, None)
        if config.tracking.log_model:
            _log_ensemble(first, [outcome["run_id"] for outcome in outcomes])
        print(f"== {name} {len(folds)}-fold{f' ({len(scored)} folds scored)' if partial else ''}: val_accuracy {summary['val_accuracy_mean']:.4f} "
              f"[{summary['val_accuracy_ci_low']:.4f}, {summary['val_accuracy_ci_high']:.4f}], val_macro_f1 "
              f"{summary['val_macro_f1_mean']:.4f} [{summary['val_macro_f1_ci_low']:.4f}, "
              f"{summary['val_macro_f1_ci_high']:.4f}] run={parent.info.run_id}", flush=True)
        return summary


def run(config) -> tuple:
    """The whole benchmark: check everything that can fail early, train each backbone (on every
    fold with data.folds > 1), build the table."""
    backbones.load_plugins(config.plugins)
    for name in config.model.backbones:
        backbones.get(name)  # unknown names fail here, listing the registered ones
    client = tracking.connect(config.tracking)
    weights = resolve_weights(config)
    prepared = prepare_data(config)
    experiment = tracking.experiment_id(client, prepared.name, config.tracking)
    folds = fold_data(config, prepared) if config.data.folds > 1 else []
    counts = ", ".join(f"{split} {len(samples)}" for split, samples in prepared.parts.items())
    layout = (f"{len(folds)} folds of about {len(folds[0].parts['val'])} images" if folds else counts)
    print(f"data set {prepared.name} ({prepared.path}): {len(prepared.dataset.class_names)} classes, {layout}; "
          f"fingerprint {prepared.dataset.fingerprint}; tracking {client.tracking_uri}", flush=True)
    for name in config.model.backbones:
        if folds:
            run_cross_validated(config, folds, name, weights[name], experiment)
        else:
            run_backbone(config, prepared, name, weights[name], experiment)
    if config.tracking.log_model:
        report.register_best(client, prepared.name, "cv" if folds else "bench")
    table, paths = report.build(client, prepared.name, Path(config.tracking.results_dir),
                                "cv" if folds else "bench", config.evaluate.bootstrap_resamples)
    return table, paths, prepared.name
