"""`predict`: a trained model on new images, with the exact preprocessing it was trained with
(read from the model file, never retyped), per-file errors, optional TTA and Grad-CAM overlays."""
from __future__ import annotations

import csv
import json
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

import backbones

from . import gradcam, intake, modelfile, pipeline, report, tracking
from .phantoms import cache_root

TTA_VIEWS = "original, horizontal flip, 5% shift right, 5% shift down (mean of 4)"
CHUNK = 256


def resolve_model(reference: str, tracking_config) -> Path:
    """A model file from a path, an MLflow run id, or best:<data set> (best macro-F1 bench run)."""
    if Path(reference).is_file():
        return Path(reference)
    run_id = reference
    if not (reference.startswith("best:") or re.fullmatch(r"[0-9a-f]{32}", reference)):
        raise modelfile.ModelFileError(f"{reference}: neither a model file, an MLflow run id nor best:<data set>")
    client = tracking.connect(tracking_config)
    if reference.startswith("best:"):
        runs = report.select_runs(client, reference.removeprefix("best:"), "bench")
        run_id = max(runs, key=lambda r: r.data.metrics.get("val_macro_f1", -1.0)).info.run_id
    local = cache_root() / "models" / run_id / "model.keras"
    if not local.is_file():
        with tempfile.TemporaryDirectory() as download:
            fetched = client.download_artifacts(run_id, "model/model.keras", download)
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(fetched, local)
    return local


def image_files(paths: list[str]) -> list[Path]:
    """Files named, and image files below folders named (recursively, hidden files skipped)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += [p for p in intake.walk_files(path) if p.suffix.lower() in intake.IMAGE_SUFFIXES]
        else:
            found.append(path)
    return found


def _load(path: Path, size: int):
    try:
        return pipeline.resize(intake.load_rgb(path), size), ""
    except intake.DataError as err:
        return None, str(err).removeprefix(f"{path}: ")
    except OSError as err:
        return None, str(err)


def _views(batch: tf.Tensor, tta: bool) -> list[tf.Tensor]:
    if not tta:
        return [batch]
    shift = max(1, int(batch.shape[1]) // 20)
    return [batch, tf.reverse(batch, axis=[2]), tf.roll(batch, shift, axis=2), tf.roll(batch, shift, axis=1)]


def probabilities(model, preprocess, images: np.ndarray, batch_size: int, tta: bool = False) -> np.ndarray:
    """(N, K) class probabilities, batched through tf.data, averaged over TTA views if asked."""
    from .metrics import class_probabilities

    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    results = []
    for view in range(4 if tta else 1):
        mapped = ds.map(lambda b, v=view: preprocess(_views(tf.cast(b, tf.float32), tta)[v]),
                        num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
        results.append(class_probabilities(model.predict(mapped, verbose=0)))
    return np.mean(results, axis=0)


def run(model_path: Path, paths: list[str], batch_size: int = 32, tta: bool = False,
        threshold: float | None = None, explain: Path | None = None) -> list[dict]:
    """One row per file: path, predicted class, probability per class (or the error)."""
    model, description = modelfile.load(model_path)
    spec = backbones.get(description["backbone"])
    classes, size = description["class_names"], description["input_size"]
    if threshold is not None and len(classes) != 2:
        raise modelfile.ModelFileError(f"--threshold applies to 2-class models; {model_path} has {len(classes)}")
    threshold = threshold if threshold is not None else description.get("threshold")
    files = image_files(paths)
    rows = []
    for start in range(0, len(files), CHUNK):
        chunk = files[start:start + CHUNK]
        with ThreadPoolExecutor(max_workers=intake.READ_THREADS) as pool:
            loaded = list(pool.map(lambda p: _load(p, size), chunk))
        good = [(path, pixels) for path, (pixels, error) in zip(chunk, loaded) if not error]
        probs = (probabilities(model, spec.preprocess, np.stack([p for _, p in good]), batch_size, tta)
                 if good else np.zeros((0, len(classes))))
        maps = None
        if explain and good:
            stacked = np.stack([p for _, p in good]).astype("float32")
            maps = np.concatenate([gradcam.heatmaps(model, spec, spec.preprocess(stacked[i:i + batch_size]))
                                   for i in range(0, len(stacked), batch_size)])
        by_path = {path: (i, pixels) for i, (path, pixels) in enumerate(good)}
        for path, (_, error) in zip(chunk, loaded):
            row = {"path": str(path), "predicted": "", **{f"prob_{c}": "" for c in classes},
                   "tta": TTA_VIEWS if tta else "", "error": error}
            if path in by_path:
                i, pixels = by_path[path]
                p = probs[i]
                index = int(p[1] >= threshold) if threshold is not None else int(np.argmax(p))
                row.update({"predicted": classes[index], **{f"prob_{c}": float(v) for c, v in zip(classes, p)}})
                if maps is not None:
                    explain.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(gradcam.overlay(pixels, maps[i])).save(
                        explain / f"{start + chunk.index(path):05d}_{path.stem}_gradcam.png")
            rows.append(row)
    return rows


def write(rows: list[dict], out: Path) -> None:
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=1))
        return
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
