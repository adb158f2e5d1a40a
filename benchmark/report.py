"""The comparison table, built from MLflow runs alone (never from a process's memory)."""
from __future__ import annotations

import itertools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import plots, stats
from .config import fold_recipe
from .tracking import KIND_TAG, REGISTERED_TAG, SCORED_ON, register_champion

HEADLINE = ["accuracy", "loss", "macro_f1", "roc_auc", "ece"]
BINARY = ["sensitivity", "specificity", "target_threshold", "target_sensitivity", "target_specificity"]
SOURCES = {"bench": "bench", "cv": "bench-cv", "sweep": "sweep-trial"}
# The prediction files paired_comparisons pairs, per split, for each kind of run: tta_*, the same
# models with the test-time flip (absent when evaluate.tta was off); sweep trials score validation
# alone, without the flip; a cross-validation's test split is scored by its fold models together.
PREDICTIONS = {"bench": {"val": "predictions_val.csv", "tta_val": "predictions_tta_val.csv",
                         "test": "predictions_test.csv", "tta_test": "predictions_tta_test.csv"},
               "sweep": {"val": "predictions_val.csv"},
               "cv": {"oof": "predictions_oof.csv", "tta_oof": "predictions_tta_oof.csv",
                      "test": "predictions_ensemble_test.csv"}}


def _trial_rank(run) -> tuple[float, int]:
    """Orders sweep trials best first as Optuna does: by score, ties to the earlier trial."""
    metric = run.data.tags.get("tumorbench.sweep_metric", "macro_f1")
    value = run.data.metrics.get(f"val_{metric}", np.nan)
    score = -np.inf if np.isnan(value) else (-value if metric == "loss" else value)
    return score, -int(run.data.tags.get("tumorbench.trial", 0))


def select_runs(client: MlflowClient, experiment_name: str, source: str = "bench", made=(), only=()) -> list:
    """Per backbone: the run among `made` (the runs the calling command just made), else the newest
    finished `bench` (or cross-validated `cv`) run, or the best finished `sweep` trial. `made` wins
    because a command that started later, beside this one, would otherwise fill its table. Only runs
    scored on the same held-out images as `made` (else as the newest of them) join it: a backbone
    last run on other folds or another split is left out, with a line saying so. `only`: exactly
    these runs (`report --runs`), e.g. several backbones on one split, or one backbone's recipes."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"MLflow has no experiment {experiment_name!r}; run `make bench` for that data first")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{KIND_TAG}` = '{SOURCES[source]}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    if only:
        return _exactly(runs, list(only), experiment_name, source)
    chosen: dict[str, object] = {}
    for run in runs:
        name = run.data.params.get("backbone")
        if name not in chosen or (source == "sweep" and _trial_rank(run) > _trial_rank(chosen[name])):
            chosen[name] = run
    chosen.update({run.data.params.get("backbone"): run for run in runs if run.info.run_id in made})
    if not chosen:
        raise LookupError(f"experiment {experiment_name!r} has no finished {source} runs")
    anchor = next((run for run in runs if run.info.run_id in made), None) or max(
        chosen.values(), key=lambda run: run.info.start_time)
    for name in sorted(chosen):
        run = chosen[name]
        if run.data.params.get(SCORED_ON) != anchor.data.params.get(SCORED_ON):
            print(f"left out of the table: {name} run {run.info.run_id}, scored on other held-out images "
                  f"(other folds or split) than run {anchor.info.run_id}", file=sys.stderr, flush=True)
            del chosen[name]
    return [chosen[name] for name in sorted(chosen)]


def _exactly(runs: list, run_ids: list[str], experiment_name: str, source: str) -> list:
    by_id = {run.info.run_id: run for run in runs}
    missing = [run_id for run_id in run_ids if run_id not in by_id]
    if missing:
        hint = ("a cross-validated run is named by its parent" if source == "cv"
                else "a cross-validated run needs --source cv")
        raise LookupError(f"not finished {source} runs of experiment {experiment_name!r}: "
                          f"{', '.join(missing)}; {hint}")
    chosen = [by_id[run_id] for run_id in dict.fromkeys(run_ids)]
    return sorted(chosen, key=lambda run: run.data.params.get("backbone", ""))


def recipe_differences(client: MlflowClient, runs: list) -> dict[str, str]:
    """For a backbone tabled more than once (`report --runs`, recipes compared), what tells its runs
    apart, per run id: the recipe settings (config.fold_recipe of the config saved with each run)
    whose values differ among them, as `train.epochs2=12, train.cache_views=4`; its run id where
    the saved configs do not tell it apart. Backbones tabled once get nothing."""
    by_backbone: dict[str, list] = {}
    for run in runs:
        by_backbone.setdefault(run.data.params.get("backbone"), []).append(run)
    texts = {}
    for same in (same for same in by_backbone.values() if len(same) > 1):
        settings = {run.info.run_id: _recipe_settings(client, run) for run in same}
        keys = list(dict.fromkeys(key for values in settings.values() for key in values))
        differ = [key for key in keys if len({repr(values.get(key)) for values in settings.values()}) > 1]
        for run_id, values in settings.items():
            texts[run_id] = ", ".join(f"{key}={values[key]}" for key in differ if key in values) or f"run {run_id}"
    return texts


def _recipe_settings(client: MlflowClient, run) -> dict:
    """The run's saved recipe as flat `section.key` settings; none when it saved no readable config."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            text = Path(client.download_artifacts(run.info.run_id, "config.toml", tmp)).read_text()
        except (OSError, MlflowException):
            return {}
    settings = {}
    for name, value in (fold_recipe(text, int(run.data.params.get("input_size", 0))) or {}).items():
        if isinstance(value, dict):  # a [section]; top-level keys such as seed stay as they are
            settings.update({f"{name}.{key}": setting for key, setting in value.items()})
        else:
            settings[name] = value
    return settings


