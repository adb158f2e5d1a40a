"""`predict`: a trained model on new images, with the exact preprocessing it was trained with
(read from the model file, never retyped), per-file errors, optional TTA and Grad-CAM overlays."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image

import backbones

from . import gradcam, intake, mlflow_model, modelfile, pipeline, report, tracking
from .phantoms import cache_root

CHUNK = 256


def _fold_runs(client, parent) -> list:
    """The finished fold runs of a cross-validated parent run (every seed-ensemble member), in fold order."""
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.status = 'FINISHED'",
                              max_results=1000)
    return sorted(runs, key=lambda r: (int(r.data.tags.get("tumorbench.fold", 0)),
                                       int(r.data.tags.get(tracking.MEMBER_TAG, 1))))


def _best_run(client, data_set: str):
    """The bench run or cross-validated parent with the best validation macro-F1 (CV: mean over folds),
    ranked as the champion is: a whole cross-validation before one split (tracking.evidence)."""
    candidates = []
    for source, key in (("bench", "val_macro_f1"), ("cv", "val_macro_f1_mean")):
        try:
            candidates += [(run.data.metrics.get(key, -1.0), run)
                           for run in report.select_runs(client, data_set, source)]
        except LookupError:
            continue
    if not candidates:
        raise LookupError(f"MLflow has no finished bench or cross-validated runs for {data_set!r}")
    return max(candidates, key=lambda pair: (tracking.evidence(pair[1]), pair[0]))[1]


def resolve_models(reference: str, tracking_config) -> list[Path]:
    """The model file(s) `reference` names: a .keras file; an MLflow run id (a bench run's model, or
    the fold models of a cross-validated parent run, predicted as an ensemble); models:/<name>@<alias>;
    or best:<data set> (the bench run or cross-validated ensemble with the best validation macro-F1).
    Several references joined by commas are one ensemble of all their models (e.g. two backbones'
    cross-validations)."""
    if "," in reference and not Path(reference).is_file():
        return [path for part in reference.split(",") if part.strip()
                for path in resolve_models(part.strip(), tracking_config)]
    if Path(reference).is_file():
        return [Path(reference)]
    if reference.startswith("models:/"):  # models:/<name>/<version>, models:/<name>@champion
        tracking.connect(tracking_config)
        target = cache_root() / "models" / re.sub(r"[^A-Za-z0-9_.-]", "_", reference.removeprefix("models:/"))
        if target.exists():
            shutil.rmtree(target)  # an alias can move: always the version it names now
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=str(target))
        except mlflow.exceptions.MlflowException as err:
            raise LookupError(f"{reference}: {err.message}") from None
        return mlflow_model.member_files(Path(local))
    if not (reference.startswith("best:") or re.fullmatch(r"[0-9a-f]{32}", reference)):
        raise modelfile.ModelFileError(f"{reference}: neither a model file, an MLflow run id, models:/<name>@<alias> "
                                       "nor best:<data set>")
    client = tracking.connect(tracking_config)
    run = (_best_run(client, reference.removeprefix("best:")) if reference.startswith("best:")
           else client.get_run(reference))
    if run.data.tags.get(tracking.KIND_TAG) == "bench-cv":
        folds = _fold_runs(client, run)
        if not folds:
            raise LookupError(f"cross-validated run {run.info.run_id} has no finished fold runs")
        return [tracking.run_model_file(client, fold.info.run_id) for fold in folds]
    return [tracking.run_model_file(client, run.info.run_id)]


def image_files(paths: list[str]) -> tuple[list[Path], list[intake.Problem]]:
    """Files named, and image files below folders named (recursively, hidden files skipped); and the
    folder links below them that lead outside the folder named, which are not followed."""
    found, not_followed = [], []
    for path in map(Path, paths):
        if path.is_dir():
            files, outside = intake.walk_files(path)
            found += [p for p in files if p.suffix.lower() in intake.IMAGE_SUFFIXES]
            not_followed += outside
        else:
            found.append(path)
    return found, not_followed


def _load(path: Path, sizes: list[int]):
    """({input size: the image resized to it} for every size an ensemble's models take, the error,
    the image's notes)."""
    try:
        pixels, notes = intake.load_rgb_noting(path)
        return {size: pipeline.resize(pixels, size) for size in sizes}, "", notes
    except intake.DataError as err:
        return None, str(err).removeprefix(f"{path}: "), []
    except OSError as err:
        return None, str(err), []


def _load_models(model_paths: list[Path]) -> list[tuple]:
    """(model, description, spec) per file; an ensemble's models must agree on their classes (each
    is fed at its own input size)."""
    loaded = []
    for path in model_paths:
        model, description = modelfile.load(path)
        loaded.append((model, description, backbones.get(description["backbone"])))
    first = loaded[0][1]
    for path, (_, description, _) in zip(model_paths, loaded):
        if description["class_names"] != first["class_names"]:
            raise modelfile.ModelFileError(f"{path}: class_names {description['class_names']} differ from "
                                           f"{model_paths[0]}'s {first['class_names']}; an ensemble's models must agree")
    return loaded


def _ensemble_probabilities(ensemble: list[tuple], images: list[dict], batch_size: int, tta: bool):
    """The mean over every model (and view) of an ensemble whose models may differ in input size:
    each size's models see the images at that size (`_load`'s dicts), and each model counts once."""
    total = 0.0
    for size in images[0]:
        members = [(model, spec.preprocess) for model, description, spec in ensemble
                   if description["input_size"] == size]
        resized = np.stack([views[size] for views in images])
        total = total + len(members) * pipeline.ensemble_probabilities(members, resized, batch_size, tta)
    return total / len(ensemble)


def run(model_paths: Path | list[Path], paths: list[str], batch_size: int = 32, tta: bool = False,
        threshold: float | None = None, explain: Path | None = None) -> list[dict]:
    """One row per file: path, predicted class, probability per class (or the error), notes (what the
    decoder warned about). Several model files are an ensemble: their probabilities are averaged
    (Grad-CAM shows the first model's). A folder link leading outside a folder named is a row
    with its target as the error: not followed."""
    model_paths = [model_paths] if isinstance(model_paths, Path) else list(model_paths)
    ensemble = _load_models(model_paths)
    model, description, spec = ensemble[0]
    classes, size = description["class_names"], description["input_size"]
    if threshold is not None and len(classes) != 2:
        raise modelfile.ModelFileError(f"--threshold applies to 2-class models; {model_paths[0]} has {len(classes)}")
    threshold = threshold if threshold is not None else description.get("threshold")
    sizes = sorted({member_description["input_size"] for _, member_description, _ in ensemble})
    files, not_followed = image_files(paths)
    rows = []
    for start in range(0, len(files), CHUNK):
        chunk = files[start:start + CHUNK]
        with intake.warnings_as_notes(), ThreadPoolExecutor(max_workers=intake.READ_THREADS) as pool:
            loaded = list(pool.map(lambda p: _load(p, sizes), chunk))
        good = [(path, views) for path, (views, error, _) in zip(chunk, loaded) if not error]
        probs = (_ensemble_probabilities(ensemble, [views for _, views in good], batch_size, tta)
                 if good else np.zeros((0, len(classes))))
        maps = None
        if explain and good:
            shown = np.stack([views[size] for _, views in good])  # at the first model's size
            maps = np.concatenate([
                gradcam.heatmaps(model, spec, spec.preprocess(shown[i:i + batch_size].astype("float32")))
                for i in range(0, len(shown), batch_size)])
        by_path = {path: i for i, (path, _) in enumerate(good)}
        for path, (_, error, notes) in zip(chunk, loaded):
            row = _row(path, classes, tta, len(ensemble), error, notes)
            if path in by_path:
                i = by_path[path]
                p = probs[i]
                index = int(p[1] >= threshold) if threshold is not None else int(np.argmax(p))
                row.update({"predicted": classes[index], **{f"prob_{c}": float(v) for c, v in zip(classes, p)}})
                if maps is not None:
                    explain.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(gradcam.overlay(shown[i], maps[i])).save(
                        explain / f"{start + chunk.index(path):05d}_{path.stem}_gradcam.png")
            rows.append(row)
    return rows + [_row(Path(link.path), classes, tta, len(ensemble), link.reason, []) for link in not_followed]


def _row(path: Path, classes: list[str], tta: bool, models: int, error: str, notes: list[str]) -> dict:
    """A row before its prediction: path, empty prediction and probabilities, error and notes."""
    return {"path": str(path), "predicted": "", **{f"prob_{c}": "" for c in classes},
            "tta": pipeline.TTA_VIEWS if tta else "", "models": models, "error": error, "note": "; ".join(notes)}


def score(rows: list[dict], paths: list[str], class_names: list[str], calibration_bins: int = 10) -> dict:
    """Metrics of the predicted rows against the class folder each image sits in: a folder given in
    `paths` whose subfolders are named after the model's classes (a held-out test split laid out
    like the training data). Rows with an error are left out (they are reported on their own)."""
    from . import metrics

    roots = [Path(os.path.abspath(p)) for p in paths if Path(p).is_dir()]  # symlinks kept: their folder counts
    truth, probs = [], []
    for row in rows:
        if row["error"]:
            continue
        path = Path(os.path.abspath(row["path"]))
        folder = next((path.relative_to(root).parts[0] for root in roots
                       if path.is_relative_to(root) and len(path.relative_to(root).parts) > 1), None)
        if folder not in class_names:
            raise ValueError(f"{row['path']}: --score needs every image in a subfolder named after one of the "
                             f"model's classes {class_names} (found {folder or 'no subfolder'})")
        truth.append(class_names.index(folder))
        probs.append([row[f"prob_{c}"] for c in class_names])
    if not truth:
        raise ValueError("--score: no image could be scored")
    return metrics.compute(truth, np.asarray(probs, dtype=float), class_names, calibration_bins)


def write(rows: list[dict], out: Path) -> None:
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=1))
        return
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
