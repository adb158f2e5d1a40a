"""The comparison table, built from MLflow runs alone (never from a process's memory)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from . import plots
from .tracking import KIND_TAG

HEADLINE = ["accuracy", "loss", "macro_f1", "roc_auc"]


def latest_runs(client: MlflowClient, experiment_name: str, source: str = "bench") -> list:
    """The newest finished run per backbone of `source` ('bench' runs) in the experiment."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"MLflow has no experiment {experiment_name!r}; run `make bench` for that data first")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{KIND_TAG}` = '{source}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    newest: dict[str, object] = {}
    for run in runs:
        newest.setdefault(run.data.params.get("backbone"), run)
    if not newest:
        raise LookupError(f"experiment {experiment_name!r} has no finished {source} runs")
    return [newest[name] for name in sorted(newest)]


def comparison_table(runs: list) -> pd.DataFrame:
    rows = []
    for run in runs:
        m, p = run.data.metrics, run.data.params
        classes = json.loads(p["class_names"])
        row = {"backbone": p["backbone"], "weights": p["weights"]}
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
    """Query MLflow, write results/<data set>/comparison.{md,csv,png}; returns (table, paths)."""
    table = comparison_table(latest_runs(client, experiment_name, source))
    return table, write(table, Path(results_dir) / experiment_name, f"{experiment_name}: backbone comparison")
