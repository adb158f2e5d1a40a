"""`make perf`: this project's trainer against the seeds' way, side by side in one process.

(a) baseline: the whole model every epoch, augmentation on the fly, frozen layers recomputed;
(b), (c) tumorbench: frozen layers computed once per augmented view (4, 2) and cached.
Same data, split, epochs, seed and weights. Then an N-trial sweep against one trial, and
inference images/s through the predict path against the raw backbone forward.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

from . import intake, metrics, pipeline, recipe, sweep
from .config import TrainConfig, load_config
from .trainer import train_two_phase

YES_NO = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "brain-mri-yes-no"


def perf_config(quick: bool, data: str, weights: str, results_dir: str, views: int):
    """The seeds' recipe (configs/experiments/yes-no.toml) with `views` cached views (0: streamed, the seeds' way).

    Early stopping can't trigger (patience = all epochs), so every side trains the seeds' epochs
    and the times compare the same amount of training; each keeps its best epoch by val loss.
    """
    data = data or (str(YES_NO) if YES_NO.is_dir() and not quick else "")
    size = "64" if quick else "224"
    epochs1, epochs2 = (2, 2) if quick else (20, 15)
    overrides = [
        f'data.path="{data}"', 'data.phantom_mode="binary"', "data.phantom_per_class=24", "data.phantom_size=64",
        f'model.weights="{weights}"', 'model.backbones=["vgg16"]', f"model.input_size={size}",
        f"train.epochs1={epochs1}", f"train.epochs2={epochs2}", f"train.patience={epochs1 + epochs2}",
        "train.verbose=0", f"train.cache_views={views}", f'tracking.results_dir="{results_dir}"',
        "tracking.log_model=false",
    ]
    return load_config(None, overrides)


def timed_run(config, prepared) -> dict:
    """One two-phase run without tracking: per-phase and whole times, validation accuracy."""
    started = time.perf_counter()
    built = recipe.build(config, prepared, "vgg16", config.model.weights)
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
    pipeline.ensemble_probabilities([(built.model, built.spec.preprocess)], decoded, batch_size)
    built.base.predict(ready, batch_size=batch_size, verbose=0)
    for _ in range(repeats):  # alternate the two, so machine noise hits both alike
        started = time.perf_counter()
        pipeline.ensemble_probabilities([(built.model, built.spec.preprocess)], decoded, batch_size)
        timings["predict"].append(len(samples) / (time.perf_counter() - started))
        started = time.perf_counter()
        built.base.predict(ready, batch_size=batch_size, verbose=0)
        timings["raw"].append(len(samples) / (time.perf_counter() - started))
    return statistics.median(timings["predict"]), statistics.median(timings["raw"])


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux VmHWM; memory-mapped cache pages count)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 2**20


def timed_sweep(quick: bool, data: str, weights: str, results_dir: str, trials: int) -> dict:
    """`trials` trials of the yes/no study as configs/yes-no-sweep.toml sets it (early stopping and
    the median pruner on, one process per trial), on the caches (b) left behind."""
    config = perf_config(quick, data, weights, results_dir, views=4)
    config.train.patience = TrainConfig().patience
    config.sweep.trials = trials
    config.sweep.unfreeze = [0, 1]  # as configs/yes-no-sweep.toml: deeper costs ~20 min a trial here
    started = time.perf_counter()
    sweep.run(config)
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name=f"{recipe.dataset_name(config)}-vgg16", storage=sweep.storage_url(config))
    states = [t.state.name.lower() for t in study.trials]
    return {"seconds": seconds, "states": {state: states.count(state) for state in sorted(set(states))},
            "unfreeze1": sum(t.params.get("unfreeze") == 1 for t in study.trials)}


ARMS = (("(a) seeds' way", 0), ("(b) tumorbench, 4 views", 4), ("(c) tumorbench, 2 views", 2))


def run(quick: bool = False, data: str = "", weights: str = "none", trials: int = 0) -> str:
    trials = trials or (3 if quick else 20)
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["TUMORBENCH_CACHE"] = str(Path(scratch) / "cache")  # cold caches, counted in (b) and (c)
        configs = [perf_config(quick, data, weights, scratch, views) for _, views in ARMS]
        prepared = recipe.prepare_data(configs[0])
        for part in ("train", "val"):
            pipeline.decoded_images(prepared.dataset, prepared.parts[part], configs[0].model.input_size)
        timed = []
        for (label, _), config in zip(ARMS, configs):
            print(f"timing {label} ...", flush=True)
            timed.append(timed_run(config, prepared))
        baseline, ours = timed[0], timed[1]
        predict_ips, raw_ips = throughput(ours["built"], prepared, configs[1].train.batch_size)
        print(f"timing a {trials}-trial sweep ...", flush=True)
        swept = timed_sweep(quick, data, weights, scratch, trials)

    config = configs[1]
    rows = [("phase 1 (s)", "phase1"), ("phase 2 (s)", "phase2"), ("set-up: build, decode (s)", "setup"),
            ("whole two-phase run (s)", "whole"), ("epochs run", "epochs"), ("validation accuracy", "accuracy")]
    lines = [
        "# Performance: tumorbench vs the seeds' pipeline",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node() or 'this machine'}: {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}, no GPU{' (QUICK run)' if quick else ''}; one process, "
        "the runs one after another.",
        f"Data: {prepared.name} ({len(prepared.parts['train'])} train / {len(prepared.parts['val'])} val, "
        f"duplicate-aware split), vgg16 at {config.model.input_size} px, weights `{weights}`, the seeds' "
        f"{config.train.epochs1} + {config.train.epochs2} epochs, all of them (early stopping can't trigger; "
        f"each side keeps its best epoch by val loss), batch {config.train.batch_size}, seed {config.seed}. "
        "(a) runs every epoch through the whole model with on-the-fly augmentation; (b) and (c) compute the "
        "frozen layers once per augmented view and train from that cache (building it is counted in their "
        "phase times; decoded images were cached before any timing).",
        "",
        "| | " + " | ".join(label for label, _ in ARMS) + " | (a) / (b) | (a) / (c) |",
        "|---|" + "---|" * (len(ARMS) + 2),
    ]
    for label, key in rows:
        fmt = "{:.3f}" if key == "accuracy" else "{:.0f}" if key == "epochs" else "{:.1f}"
        ratios = [f"{baseline[key] / arm[key]:.1f}x" if key in ("phase1", "phase2", "whole") and arm[key] else ""
                  for arm in timed[1:]]
        lines.append(f"| {label} | " + " | ".join(fmt.format(arm[key]) for arm in timed) + " | "
                     + " | ".join(ratios) + " |")
    states = ", ".join(f"{n} {state}" for state, n in swept["states"].items())
    lines += [
        "",
        f"Sweep: {trials} trials as configs/yes-no-sweep.toml runs them (lr1, lr2, dropout, head width, unfreeze "
        f"0-1; early stopping patience {TrainConfig().patience}, median pruner, one process per trial, caches warm "
        f"from (b)) took {swept['seconds']:.0f} s = {swept['seconds'] / ours['whole']:.1f}x one (b) run "
        f"({ours['whole']:.0f} s), {swept['seconds'] / trials:.0f} s a trial; {trials} separate (b) runs would "
        f"cost {trials}x. Trials: {states}; {swept['unfreeze1']} of them fine-tuned block5.",
        "",
        f"Inference, batch {config.train.batch_size}, median of 5 alternating runs: `predict`'s path (tf.data "
        f"over decoded images, preprocessing, whole model; file decoding not counted) {predict_ips:.1f} images/s; "
        f"raw backbone forward on ready tensors {raw_ips:.1f} images/s; ratio {predict_ips / raw_ips:.2f}.",
        "",
        f"Peak resident memory of this process: {peak_rss_gb():.1f} GB (VmHWM; pages of the memory-mapped caches "
        "count).",
        "",
    ]
    return "\n".join(lines)


def _memory_now(pid: int) -> dict[str, float]:
    """GB of /proc/<pid>/status's VmRSS, RssAnon (heap, tensors) and RssFile (mapped files, caches)."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "RssAnon", "RssFile")))
    return {key: int(value.split()[0]) / 2**20 for key, value in fields.items()}


