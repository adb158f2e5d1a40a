"""`bench`: every chosen backbone through the same run recipe (recipe.py), one MLflow run each (a
parent run with a child per fold when cross-validating), then the table and the champion."""
from __future__ import annotations

import json
import tempfile
import tomllib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

import backbones

from . import (audit, intake, metrics, mlflow_model, modelfile, pipeline, plots, recipe, redact, report, stats,
               stopwatch, tracking)
from .config import fold_recipe
from .trainer import TrainingFailed


def run_backbone(config, prepared: recipe.Prepared, name: str, weights: str, experiment: str,
                 fold: int | None = None, member: int = 0) -> dict:
    """Train and evaluate one backbone inside its own MLflow run (a child run when it is one
    cross-validation fold, or one seed-ensemble member of a fold); prints one summary line."""
    built = recipe.build(config, prepared, name, weights, member)
    label = (f"{name}-{built.weights_used}" + ("" if fold is None else f"-fold{fold + 1}")
             + (f"-member{member + 1}" if config.train.members > 1 else ""))
    with mlflow.start_run(experiment_id=experiment, run_name=tracking.run_name(label),
                          nested=fold is not None) as run:
        tags = {tracking.KIND_TAG: "bench" if fold is None else "bench-fold", **tracking.provenance_tags()}
        mlflow.set_tags(tags if fold is None else {**tags, "tumorbench.fold": str(fold + 1),
                                                   tracking.MEMBER_TAG: str(member + 1)})
        try:
            outcome = recipe.train_and_log(config, prepared, built)
        except TrainingFailed:
            mlflow.end_run(status="FAILED")
            raise
        val = outcome["val"]
        extras = (f" (probe {outcome['probe_val']['accuracy']:.4f})" if "probe_val" in outcome else "")
        extras += f" (flip {outcome['tta_val']['accuracy']:.4f})" if "tta_val" in outcome else ""
        print(f"== {label:<24} val_accuracy={val['accuracy']:.4f}{extras} val_macro_f1={val['macro_f1']:.4f} "
              f"val_loss={val['loss']:.4f} epochs={outcome['epochs']} time={outcome['seconds']:.1f}s "
              f"run={run.info.run_id}", flush=True)
        return {**outcome, "run_id": run.info.run_id, "weights_used": built.weights_used}


def finished_fold(config, prepared: recipe.Prepared, name: str, experiment: str, fold: int,
                  member: int = 0) -> dict | None:
    """The outcome of fold `fold` (its seed-ensemble member `member`) if MLflow already holds it: a
    finished fold run of this backbone on the same data whose saved config equals this one (so an
    interrupted cross-validation resumes where it stopped instead of training finished folds again)
    by the same recipe.RECIPE_VERSION; None otherwise."""
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs(
        [experiment], f"tags.`{tracking.KIND_TAG}` = 'bench-fold' and tags.`tumorbench.fold` = '{fold + 1}' and "
        f"params.backbone = '{name}' and params.data_fingerprint = '{prepared.dataset.fingerprint}' and "
        f"params.recipe_version = '{recipe.RECIPE_VERSION}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"])
    own_size = backbones.get(name).input_size
    wanted = fold_recipe(config.to_toml(), own_size)
    dataset = prepared.dataset
    for run in runs:
        if run.data.tags.get(tracking.MEMBER_TAG, "1") != str(member + 1):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                saved = Path(client.download_artifacts(run.info.run_id, "config.toml", tmp)).read_text()
                if fold_recipe(saved, own_size) != wanted:
                    continue
                artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
                splits = ["val"] + (["test"] if "predictions_test.csv" in artifacts else [])
                outcome = {split: json.loads(Path(client.download_artifacts(
                    run.info.run_id, f"metrics_{split}.json", tmp)).read_text()) for split in splits}
                predictions = {split: pd.read_csv(client.download_artifacts(
                    run.info.run_id, f"predictions_{split}.csv", tmp)) for split in splits}
                # The probe's and the test-time views' scores, from their per-image predictions.
                for artifact in artifacts:
                    if not artifact.startswith(("predictions_probe_", "predictions_tta_")):
                        continue
                    frame = pd.read_csv(client.download_artifacts(run.info.run_id, artifact, tmp))
                    split = artifact.removeprefix("predictions_").removesuffix(".csv")
                    outcome[split] = metrics.compute(
                        frame["label"], frame[recipe.probability_columns(dataset.class_names)].to_numpy(),
                        dataset.class_names, config.evaluate.calibration_bins)
                    predictions[split] = frame
            except (OSError, ValueError, tomllib.TOMLDecodeError, mlflow.exceptions.MlflowException):
                continue
        m = run.data.metrics
        costs = {key: m[key] for key in ("train_seconds", "phase1_seconds", "phase2_seconds", "trainable_params",
                                         "total_params", "inference_ms_per_image") if key in m}
        which = f"fold {fold + 1}" + (f" member {member + 1}" if config.train.members > 1 else "")
        print(f"== {name} {which}: already finished in run {run.info.run_id} with this config; reused", flush=True)
        return {**outcome, "predictions": predictions, "costs": costs, "seconds": m.get("train_seconds", 0.0),
                "run_id": run.info.run_id, "weights_used": run.data.params["weights"], "reused": True}
    return None