def row_name(backbone: str, recipe) -> str:
    """A table row's name in pairs and messages: its backbone, and its recipe (recipe_differences;
    empty or NaN when the table has one row for this backbone)."""
    return f"{backbone} ({recipe})" if isinstance(recipe, str) and recipe else backbone


SCORE = {"bench": "val_macro_f1", "cv": "val_macro_f1_mean"}


def register_best(client: MlflowClient, experiment_name: str, runs: list,
                  source: str = "bench") -> str | None:
    """The best of `runs` (select_runs; validation macro-F1, CV: its mean over folds) registered as
    tumorbench-<data set> with the `champion` alias, if it beats the current champion."""
    best = max(runs, key=lambda run: run.data.metrics.get(SCORE[source], -1.0))
    return register_champion(client, experiment_name, best, SCORE[source])


def _metric_names(classes: list[str]) -> list[str]:
    per_class = [f"{metric}_{name}" for name in classes for metric in ("precision", "recall", "f1")]
    return HEADLINE + (BINARY if len(classes) == 2 else []) + per_class


def comparison_table(runs: list, source: str = "bench", recipes: dict | None = None) -> pd.DataFrame:
    """One row per run (per backbone, unless `recipes`, recipe_differences, names what tells one
    backbone's runs apart: then a `recipe` column). Every metric column says its split (val_, test_);
    cross-validated runs give the mean over folds with its 95% CI as <column>_ci_low / _ci_high."""
    rows = []
    for run in runs:
        m, p = run.data.metrics, run.data.params
        classes = json.loads(p["class_names"])
        row = {"backbone": p["backbone"]}
        if recipes:
            row["recipe"] = recipes.get(run.info.run_id, "")
        row.update({"weights": "scratch" if p["weights"] == "none" else p["weights"],
                    "input_px": p.get("input_size", "n/a")})
        if source == "cv":
            scored = [n for n in p.get("folds_scored", "").split(",") if n]  # data.only_folds: some of k
            row["folds"] = (f"{'+'.join(scored)} of {p['folds']}" if scored and len(scored) < int(p["folds"])
                            else int(p["folds"]))
            row["members"] = int(p.get("members", 1))  # seed-ensemble models per fold (train.members)
        if run.data.tags.get("tumorbench.trial"):
            row.update({"trial": int(run.data.tags["tumorbench.trial"]), "lr1": float(p["lr1"]),
                        "lr2": float(p["lr2"]), "unfreeze": int(p["unfreeze"]), "dropout": float(p["dropout"]),
                        "head_units": int(p["head_units"])})
        for split in ("val", "test"):
            names = _metric_names(classes) if split == "val" else HEADLINE + (BINARY if len(classes) == 2 else [])
            if source == "cv" and f"{split}_accuracy_mean" in m:
                for name in names:
                    key = f"{split}_{name}"
                    row.update({key: m.get(f"{key}_mean", np.nan), f"{key}_ci_low": m.get(f"{key}_ci_low", np.nan),
                                f"{key}_ci_high": m.get(f"{key}_ci_high", np.nan)})
            elif f"{split}_accuracy" in m:
                row.update({f"{split}_{name}": m.get(f"{split}_{name}", np.nan) for name in names})
        if "ensemble_test_accuracy" in m:  # cross-validated with a test split: the fold models together
            row.update({f"ensemble_test_{name}": m.get(f"ensemble_test_{name}", np.nan) for name in HEADLINE})
        _add_probe(row, m, source)
        _add_scored_as(row, m, source, "tta")
        _add_scored_as(row, m, source, "member")
        if "far_oof_images" in m:  # out of fold, the images unlike anything their fold trained on
            row.update({"far_oof_accuracy": m.get("far_oof_accuracy", np.nan),
                        "far_oof_macro_f1": m.get("far_oof_macro_f1", np.nan), "far_oof_images": int(m["far_oof_images"])})
        row.update({
            "trainable_params": int(m.get("trainable_params", 0)),
            "total_params": int(m.get("total_params", 0)),
            "train_s": m.get("train_seconds", np.nan),
            "infer_ms_per_image": m.get("inference_ms_per_image", np.nan),
            ("n_images" if source == "cv" else "n_val"): int(float(p.get("n_images", m.get("n_val", 0)))),
            "registered": run.data.tags.get(REGISTERED_TAG, ""),
            "run_id": run.info.run_id,
        })
        rows.append(row)
    return pd.DataFrame(rows)


