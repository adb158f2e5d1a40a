"""`make perf`: where the time of a whole run goes, and this project's trainer against the seeds' way.

`run` (the default): the recommended recipe (configs/four-class-fast.toml) as three `bench` commands,
one after another: with cold caches, again with them warm, and the seeds' way (the whole model every
epoch, augmentation on the fly) at the same epochs; each stage's seconds from MLflow, the accuracies
and the paired difference. `yes_no_run`: vgg16 on the yes/no set, (a) the seeds' way against (b), (c)
frozen layers cached per augmented view (4, 2) in one process, an N-trial sweep against one trial,
and inference images/s through the predict path against the raw backbone forward.
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
import pandas as pd
from mlflow.tracking import MlflowClient

from . import intake, metrics, pipeline, recipe, report, sweep, tracking
from .config import TrainConfig, load_config
from .trainer import train_two_phase

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
YES_NO = SHARED / "brain-mri-yes-no"
RUN_CONFIG = "configs/four-class-fast.toml"
# The stages of a run in the order it meets them (stopwatch names, as MLflow's stage_<name>_seconds).
STAGES = ("intake", "duplicate groups", "decoding", "build", "probe", "cache", "training", "evaluation", "tta",
          "inference timing", "gradcam", "model logging")


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


def yes_no_run(quick: bool = False, data: str = "", weights: str = "none", trials: int = 0) -> str:
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


def bench_arm(config_file: str, data: str, cache: Path, store: Path, overrides: list[str]) -> dict:
    """One `bench` command in a fresh process with its own cache folder and MLflow store: its wall
    time, its run's stage seconds and metrics, epochs and validation predictions."""
    uri = f"sqlite:///{store / 'mlflow.db'}"
    command = [sys.executable, "-m", "benchmark", "bench", "--config", config_file]
    command += ["--data", data] if data else []
    for override in (f'tracking.results_dir="{store}"', f'tracking.uri="{uri}"', *overrides):
        command += ["--set", override]
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "TUMORBENCH_CACHE": str(cache)}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the timed bench failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    client = MlflowClient(uri)
    [run] = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
             if r.data.tags.get(tracking.KIND_TAG) == "bench"]
    with tempfile.TemporaryDirectory() as tmp:
        predictions = pd.read_csv(client.download_artifacts(run.info.run_id, "predictions_val.csv", tmp))
    stages = {key.removeprefix("stage_").removesuffix("_seconds").replace("_", " "): value
              for key, value in run.data.metrics.items() if key.startswith("stage_")}
    return {"wall": wall, "stages": stages, "metrics": run.data.metrics, "params": run.data.params,
            "epochs": len(client.get_metric_history(run.info.run_id, "epoch_phase")), "predictions": predictions,
            "data_set": client.get_experiment(run.info.experiment_id).name}


def run(data: str = "", config_file: str = RUN_CONFIG, quick: bool = False) -> str:
    """The recipe's whole run timed stage by stage on `data` (default: the config's): cold caches,
    warm caches, and the seeds' way (cache_views = 0: the whole model every epoch on freshly
    augmented images), same epochs."""
    if quick:  # a smoke check of this script on phantoms, seconds per arm
        config_file, data = "configs/quick.toml", ""
    small = ['model.backbones=["efficientnet_lite0"]', "model.input_size=64", "train.epochs2=1"] if quick else []
    arms = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for label, cache, overrides in (("cold caches", "cache", []), ("warm caches", "cache", []),
                                        ("seeds' way", "cache-seeds", ["train.cache_views=0"])):
            print(f"timing the run, {label} ...", flush=True)
            arms[label] = bench_arm(config_file, data, root / cache, root / label.replace(" ", "-"),
                                    [*small, *overrides])
    return run_report(arms, config_file, quick)