def _mean_by_source(frames: list[pd.DataFrame], classes: list[str]) -> pd.DataFrame:
    """Prediction frames of the same images (rows in any order) as one: the first frame's columns,
    indexed by source, with the class probabilities averaged per image."""
    indexed = [frame.set_index("source") for frame in frames]
    mean = indexed[0].copy()
    mean[classes] = sum(frame.loc[mean.index, classes] for frame in indexed) / len(indexed)
    return mean


def _seed_ensemble(config, prepared: recipe.Prepared, members: list[dict]) -> dict:
    """One fold's seed-ensemble members as one model: per split, their probabilities averaged per
    image and scored at argmax (what `predict` does); the probe, the same for every member, from the
    first; training seconds summed. run_ids lists every member's run (the models `predict` loads)."""
    first = members[0]
    if len(members) == 1:
        return {**first, "run_ids": [first["run_id"]]}
    dataset = prepared.dataset
    classes = recipe.probability_columns(dataset.class_names)
    combined = {key: value for key, value in first.items() if key.startswith("probe_")}
    predictions = {split: frame for split, frame in first["predictions"].items() if split.startswith("probe_")}
    for split in first["predictions"]:
        if split.startswith("probe_") or not all(split in member["predictions"] for member in members):
            continue
        mean = _mean_by_source([member["predictions"][split] for member in members], classes)
        predictions[split] = mean.reset_index()
        combined[split] = metrics.compute(mean["label"], mean[classes].to_numpy(), dataset.class_names,
                                          config.evaluate.calibration_bins)
    costs = {key: float(np.mean([member["costs"].get(key, np.nan) for member in members])) for key in first["costs"]}
    return {**combined, "predictions": predictions, "costs": costs,
            "seconds": float(sum(member["seconds"] for member in members)),
            "run_ids": [member["run_id"] for member in members], "weights_used": first["weights_used"]}


def _log_ensemble(prepared: recipe.Prepared, fold_run_ids: list[str]) -> None:
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


def _score_ensemble_on_test(config, prepared: recipe.Prepared, spec, fold_predictions: list[pd.DataFrame]) -> None:
    """The test split scored by the fold models together, their probabilities averaged (what
    `predict` does with the parent's run id): ensemble_test_* on the parent. No test image was in
    any fold, so this is the figure for unseen data; the 2-class threshold is argmax (no member's
    validation chose it)."""
    classes = recipe.probability_columns(prepared.dataset.class_names)
    mean = _mean_by_source(fold_predictions, classes)
    samples = prepared.parts["test"]
    probabilities = mean.loc[[s.source for s in samples], classes].to_numpy()
    result = recipe.score_split(prepared.dataset, samples, probabilities, spec, "ensemble_test", config.evaluate, None)
    print(f"== {spec.name} ensemble of {len(fold_predictions)} fold models on test ({len(samples)} images): accuracy "
          f"{result['accuracy']:.4f}, macro_f1 {result['macro_f1']:.4f}", flush=True)
    mlflow.log_text(recipe.predictions_frame(prepared.dataset, samples, probabilities).to_csv(index=False),
                    "predictions_ensemble_test.csv")


