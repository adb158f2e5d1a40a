"""The comparison table, built from MLflow runs alone (never from a process's memory)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from . import plots
from .tracking import KIND_TAG

HEADLINE = ["accuracy", "loss", "macro_f1", "roc_auc"]


SOURCES = {"bench": "bench", "sweep": "sweep-trial"}


def _trial_rank(run) -> tuple[float, int]:
    """Orders sweep trials best first as Optuna does: by score, ties to the earlier trial."""
    metric = run.data.tags.get("tumorbench.sweep_metric", "macro_f1")
    value = run.data.metrics.get(f"val_{metric}", np.nan)
    score = -np.inf if np.isnan(value) else (-value if metric == "loss" else value)
    return score, -int(run.data.tags.get("tumorbench.trial", 0))


def select_runs(client: MlflowClient, experiment_name: str, source: str = "bench") -> list:
    """Per backbone: the newest finished `bench` run, or the best finished `sweep` trial."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"MLflow has no experiment {experiment_name!r}; run `make {source}` for that data first")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{KIND_TAG}` = '{SOURCES[source]}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    chosen: dict[str, object] = {}
    for run in runs:
        name = run.data.params.get("backbone")
        if name not in chosen or (source == "sweep" and _trial_rank(run) > _trial_rank(chosen[name])):
            chosen[name] = run
    if not chosen:
        raise LookupError(f"experiment {experiment_name!r} has no finished {source} runs")
    return [chosen[name] for name in sorted(chosen)]


def comparison_table(runs: list) -> pd.DataFrame:
    rows = []
    for run in runs:
        m, p = run.data.metrics, run.data.params
        classes = json.loads(p["class_names"])
        row = {"backbone": p["backbone"], "weights": p["weights"]}
        if run.data.tags.get("tumorbench.trial"):
            row.update({"trial": int(run.data.tags["tumorbench.trial"]), "lr1": float(p["lr1"]),
                        "lr2": float(p["lr2"]), "unfreeze": int(p["unfreeze"]), "dropout": float(p["dropout"]),
                        "head_units": int(p["head_units"])})
        row.update({key: m.get(f"val_{key}", np.nan) for key in HEADLINE})
        for name in classes:
            for short, metric in (("P", "precision"), ("R", "recall"), ("F1", "f1")):
                row[f"{short}_{name}"] = m.get(f"val_{metric}_{name}", np.nan)
        if "test_accuracy" in m:
            row["test_accuracy"] = m["test_accuracy"]
            row["test_macro_f1"] = m.get("test_macro_f1", np.nan)
        row.update({
            "trainable_params": int(m.get("trainable_params", 0)),
            "total_params": int(m.get("total_params", 0)),
            "train_s": m.get("train_seconds", np.nan),
            "infer_ms_per_image": m.get("inference_ms_per_image", np.nan),
            "n_val": int(m.get("n_val", 0)),
            "run_id": run.info.run_id,
        })
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(value) -> str:
    if isinstance(value, float | np.floating):
        return "n/a" if np.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown(table: pd.DataFrame, title: str) -> str:
    lines = [f"# {title}", "", "Validation metrics unless marked test_; from MLflow runs.", "",
             "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def copy_run_figures(client: MlflowClient, runs: list, out_dir: Path) -> list[Path]:
    """Each run's training curves and confusion matrix, fetched from MLflow, as <backbone>-<figure>.png."""
    copied = []
    for run in runs:
        for figure in ("training_curves.png", "confusion_matrix_val.png"):
            with tempfile.TemporaryDirectory() as tmp:
                local = client.download_artifacts(run.info.run_id, figure, tmp)
                target = out_dir / f"{run.data.params['backbone']}-{figure}"
                shutil.copyfile(local, target)
                copied.append(target)
    return copied


def write(table: pd.DataFrame, out_dir: Path, title: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "comparison.md", "csv": out_dir / "comparison.csv", "png": out_dir / "comparison.png"}
    paths["md"].write_text(markdown(table, title))
    table.to_csv(paths["csv"], index=False)
    figure = plots.comparison_bars(table, ["accuracy", "macro_f1", "roc_auc"], title)
    figure.savefig(paths["png"], dpi=110)
    plots.plt.close(figure)
    return paths


def build(client: MlflowClient, experiment_name: str, results_dir: Path, source: str = "bench"):
    """Query MLflow, write results/<data set>/[sweep/]comparison.{md,csv,png}; returns (table, paths)."""
    runs = select_runs(client, experiment_name, source)
    table = comparison_table(runs)
    out_dir = Path(results_dir) / experiment_name / ("sweep" if source == "sweep" else "")
    title = f"{experiment_name}: {'best sweep trial per backbone' if source == 'sweep' else 'backbone comparison'}"
    paths = write(table, out_dir, title)
    copy_run_figures(client, runs, out_dir)
    return table, paths
