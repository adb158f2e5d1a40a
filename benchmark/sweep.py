"""Optuna studies over the two-phase recipe: one study per backbone and data set.

The objective (suggest, train, score) is separate from the model factory (recipe.build). Each
trial is an MLflow child run under the study's parent run; the parent gets the best trial and
Optuna's plots. Storage is Optuna's RDB storage: a SQLite file by default, PostgreSQL for many
workers, which then coordinate through the database alone.
"""
from __future__ import annotations

import copy
import ctypes
import multiprocessing
import os
import signal
import time
import warnings
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import mlflow
import optuna
import sqlalchemy.exc
import tensorflow as tf
from mlflow.tracking import MlflowClient

import backbones

from . import plots, recipe, redact, tracking
from .trainer import TrainingFailed

STUDY_ATTR_PARENT = "mlflow_parent_run_id"
JOIN_TIMEOUT_S = 600


class ConfigurationError(ValueError):
    """A sweep that can't run as configured (e.g. several workers on one SQLite file)."""


def storage_url(config) -> str:
    return config.sweep.storage or f"sqlite:///{Path(config.tracking.results_dir).resolve() / 'optuna.db'}"


def direction(metric: str) -> str:
    return "minimize" if metric == "loss" else "maximize"


def make_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=max(max_epochs, 2))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigurationError(f"sweep.pruner {name!r}: choose median, hyperband or none")


def open_study(config, name: str, worker: int) -> optuna.Study:
    """Create or load the study; heartbeats let a restart mark trials of killed workers failed."""
    beat = config.sweep.heartbeat_seconds
    url = storage_url(config)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=beat, grace_period=2 * beat)
    study = optuna.create_study(
        study_name=name, storage=storage, load_if_exists=True, direction=direction(config.sweep.metric),
        sampler=optuna.samplers.TPESampler(seed=config.seed + worker),
        pruner=make_pruner(config.sweep.pruner, config.train.epochs1 + config.train.epochs2),
    )
    optuna.storages.fail_stale_trials(study)  # trials of workers killed mid-run
    if study.metric_names is None:  # the dashboard then names the objective instead of "Objective 0"
        study.set_metric_names([f"val_{config.sweep.metric}"])
        study.set_user_attr("objective", f"val_{config.sweep.metric} of the epoch with the lowest validation loss "
                            "(the weights kept); it can differ from the last epoch's reported value")
    return study


def suggest(trial: optuna.Trial, config, spec) -> dict:
    """The recipe's free parameters for this trial, within the configured ranges. With LP-FT
    (train.head_init = "probe") the head is the linear probe, fitted in closed form: there is no
    head width or phase-1 learning rate to search."""
    space = config.sweep
    top = len(spec.group_names) if space.unfreeze[1] < 0 else space.unfreeze[1]
    params = {}
    if config.train.head_init != "probe":
        params["lr1"] = trial.suggest_float("lr1", *space.lr1, log=True)
    params["lr2"] = trial.suggest_float("lr2", *space.lr2, log=True)
    params["unfreeze"] = trial.suggest_int("unfreeze", space.unfreeze[0], top)
    params["dropout"] = trial.suggest_float("dropout", *space.dropout)
    if config.train.head_init != "probe":
        params["head_units"] = trial.suggest_int("head_units", *space.head_units, log=space.head_units[0] >= 1)
    return params


def trial_config(config, params: dict):
    trial = copy.deepcopy(config)
    trial.train.lr1 = params.get("lr1", config.train.lr1)
    trial.train.lr2, trial.train.unfreeze = params["lr2"], params["unfreeze"]
    trial.model.dropout = params["dropout"]
    trial.model.head_units = params.get("head_units", config.model.head_units)
    trial.tracking.log_model = False
    return trial


class OptunaPruning(keras.callbacks.Callback):
    """Reports the study's metric every epoch (one step axis across both phases) and prunes."""

    def __init__(self, trial: optuna.Trial, key: str):
        super().__init__()
        self.trial, self.key = trial, key

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.key)
        if value is None:
            return
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch + 1} ({self.key}={value:.4f})")