def _nearest_training_bits(scored: list[recipe.Prepared]) -> dict[str, int]:
    """Each validation image's perceptual-hash distance (bits of 256) to the nearest image its fold
    trained on. Duplicate grouping keeps copies within data.duplicate_distance out of training, but
    sharpened, contrast-changed or cropped copies and neighbouring slices lie further apart."""
    dataset = scored[0].dataset
    pool = sorted({s for fold in scored for part in ("train", "val") for s in fold.parts[part]}, key=lambda s: s.source)
    row = {s.source: i for i, s in enumerate(pool)}
    hashes = audit.perceptual_hashes(dataset, pool)
    nearest = {}
    for fold in scored:
        held_out = [s.source for s in fold.parts["val"]]
        bits = audit.nearest_distances(hashes[[row[source] for source in held_out]],
                                       hashes[[row[s.source] for s in fold.parts["train"]]])
        nearest.update(zip(held_out, map(int, bits)))
    return nearest


def _score_out_of_fold(config, scored: list[recipe.Prepared], spec, fold_predictions: list[dict],
                       numbers: list[int]) -> None:
    """Every image scored once, by the fold model that held it out: oof_* (and tta_oof_*, with the
    test-time views, when every fold has them), with predictions_oof.csv for the paired tests. Also
    far_oof_*: the images with no training image within evaluate.far_distance bits, i.e. unlike
    anything their model saw (nearest_train_bits in predictions_oof.csv)."""
    dataset = scored[0].dataset
    nearest = _nearest_training_bits(scored)
    for split, name in (("val", "oof"), ("tta_val", "tta_oof")):
        if not all(split in predictions for predictions in fold_predictions):
            continue
        out_of_fold = pd.concat([predictions[split].assign(fold=number)
                                 for number, predictions in zip(numbers, fold_predictions)], ignore_index=True)
        out_of_fold["nearest_train_bits"] = out_of_fold["source"].map(nearest)
        mlflow.log_text(out_of_fold.to_csv(index=False), f"predictions_{name}.csv")
        probabilities = out_of_fold[recipe.probability_columns(dataset.class_names)].to_numpy()
        samples = [intake.Sample(source, int(label)) for source, label in zip(out_of_fold.source, out_of_fold.label)]
        recipe.score_split(dataset, samples, probabilities, spec, name, config.evaluate, None)
        if name == "oof":
            _log_label_review(dataset, samples, probabilities, out_of_fold["fold"].to_numpy(), spec.name)
            far = np.flatnonzero(out_of_fold["nearest_train_bits"].to_numpy() > config.evaluate.far_distance)
            mlflow.log_metric("far_oof_images", len(far))
            if len(far):
                recipe.score_split(dataset, [samples[i] for i in far], probabilities[far], spec, "far_oof",
                                   config.evaluate, None)