PROBE = ["accuracy", "macro_f1"]
FOLDS_BELOW_PROBE = "folds_below_probe"  # a cross-validated parent's metric: its folds below_probe


def _add_scored_as(row: dict, m: dict, source: str, prefix: str) -> None:
    """Accuracy and macro-F1 of the model scored another way (prefix probe_: the linear probe;
    tta_: with the test-time views; member_: a seed ensemble's members alone), as the plain figures
    are shown."""
    suffix = "_mean" if source == "cv" else ""
    for split in ("val", "test"):
        for name in PROBE:
            key = f"{prefix}_{split}_{name}"
            if f"{key}{suffix}" in m:
                row[key] = m[f"{key}{suffix}"]
                if source == "cv":
                    row.update({f"{key}_ci_low": m.get(f"{key}_ci_low", np.nan),
                                f"{key}_ci_high": m.get(f"{key}_ci_high", np.nan)})


def below_probe(scores: dict, probe: dict) -> list[str]:
    """The PROBE metrics in which a fine-tuned model scored below its own linear probe (equal is not
    below): a recipe bug, not a finding."""
    return [name for name in PROBE if scores.get(name, np.nan) < probe[name]]


def _row_below_probe(row) -> list[str]:
    """below_probe for a table row, from its val_* and probe_val_* figures."""
    return below_probe({name: row.get(f"val_{name}", np.nan) for name in PROBE},
                       {name: row.get(f"probe_val_{name}", np.nan) for name in PROBE})


def _add_probe(row: dict, m: dict, source: str) -> None:
    """The linear-probe baseline's accuracy and macro-F1 beside the fine-tuned ones, and a flag when
    fine-tuning ended below its own probe; cross-validated, also how many folds did (a mean above
    the probe's can hide them)."""
    _add_scored_as(row, m, source, "probe")
    if "probe_val_accuracy" in row:
        below = _row_below_probe(row)
        row["vs_probe"] = ("BELOW PROBE: " + ", ".join(below)) if below else "above or equal"
        if FOLDS_BELOW_PROBE in m:
            row[FOLDS_BELOW_PROBE] = int(m[FOLDS_BELOW_PROBE])
            if row[FOLDS_BELOW_PROBE]:
                row["vs_probe"] += f"; folds below it: {row[FOLDS_BELOW_PROBE]}"
    else:
        row["vs_probe"] = "no probe (scratch)" if row.get("weights") == "scratch" else "no probe"