def memory(data: str, size: int = 224, views: int = 2, backbones: str = "efficientnet_lite0",
           config_file: str = "configs/experiments/four-class-cv.toml") -> str:
    """Peak memory of a whole `bench` of the 4-class recipe (decoding, duplicate audit, feature
    cache, probe, fine-tuning, evaluation, model logging, report) on `data` at `size` px, one
    validation split instead of the config's folds, in a child process sampled every 0.2 s.

    Cold caches, so their building is inside the measurement. Epochs are 1 + 1: what an epoch
    holds in memory is the same for every epoch, only time grows with more.
    """
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "benchmark", "bench", "--config", config_file, "--data", data,
                   "--backbones", backbones]
        for override in ("data.folds=0", f"model.input_size={size}", f"train.cache_views={views}",
                         "train.epochs1=1", "train.epochs2=1", "train.verbose=0",
                         f'tracking.results_dir="{scratch}"'):
            command += ["--set", override]
        env = {**os.environ, "TUMORBENCH_CACHE": str(Path(scratch) / "cache")}
        started = time.perf_counter()
        child = subprocess.Popen(command, env=env)
        peaks = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
        while child.poll() is None:
            try:
                now = _memory_now(child.pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                break
            peaks = {key: max(peaks[key], now.get(key, 0.0)) for key in peaks}
            time.sleep(0.2)
        if child.wait() != 0:
            raise RuntimeError(f"the measured bench failed with exit code {child.returncode}: {' '.join(command)}")
        seconds = time.perf_counter() - started
        on_disk = {folder.name: sum(f.stat().st_size for f in folder.glob("*.npy")) / 2**30
                   for folder in sorted((Path(scratch) / "cache" / "arrays").iterdir())}
    images = len(intake.load_dataset(data).digests)
    return "\n".join([
        f"# Memory: `bench` on {intake.data_set_name(data)} at {size} px",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node() or 'this machine'} ({os.cpu_count()} CPU cores, "
        f"no GPU) by `python -m benchmark perf --memory {data}`: {backbones} (in one process, one after another), "
        f"{images} images, {config_file} on one validation split with {size} px, {views} cached views, "
        f"1 + 1 epochs, cold caches; "
        f"{seconds / 60:.0f} min.",
        "",
        "| peak over the run (GB) | |",
        "|---|---:|",
        f"| resident (VmRSS) | {peaks['VmRSS']:.2f} |",
        f"| anonymous: heap, tensors, arrays in RAM (RssAnon) | {peaks['RssAnon']:.2f} |",
        f"| file-backed: memory-mapped caches and libraries (RssFile) | {peaks['RssFile']:.2f} |",
        "",
        "Caches written (GB on disk): " + ", ".join(f"{kind} {gb:.2f}" for kind, gb in on_disk.items()) + ".",
        "",
        "How it is bounded: images are decoded once into a uint8 file per input size and split, and "
        "batches are gathered from its memory map; frozen-layer outputs are written batch by batch into "
        "memory-mapped files and read back a batch at a time. File-backed pages are the kernel's page "
        "cache: they count in VmRSS while memory is free and are dropped, not swapped, when it is short. "
        "What must fit in RAM is the anonymous part: TensorFlow, the model and its optimizer state, one "
        "batch's activations for backpropagation (with every group trained, batches stream from the "
        "decoded-image map), and, when groups are frozen, the validation split's cached frozen outputs, "
        "held in RAM for the per-epoch validation pass.",
        "",
    ])