def _log_label_review(dataset: intake.Dataset, samples: list[intake.Sample], probabilities: np.ndarray,
                      folds: np.ndarray, backbone: str, shown: int = 18) -> None:
    """Every out-of-fold error, the most confident first (label_review_oof.csv, and the first
    `shown` as a picture sheet): an image whose held-out model is sure of another class may carry a
    wrong label rather than meet a wrong model, and a person should look at it."""
    names = dataset.class_names
    labels = np.array([s.label for s in samples])
    predicted = probabilities.argmax(axis=1)
    own = probabilities[np.arange(len(samples)), labels]
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(own[wrong], kind="stable")]
    review = pd.DataFrame({"source": [samples[i].source for i in wrong], "label": [names[labels[i]] for i in wrong],
                           "predicted": [names[predicted[i]] for i in wrong], "p_label": own[wrong],
                           "p_predicted": probabilities[wrong, predicted[wrong]], "fold": folds[wrong]})
    mlflow.log_text(review.to_csv(index=False), "label_review_oof.csv")
    if len(wrong):
        chosen = [samples[i] for i in wrong[:shown]]
        captions = [f"{s.source}\nlabel {row.label} ({row.p_label:.2f})\npredicted {row.predicted}"
                    for s, row in zip(chosen, review.itertuples())]
        images = [pipeline.resize(dataset.read(sample), 160) for sample in chosen]
        tracking.log_figure(plots.image_sheet(images, captions, f"{backbone}: out-of-fold errors, most confident first"),
                            "label_review_oof.png")


def run_cross_validated(config, folds: list[recipe.Prepared], name: str, weights: str, experiment: str) -> dict:
    """A parent MLflow run per backbone with a child run per fold; the parent holds each metric's
    mean and 95% CI over folds, and the out-of-fold predictions (every image scored exactly once).
    Folds already finished with the same config are reused (and moved under this parent). With
    data.only_folds only those folds are trained and scored (the run name says which). With
    train.members > 1 each fold is a seed ensemble of that many child runs (_seed_ensemble), and
    member_val_* holds the members alone (averaged within each fold, then over folds like every
    other figure), to show what the ensemble adds."""
    first = folds[0]
    spec = backbones.get(name)
    numbers = sorted(config.data.only_folds) or list(range(1, len(folds) + 1))
    partial = f"-folds{'+'.join(map(str, numbers))}" if len(numbers) < len(folds) else ""
    with mlflow.start_run(experiment_id=experiment,
                          run_name=tracking.run_name(f"{name}-{weights}-cv{len(folds)}{partial}")) as parent:
        mlflow.set_tags({tracking.KIND_TAG: "bench-cv", **tracking.provenance_tags()})
        outcomes, member_scores = [], []
        for number in numbers:
            index = number - 1
            members = []
            for member in range(config.train.members):
                outcome = finished_fold(config, folds[index], name, experiment, index, member)
                if outcome is None:
                    outcome = run_backbone(config, folds[index], name, weights, experiment, fold=index, member=member)
                else:
                    mlflow.tracking.MlflowClient().set_tag(outcome["run_id"], "mlflow.parentRunId",
                                                           parent.info.run_id)
                members.append(outcome)
            outcomes.append(_seed_ensemble(config, folds[index], members))
            if len(members) > 1:  # the fold's members alone, averaged: one sample per fold for the CI
                alone_scores = [metrics.flatten(member["val"], "member_val") for member in members]
                member_scores.append({key: float(np.nanmean([scores.get(key, np.nan) for scores in alone_scores]))
                                      for key in set().union(*alone_scores)})
                alone = " / ".join(f"{member['val']['accuracy']:.4f}" for member in members)
                print(f"== {name} fold {number}: seed ensemble of {len(members)} val_accuracy "
                      f"{outcomes[-1]['val']['accuracy']:.4f} (members alone {alone})", flush=True)
        mlflow.log_params({"backbone": name, "weights": outcomes[0]["weights_used"], "weights_requested": weights,
                           "input_size": recipe.input_size(config, spec), "folds": len(folds),
                           "folds_scored": ",".join(map(str, numbers)), "seed": config.seed,
                           "members": config.train.members,
                           "data_path": first.path,
                           "data_fingerprint": first.dataset.fingerprint,
                           "class_names": json.dumps(first.dataset.class_names),
                           "group_duplicates": config.data.group_duplicates,
                           "n_images": sum(len(folds[n - 1].parts["val"]) for n in numbers),
                           tracking.SCORED_ON: intake.scored_on([folds[n - 1].parts["val"] for n in numbers]
                                                                + [first.parts.get("test", [])])})
        mlflow.log_text(config.to_toml(), "config.toml")
        recipe.log_excluded(first)
        summary = {}
        for split in ("val", "test", "probe_val", "probe_test", "tta_val", "tta_test", "member_val"):
            per_fold = (member_scores if split == "member_val" else
                        [metrics.flatten(outcome[split], split) for outcome in outcomes if split in outcome])
            for key in sorted(set().union(*per_fold)) if per_fold else []:
                mean, low, high = stats.mean_ci([scores.get(key, np.nan) for scores in per_fold],
                                                bounds=metrics.score_range(key))
                summary.update({f"{key}_mean": mean, f"{key}_ci_low": low, f"{key}_ci_high": high})
        mlflow.log_metrics({k: v for k, v in summary.items() if np.isfinite(v)})
        if all("probe_val" in outcome for outcome in outcomes):
            mlflow.log_metric(report.FOLDS_BELOW_PROBE,
                              sum(bool(report.below_probe(o["val"], o["probe_val"])) for o in outcomes))
        costs = {key: float(np.nanmean([outcome["costs"].get(key, np.nan) for outcome in outcomes]))
                 for key in outcomes[0]["costs"]}
        mlflow.log_metrics({**costs, "train_seconds": float(sum(outcome["seconds"] for outcome in outcomes))})
        _score_out_of_fold(config, [folds[n - 1] for n in numbers], spec, [outcome["predictions"] for outcome in outcomes],
                           numbers)
        if first.parts.get("test"):
            _score_ensemble_on_test(config, first, spec, [outcome["predictions"]["test"] for outcome in outcomes])
        if config.tracking.log_model:
            _log_ensemble(first, [run_id for outcome in outcomes for run_id in outcome["run_ids"]])
        scope = f" (folds {', '.join(map(str, numbers))} alone)" if partial else ""
        print(f"== {name} {len(folds)}-fold{scope}: val_accuracy {summary['val_accuracy_mean']:.4f} "
              f"[{summary['val_accuracy_ci_low']:.4f}, {summary['val_accuracy_ci_high']:.4f}], val_macro_f1 "
              f"{summary['val_macro_f1_mean']:.4f} [{summary['val_macro_f1_ci_low']:.4f}, "
              f"{summary['val_macro_f1_ci_high']:.4f}] run={parent.info.run_id}", flush=True)
        return {**summary, "run_id": parent.info.run_id}