def _predictions(client: MlflowClient, run, artifact: str) -> pd.DataFrame | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return pd.read_csv(client.download_artifacts(run.info.run_id, artifact, tmp))
        except (OSError, MlflowException):
            return None


ENSEMBLE = "ensemble of all"


def _aligned(frames: list[pd.DataFrame]) -> list[pd.DataFrame] | None:
    """Per-image prediction frames in one image order, or None when they did not score the same
    images with the same labels."""
    ordered = [frame.sort_values("source").reset_index(drop=True) for frame in frames]
    first = ordered[0]
    if any(len(f) != len(first) or not f["source"].equals(first["source"]) or not f["label"].equals(first["label"])
           for f in ordered):
        return None
    return ordered


def _probability_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("prob_")]


def _probabilities(frame: pd.DataFrame) -> np.ndarray:
    return frame[_probability_columns(frame)].to_numpy()


def _ensemble(frames: dict) -> pd.DataFrame | None:
    """Every row's probabilities averaged per image (what `predict <run>,<run>,...` computes), or None
    when the rows did not score the same images."""
    ordered = _aligned(list(frames.values()))
    if ordered is None:
        return None
    mean = np.mean([_probabilities(f) for f in ordered], axis=0)
    return pd.concat([ordered[0][["source", "label"]],
                      pd.DataFrame(mean, columns=_probability_columns(ordered[0]))], axis=1)


def pair(split: str, name_a: str, a: pd.DataFrame, name_b: str, b: pd.DataFrame, resamples: int) -> dict:
    """Two models' predictions of the same images: accuracies, the paired differences with bootstrap
    intervals, and McNemar's test (a note instead when the images differ)."""
    aligned = _aligned([a, b])
    if aligned is None:
        return {"split": split, "a": name_a, "b": name_b, "n_images": len(set(a["source"]) & set(b["source"])),
                "note": "not the same images; rerun both on the same data and split"}
    a, b = aligned
    pred_a, pred_b = _probabilities(a).argmax(axis=1), _probabilities(b).argmax(axis=1)
    truth = a["label"].to_numpy()
    row = {"split": split, "a": name_a, "b": name_b, "n_images": len(a),
           "accuracy_a": float(np.mean(pred_a == truth)), "accuracy_b": float(np.mean(pred_b == truth))}
    for metric_name, metric in (("accuracy", stats.accuracy), ("macro_f1", stats.macro_f1)):
        diff, low, high = stats.paired_bootstrap(truth, pred_a, pred_b, metric, resamples, seed=0)
        row.update({f"{metric_name}_diff": diff, f"{metric_name}_diff_ci_low": low,
                    f"{metric_name}_diff_ci_high": high})
    only_a, only_b, p_value = stats.mcnemar(pred_a == truth, pred_b == truth)
    row.update({"only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": p_value, "note": ""})
    return row


def paired_comparisons(client: MlflowClient, runs: list, source: str, resamples: int,
                       recipes: dict | None = None) -> pd.DataFrame:
    """Every pair of rows (backbones, or one backbone's `recipes`: see comparison_table) scored on the
    same images: accuracy and macro-F1 differences (a - b) with paired-bootstrap 95% CIs, and
    McNemar's exact test on which images each got right; then the ensemble of all rows (probabilities
    averaged per image) against each row; per split of PREDICTIONS that every run has, with and
    without the flip."""
    rows = []
    for split, artifact in PREDICTIONS[source].items():
        frames = {row_name(run.data.params["backbone"], (recipes or {}).get(run.info.run_id)):
                  _predictions(client, run, artifact) for run in runs}
        if any(frame is None for frame in frames.values()):
            continue
        rows += [pair(split, name_a, a, name_b, b, resamples)
                 for (name_a, a), (name_b, b) in itertools.combinations(frames.items(), 2)]
        ensemble = _ensemble(frames)
        if ensemble is not None:
            rows += [pair(split, ENSEMBLE, ensemble, name, frame, resamples) for name, frame in frames.items()]
    return pd.DataFrame(rows)