def run_report(arms: dict[str, dict], config_file: str, quick: bool = False) -> str:
    """results/perf.md from the timed arms (bench_arm's dicts, keyed by label; the first is the cold
    run the others are compared with)."""
    labels = list(arms)
    cold, seeds = arms[labels[0]], arms[labels[-1]]
    params = cold["params"]
    stages = [name for name in STAGES if any(name in arm["stages"] for arm in arms.values())]
    stages += sorted({name for arm in arms.values() for name in arm["stages"]} - set(stages))

    def row(label: str, values: list[float], fmt: str = "{:.0f}", ratio: bool = True) -> str:
        cells = [fmt.format(v) if np.isfinite(v) else "" for v in values]
        quotient = f"{values[-1] / values[0]:.1f}x" if ratio and values[0] > 0 and np.isfinite(values[-1]) else ""
        return f"| {label} | " + " | ".join(cells) + f" | {quotient} |"

    lines = [
        "# Performance: where a run's time goes, and the cached trainer against the seeds' way",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node() or 'this machine'}: {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}, no GPU{' (QUICK run)' if quick else ''}, by `make perf`: "
        f"`{config_file}` ({params['backbone']} `{params['weights']}` at {params['input_size']} px, "
        f"{params['epochs2']} epoch(s) of phase 2 on the top {params['unfreeze']} groups after a linear probe, "
        f"{params['cache_views']} cached views) on {cold['data_set']} "
        f"({params['n_train']} train / {params['n_val']} validation images), as three `bench` commands one after "
        "another, each a fresh process: with an empty tumorbench cache (decoded images, hashes, frozen-layer "
        "outputs, converted weights), again with that cache warm, and the seeds' way (`train.cache_views = 0`: "
        "the whole model every epoch on freshly augmented images) from an empty cache. The operating system's "
        "file cache was not dropped. Stage seconds are the run's `stage_<name>_seconds` metrics; 'other' is "
        "the rest of the command's wall time (start-up and imports, MLflow, the report).",
        "",
        "| seconds | " + " | ".join(labels) + f" | {labels[-1]} / {labels[0]} |",
        "|---|" + "---:|" * (len(labels) + 1),
    ]
    for name in stages:
        lines.append(row(name, [arm["stages"].get(name, 0.0) for arm in arms.values()]))
    walls = [arm["wall"] for arm in arms.values()]
    others = [arm["wall"] - sum(arm["stages"].values()) for arm in arms.values()]
    outside = [100 * (arm["wall"] - arm["stages"].get("training", 0.0)) / arm["wall"] for arm in arms.values()]
    lines += [row("other", others), row("**whole command**", walls),
              row("outside the training epochs (%)", outside, ratio=False), ""]
    lines += ["| validation | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for key, label in (("val_accuracy", "accuracy"), ("val_macro_f1", "macro-F1"),
                       ("tta_val_accuracy", "accuracy with the flip")):
        lines.append(f"| {label} | " + " | ".join(f"{arm['metrics'].get(key, np.nan):.4f}" for arm in arms.values())
                     + " |")
    lines.append("| epochs run | " + " | ".join(str(arm["epochs"]) for arm in arms.values()) + " |")
    paired = report.pair("val", labels[0], cold["predictions"], labels[-1], seeds["predictions"], 2000)
    repeat = arms[labels[1]]["predictions"]
    columns = [c for c in repeat.columns if c.startswith("prob_")]
    same = np.abs(repeat.sort_values("source")[columns].to_numpy()
                  - cold["predictions"].sort_values("source")[columns].to_numpy()).max()
    lines += [
        "",
        f"Paired on the same {paired['n_images']} validation images, {labels[0]} minus {labels[-1]}: accuracy "
        f"{paired['accuracy_diff']:+.4f} [{paired['accuracy_diff_ci_low']:+.4f}, "
        f"{paired['accuracy_diff_ci_high']:+.4f}] (paired bootstrap, 95%), macro-F1 {paired['macro_f1_diff']:+.4f} [{paired['macro_f1_diff_ci_low']:+.4f}, "
        f"{paired['macro_f1_diff_ci_high']:+.4f}]; right only with the cache {paired['only_a_right']}, only the "
        f"seeds' way {paired['only_b_right']}, McNemar p = {paired['mcnemar_p']:.2f}. The warm run's probabilities "
        f"differ from the cold run's by at most {same:.1e}.",
        "",
    ]
    return "\n".join(lines)
