"""`make perf`: this project's trainer against the seeds' way, side by side in one process.

(a) baseline: the whole model every epoch, augmentation on the fly, frozen layers recomputed;
(b) tumorbench: frozen layers computed once per augmented view and cached.
Same data, split, epochs, seed and weights. Then an N-trial sweep against one trial, and
inference images/s through the predict path against the raw backbone forward.
"""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from . import bench, metrics, pipeline, predict, sweep
from .config import load_config
from .trainer import train_two_phase

YES_NO = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "brain-mri-yes-no"


def perf_config(quick: bool, data: str, weights: str, results_dir: str, views: int):
    data = data or (str(YES_NO) if YES_NO.is_dir() and not quick else "")
    size = "64" if quick else "224"
    overrides = [
        f'data.path="{data}"', 'data.phantom_mode="binary"', "data.phantom_per_class=24", "data.phantom_size=64",
        f'model.weights="{weights}"', 'model.backbones=["vgg16"]', f"model.input_size={size}",
        f"train.epochs1={2 if quick else 20}", f"train.epochs2={2 if quick else 15}", "train.verbose=0",
        f"train.cache_views={views}", f'tracking.results_dir="{results_dir}"', "tracking.log_model=false",
    ]
    return load_config(None, overrides)


def timed_run(config, prepared) -> dict:
    """One two-phase run without tracking: per-phase and whole times, validation accuracy."""
    started = time.perf_counter()
    built = bench.build(config, prepared, "vgg16", config.model.weights)
    result = train_two_phase(built.model, built.base, built.spec, built.feed, config.train,
                             len(prepared.dataset.class_names))
    whole = time.perf_counter() - started
    val = prepared.parts["val"]
    ds = pipeline.make_dataset(prepared.dataset, val, built.spec.preprocess, built.size, config.train.batch_size)
    scores = metrics.compute([s.label for s in val], built.model.predict(ds, verbose=0), prepared.dataset.class_names)
    setup = whole - result.seconds
    return {"phase1": result.phase_seconds.get(1, 0.0), "phase2": result.phase_seconds.get(2, 0.0),
            "setup": setup, "whole": whole, "accuracy": scores["accuracy"], "epochs": len(result.epochs),
            "built": built}


def throughput(built, prepared, batch_size: int, repeats: int = 5) -> tuple[float, float]:
    """Median images/s of `predict`'s path (tf.data, preprocessing, whole model, on decoded images)
    and of the raw base forward on ready, preprocessed tensors."""
    samples = (prepared.parts["val"] * 8)[:max(batch_size * 4, 64)]
    decoded = np.asarray(pipeline.decoded_images(prepared.dataset, samples, built.size))
    ready = np.asarray(built.spec.preprocess(decoded.astype("float32")))
    timings = {"predict": [], "raw": []}
    predict.probabilities(built.model, built.spec.preprocess, decoded, batch_size)
    built.base.predict(ready, batch_size=batch_size, verbose=0)
    for _ in range(repeats):  # alternate the two, so machine noise hits both alike
        started = time.perf_counter()
        predict.probabilities(built.model, built.spec.preprocess, decoded, batch_size)
        timings["predict"].append(len(samples) / (time.perf_counter() - started))
        started = time.perf_counter()
        built.base.predict(ready, batch_size=batch_size, verbose=0)
        timings["raw"].append(len(samples) / (time.perf_counter() - started))
    return statistics.median(timings["predict"]), statistics.median(timings["raw"])


def run(quick: bool = False, data: str = "", weights: str = "none", trials: int = 0) -> str:
    trials = trials or (3 if quick else 10)
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["TUMORBENCH_CACHE"] = str(Path(scratch) / "cache")  # cold caches, counted in (b)
        baseline_config = perf_config(quick, data, weights, scratch, views=0)
        ours_config = perf_config(quick, data, weights, scratch, views=4)
        prepared = bench.prepare_data(ours_config)
        pipeline.decoded_images(prepared.dataset, prepared.parts["train"], ours_config.model.input_size)
        print("timing (a) baseline ...", flush=True)
        baseline = timed_run(baseline_config, prepared)
        print("timing (b) tumorbench ...", flush=True)
        ours = timed_run(ours_config, prepared)
        predict_ips, raw_ips = throughput(ours["built"], prepared, ours_config.train.batch_size)
        print(f"timing a {trials}-trial sweep ...", flush=True)
        sweep_config = perf_config(quick, data, weights, scratch, views=4)
        sweep_config.sweep.trials = trials
        sweep_config.sweep.unfreeze = [0, 1]  # as configs/yes-no-sweep.toml: deeper costs ~20 min a trial here
        started = time.perf_counter()
        sweep.run(sweep_config)
        sweep_seconds = time.perf_counter() - started

    rows = [("phase 1 (s)", "phase1"), ("phase 2 (s)", "phase2"), ("set-up: build, decode (s)", "setup"),
            ("whole two-phase run (s)", "whole"), ("epochs run", "epochs"), ("validation accuracy", "accuracy")]
    lines = [
        "# Performance: tumorbench vs the seeds' pipeline",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node() or 'this machine'}: {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}, no GPU{' (QUICK run)' if quick else ''}.",
        f"Data: {prepared.name} ({len(prepared.parts['train'])} train / {len(prepared.parts['val'])} val), vgg16 "
        f"at {ours_config.model.input_size} px, weights `{weights}`, {ours_config.train.epochs1} + "
        f"{ours_config.train.epochs2} epochs (early stopping on), batch {ours_config.train.batch_size}, seed "
        f"{ours_config.seed}. (a) streams every epoch through the whole model with on-the-fly augmentation; (b) "
        f"caches the frozen layers' outputs for {ours_config.train.cache_views} augmented views (cache building "
        "counted in its phase times).",
        "",
        "| | (a) baseline | (b) tumorbench | (a) / (b) |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        ratio = f"{baseline[key] / ours[key]:.1f}x" if key in ("phase1", "phase2", "whole") and ours[key] else ""
        fmt = "{:.3f}" if key == "accuracy" else "{:.0f}" if key == "epochs" else "{:.1f}"
        lines.append(f"| {label} | {fmt.format(baseline[key])} | {fmt.format(ours[key])} | {ratio} |")
    lines += [
        "",
        f"Sweep: {trials} trials (unfreeze 0-1, median pruner, caches warm from (b)) took {sweep_seconds:.0f} s = "
        f"{sweep_seconds / ours['whole']:.1f}x one (b) run ({ours['whole']:.0f} s); {trials} separate runs would "
        f"cost {trials}x.",
        "",
        f"Inference, batch {ours_config.train.batch_size}, median of 5 alternating runs: `predict`'s path (tf.data "
        f"over decoded images, preprocessing, whole model; file decoding not counted) {predict_ips:.1f} images/s; "
        f"raw backbone forward on ready tensors "
        f"{raw_ips:.1f} images/s; ratio {predict_ips / raw_ips:.2f}.",
        "",
    ]
    return "\n".join(lines)