def _cell(value) -> str:
    if isinstance(value, float | np.floating):
        if np.isnan(value):
            return "n/a"
        if 0 < abs(value) < 1e-3:  # e.g. a p-value: 0.0000 would hide how small it is
            return f"{value:.1e}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _markdown_table(table: pd.DataFrame, leave_out: tuple = ()) -> list[str]:
    """Rows as markdown; a column with <name>_ci_low/_ci_high beside it shows as `mean [low, high]`."""
    shown = [c for c in table.columns if not c.endswith(("_ci_low", "_ci_high", *leave_out))]

    def cell(row, column) -> str:
        text = _cell(row[column])
        if f"{column}_ci_low" in table.columns and not pd.isna(row[f"{column}_ci_low"]):
            text += f" [{_cell(row[f'{column}_ci_low'])}, {_cell(row[f'{column}_ci_high'])}]"
        return text

    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(row, c) for c in shown) + " |" for _, row in table.iterrows()]
    return lines


def markdown(table: pd.DataFrame, title: str, pairs: pd.DataFrame | None = None, source: str = "bench") -> str:
    lines = [f"# {title}", "", "From MLflow runs alone. Every metric names its split: val_ (model selection: best "
             "epoch, threshold) or test_ (scored once, never used for a choice). target_*: the threshold chosen "
             "on validation to reach the target sensitivity, and what it gives. probe_*: the linear-probe "
             "baseline (logistic regression on the frozen pretrained features, regularisation chosen on the "
             "training images only); vs_probe flags a fine-tuned model below it. tta_*: the same model on each "
             "image and its horizontal flip, probabilities averaged (what `predict --tta` does). weights: `none` "
             "is random init trained from scratch (BatchNorm in training mode, every layer trainable, no probe).",
             ""]
    if source == "cv":
        lines += ["Cross-validated: mean over folds [95% CI, Student t]; folds are stratified and keep "
                  "duplicate groups whole, the same folds for every backbone. Per-class figures: comparison.csv. "
                  "ensemble_test_*: the test split (in no fold) scored once by the fold models together, "
                  "probabilities averaged, as `predict <parent run id>` does. far_oof_*: out of fold, only the "
                  "far_oof_images images with no image their fold trained on within evaluate.far_distance bits of "
                  "perceptual hash (nearer ones are often sharpened, contrast-changed or cropped copies of one "
                  "slice, which duplicate grouping does not catch): the figure for images unlike the training set.",
                  ""]
    per_class = tuple(f"_{name}" for name in _class_names(table)) if source == "cv" else ()
    lines += _markdown_table(table, per_class)
    if pairs is not None and not pairs.empty:
        lines += ["", "## Paired comparisons (same images)", "",
                  "Difference a - b with a paired-bootstrap 95% CI over images; McNemar's exact test on the "
                  "images only one of the two got right. A CI that includes 0 (or p >= 0.05) does not rank them. "
                  f"{ENSEMBLE!r}: every row's probabilities averaged per image, as `predict <run id>,<run id>,...` "
                  "predicts; accuracy_a / accuracy_b: each side's own accuracy on these images. tta_<split>: "
                  "the same with each image and its flip averaged (`predict --tta`)."
                  + (" oof: out-of-fold predictions, every image scored once by the fold that held it out; "
                     "test: scored by each row's fold models together." if source == "cv" else ""), ""]
        lines += _markdown_table(pairs)
    return "\n".join(lines) + "\n"


TERMINAL = [("backbone", "backbone"), ("weights", "weights"), ("input_px", "px"), ("val_accuracy", "accuracy"),
            ("val_macro_f1", "macro-F1"), ("val_roc_auc", "AUC"), ("probe_val_accuracy", "probe acc"),
            ("train_s", "train s")]