def rss_mb() -> float:
    """Resident memory of this process now (Linux), to show memory stays flat over a study."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_objective(config, prepared, spec, weights: str, experiment: str, parent_id: str, study_name: str):
    metric = config.sweep.metric

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, config, spec)
        tconfig = trial_config(config, params)
        built = recipe.build(tconfig, prepared, spec.name, weights)  # clears the Keras session first
        tags = {tracking.KIND_TAG: "sweep-trial", "mlflow.parentRunId": parent_id, "tumorbench.study": study_name,
                "tumorbench.trial": str(trial.number), "tumorbench.sweep_metric": metric,
                **tracking.provenance_tags()}
        with mlflow.start_run(experiment_id=experiment, run_name=f"{spec.name}-trial-{trial.number}", tags=tags):
            try:
                outcome = recipe.train_and_log(tconfig, prepared, built,  # a study never scores test
                                              callbacks=[OptunaPruning(trial, f"val_{metric}")],
                                              score_key=metric, trial=True)
            except optuna.TrialPruned as pruned:
                mlflow.set_tags({"tumorbench.state": "PRUNED", "pruned": str(pruned)})
                mlflow.log_metric("rss_mb", rss_mb())
                mlflow.end_run(status="KILLED")
                raise
            except (TrainingFailed, tf.errors.ResourceExhaustedError, MemoryError) as err:
                reason = f"{type(err).__name__}: {err}"
                trial.set_user_attr("fail_reason", reason)
                mlflow.set_tags({"tumorbench.state": "FAIL", "failure": reason})
                mlflow.end_run(status="FAILED")
                raise
            memory = rss_mb()
            trial.set_user_attr("rss_mb", memory)
            trial.set_user_attr("mlflow_run_id", mlflow.active_run().info.run_id)
            mlflow.log_metric("rss_mb", memory)
            mlflow.set_tag("tumorbench.state", "COMPLETE")
            print(f"-- {study_name} trial {trial.number}: val_{metric}={outcome['val'][metric]:.4f} "
                  f"params={params} rss={memory:.0f} MB", flush=True)
            return outcome["val"][metric]

    return objective


def wait_for_study(config, name: str, timeout: float = JOIN_TIMEOUT_S) -> None:
    """Workers other than 0 join a study only once worker 0 has created it and its parent run,
    so stores are initialised and the parent opened exactly once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if STUDY_ATTR_PARENT in optuna.load_study(study_name=name, storage=storage_url(config)).user_attrs:
                return
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # no such study yet, or its schema still being made
            pass
        time.sleep(2)
    raise ConfigurationError(f"study {name!r} did not appear within {timeout:.0f} s: start worker 0 first")


def parent_run(client: MlflowClient, study: optuna.Study, experiment: str, config, spec_name: str) -> str:
    """The study's parent MLflow run, opened by worker 0 and found by the others."""
    parent = study.user_attrs.get(STUDY_ATTR_PARENT)
    if parent is None:
        run = client.create_run(experiment, run_name=f"study-{study.study_name}",
                                tags={tracking.KIND_TAG: "sweep-study", "tumorbench.study": study.study_name,
                                      "tumorbench.backbone": spec_name})
        parent = run.info.run_id
        study.set_user_attr(STUDY_ATTR_PARENT, parent)
        client.log_text(parent, config.to_toml(), "config.toml")
    else:
        client.update_run(parent, status="RUNNING")
    return parent


def finished_count(study: optuna.Study) -> int:
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return len(study.get_trials(deepcopy=False, states=done))