def run(config) -> tuple:
    """The whole benchmark: check everything that can fail early, train each backbone (on every
    fold with data.folds > 1), build the table. Its stages are timed into any running stopwatch."""
    backbones.load_plugins(config.plugins)
    for name in config.model.backbones:
        backbones.get(name)  # unknown names fail here, listing the registered ones
    client = tracking.connect(config.tracking)
    weights = recipe.resolve_weights(config)
    prepared = recipe.prepare_data(config)
    experiment = tracking.experiment_id(client, prepared.name, config.tracking)
    folds = recipe.fold_data(config, prepared) if config.data.folds > 1 else []
    counts = ", ".join(f"{split} {len(samples)}" for split, samples in prepared.parts.items())
    layout = (f"{len(folds)} folds of about {len(folds[0].parts['val'])} images" if folds else counts)
    print(f"data set {prepared.name} ({prepared.path}): {len(prepared.dataset.class_names)} classes, {layout}; "
          f"fingerprint {prepared.dataset.fingerprint}; tracking {redact.mask(client.tracking_uri)}", flush=True)
    made = [(run_cross_validated(config, folds, name, weights[name], experiment) if folds else
             run_backbone(config, prepared, name, weights[name], experiment))["run_id"]
            for name in config.model.backbones]
    source = "cv" if folds else "bench"
    with stopwatch.stage("report"):
        runs = report.select_runs(client, prepared.name, source, made)
        table, paths = report.build(client, prepared.name, runs, Path(config.tracking.results_dir), source,
                                    config.evaluate.bootstrap_resamples, register=config.tracking.log_model)
    return table, paths, prepared.name