def terminal(table: pd.DataFrame, source: str = "bench") -> str:
    """A compact table for the end of a run (under 120 columns): validation accuracy, macro-F1 and
    AUC (cross-validated: the mean and its 95% CI), the probe's accuracy, training time."""
    columns = [(key, title) for key, title in TERMINAL if key in table.columns]

    def cell(row, key) -> str:
        value = row[key]
        if not isinstance(value, float | np.floating):
            return str(value)
        text = "n/a" if np.isnan(value) else (f"{value:.0f}" if key == "train_s" else f"{value:.3f}")
        if source == "cv" and f"{key}_ci_low" in table.columns and not pd.isna(row[f"{key}_ci_low"]):
            text += f" [{row[f'{key}_ci_low']:.3f},{row[f'{key}_ci_high']:.3f}]"
        return text

    rows = [[title for _, title in columns]] + [[cell(row, key) for key, _ in columns] for _, row in table.iterrows()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(r, widths)).rstrip() for r in rows]
    flagged = [f"{row_name(row['backbone'], row.get('recipe'))}: {row['vs_probe']}" for _, row in table.iterrows()
               if _row_below_probe(row) or row.get(FOLDS_BELOW_PROBE, 0) > 0]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], *flagged]) + "\n"


def _class_names(table: pd.DataFrame) -> list[str]:
    return [c.removeprefix("val_recall_") for c in table.columns
            if c.startswith("val_recall_") and not c.endswith(("_ci_low", "_ci_high"))]


FIGURES = {"bench": ["training_curves.png", "confusion_matrix_val.png", "reliability_val.png"],
           "sweep": ["training_curves.png", "confusion_matrix_val.png", "reliability_val.png"],
           "cv": ["confusion_matrix_oof.png", "reliability_oof.png", "label_review_oof.csv"]}


def copy_run_figures(client: MlflowClient, runs: list, out_dir: Path, source: str = "bench",
                     recipes: dict | None = None) -> list[Path]:
    """Each run's figures (and a CV run's label-review list), fetched from MLflow, as
    <backbone>-<file>, or <backbone>-<run id>-<file> for a run among `recipes` (those a run lacks
    are skipped)."""
    copied = []
    for run in runs:
        for figure in FIGURES[source]:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    local = client.download_artifacts(run.info.run_id, figure, tmp)
                except (OSError, MlflowException):
                    continue
                run_id = f"-{run.info.run_id}" if run.info.run_id in (recipes or {}) else ""
                target = out_dir / f"{run.data.params['backbone']}{run_id}-{figure}"
                shutil.copyfile(local, target)
                copied.append(target)
    return copied


def write(table: pd.DataFrame, out_dir: Path, title: str, pairs: pd.DataFrame | None = None,
          source: str = "bench") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "comparison.md", "csv": out_dir / "comparison.csv", "png": out_dir / "comparison.png"}
    paths["md"].write_text(markdown(table, title, pairs, source))
    table.to_csv(paths["csv"], index=False)
    if pairs is not None and not pairs.empty:
        paths["pairs"] = out_dir / "pairs.csv"
        pairs.to_csv(paths["pairs"], index=False)
    figure = plots.comparison_bars(table, ["val_accuracy", "val_macro_f1", "val_roc_auc"], title)
    figure.savefig(paths["png"], dpi=110)
    plots.plt.close(figure)
    return paths


def build(client: MlflowClient, experiment_name: str, runs: list, results_dir: Path, source: str = "bench",
          resamples: int = 2000, register: bool = False):
    """Write the table of `runs` (select_runs) to results/<data set>/[cv/|sweep/]comparison.{md,csv,png}
    (+ pairs.csv, with `resamples` paired-bootstrap draws); returns (table, paths). `register`: first
    register_best, and re-read the runs so that the table's `registered` column shows it."""
    if register and register_best(client, experiment_name, runs, source):
        runs = [client.get_run(run.info.run_id) for run in runs]
    recipes = recipe_differences(client, runs)
    table = comparison_table(runs, source, recipes)
    pairs = paired_comparisons(client, runs, source, resamples, recipes) if len(runs) > 1 else None
    out_dir = Path(results_dir) / experiment_name / {"bench": "", "cv": "cv", "sweep": "sweep"}[source]
    what = {"bench": "backbone comparison", "cv": "cross-validated backbone comparison",
            "sweep": "best sweep trial per backbone"}[source]
    paths = write(table, out_dir, f"{experiment_name}: {what}", pairs, source)
    copy_run_figures(client, runs, out_dir, source, recipes)
    return table, paths