def summarise(client: MlflowClient, study: optuna.Study, parent: str, out_dir: Path, spec_name: str, metric: str):
    """Best trial's params and metrics onto the parent run; plots and the trial table on disk and in MLflow."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    trials = trials.rename(columns={f"value_val_{metric}": "value"})  # a named objective's column
    trials.to_csv(out_dir / f"{spec_name}-trials.csv", index=False)
    client.log_artifact(parent, str(out_dir / f"{spec_name}-trials.csv"))
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if completed:
        best = study.best_trial
        # tags, not params: MLflow params can't change, and the best trial does as workers and reruns add trials
        # Workers finishing together both summarise the parent: race_safe lets the later write update.
        tags = {f"best_{k}": str(v) for k, v in best.params.items()} | {"best_trial": str(best.number)}
        if best.user_attrs.get("mlflow_run_id"):
            tags["best_run_id"] = best.user_attrs["mlflow_run_id"]
        tracking.race_safe(client.log_batch, parent, tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()],
                           metrics=[mlflow.entities.Metric(f"best_val_{metric}", best.value,  # step: trials so far
                                                           int(time.time() * 1000), len(completed))])
    target = f"val_{metric} (best epoch)"
    figures = {"unfreeze_depth": lambda: plots.score_by_unfreeze(trials, target, study.study_name)}
    if completed:
        figures["optimization_history"] = lambda: optuna.visualization.matplotlib.plot_optimization_history(
            study, target_name=target)
    if len(completed) >= 2:
        figures["param_importances"] = lambda: optuna.visualization.matplotlib.plot_param_importances(
            study, target_name=target)
    for name, draw in figures.items():
        drawn = draw()  # optuna's plots return Axes, ours a Figure
        figure = drawn if isinstance(drawn, plt.Figure) else drawn.figure
        if not isinstance(drawn, plt.Figure):  # name the study (data set and backbone) and the metric
            drawn.set_title(f"{study.study_name}: {drawn.get_title()} of {target}", fontsize=9)
        figure.set_size_inches(7, 4.5)
        figure.tight_layout()
        path = out_dir / f"{spec_name}-{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        client.log_artifact(parent, str(path))
    client.set_terminated(parent, "FINISHED")


def run(config, worker: int = 0, workers: int = 1) -> None:
    """Run (or continue) one study per configured backbone until each has `sweep.trials` finished trials."""
    if workers > 1 and storage_url(config).startswith("sqlite"):
        raise ConfigurationError("several workers need a shared server storage: set STORAGE=postgresql://...; "
                                 "SQLite files are for one worker")
    backbones.load_plugins(config.plugins)
    for name in config.model.backbones:
        backbones.get(name)
    make_pruner(config.sweep.pruner, 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if worker > 0:
        wait_for_study(config, f"{recipe.dataset_name(config)}-{config.model.backbones[0]}")
    client = tracking.connect(config.tracking)
    weights = recipe.resolve_weights(config)
    prepared = recipe.prepare_data(config)
    experiment = tracking.experiment_id(client, prepared.name, config.tracking)
    for name in config.model.backbones:
        if worker > 0:
            wait_for_study(config, f"{prepared.name}-{name}")
        study = open_study(config, f"{prepared.name}-{name}", worker)
        remaining = config.sweep.trials - finished_count(study)
        print(f"study {study.study_name} ({redact.mask(storage_url(config))}): "
              f"{finished_count(study)} finished, {max(remaining, 0)} to go (worker {worker})", flush=True)
        parent = parent_run(client, study, experiment, config, name)
        if config.sweep.process_per_trial:
            context = multiprocessing.get_context("spawn")
            while finished_count(study) < config.sweep.trials:
                seed = worker * 100_003 + len(study.get_trials(deepcopy=False))  # distinct and repeatable
                child = context.Process(target=_trial_in_child, args=(config, name, seed, parent, experiment))
                child.start()
                child.join()
                if child.exitcode != 0:
                    raise RuntimeError(f"trial process for {study.study_name} died with exit code {child.exitcode}")
        elif remaining > 0:
            optimize(config, prepared, study, name, weights[name], experiment, parent, remaining)
        summarise(client, study, parent, Path(config.tracking.results_dir) / prepared.name / "sweep", name,
                  config.sweep.metric)
        best = study.best_trial if study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) else None
        if best:
            print(f"== {study.study_name}: best trial {best.number} val_{config.sweep.metric}={best.value:.4f} "
                  f"{best.params}", flush=True)


def optimize(config, prepared, study, name, weights, experiment, parent, n_trials: int) -> None:
    """Run up to `n_trials` trials in this process; the study stops at `sweep.trials` finished ones."""
    study.optimize(
        make_objective(config, prepared, backbones.get(name), weights, experiment, parent, study.study_name),
        n_trials=n_trials, gc_after_trial=True,
        catch=(TrainingFailed, tf.errors.ResourceExhaustedError, MemoryError),
        callbacks=[optuna.study.MaxTrialsCallback(config.sweep.trials, states=(
            optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL))],
    )


def _trial_in_child(config, name: str, seed: int, parent: str, experiment: str) -> None:
    """One trial in a fresh process, which dies with its worker (so kill -9 of a worker stops it too)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    redact.mask_output()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    backbones.load_plugins(config.plugins)
    tracking.connect(config.tracking)
    prepared = recipe.prepare_data(config)
    study = open_study(config, f"{prepared.name}-{name}", seed)
    optimize(config, prepared, study, name, recipe.resolve_weights(config)[name], experiment, parent, 1)
