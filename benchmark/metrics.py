"""Classification metrics from labels and predicted probabilities (scikit-learn underneath)."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from . import stats


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """(N, K) probabilities from the model's outputs: one sigmoid column becomes [1 - p, p]."""
    outputs = np.asarray(outputs, dtype=float)
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        return np.hstack([1 - outputs, outputs])
    return outputs


def compute(y_true, probabilities, class_names: list[str], calibration_bins: int = 10) -> dict:
    """Accuracy, log loss, per-class P/R/F1/support, macro/weighted F1, confusion matrix, ROC-AUC
    (one-vs-rest beyond two classes), expected calibration error and its reliability bins; for two
    classes also sensitivity and specificity, with the second class (e.g. 'yes', 'tumor') as positive."""
    y_true = np.asarray(y_true, dtype=int)
    probabilities = class_probabilities(probabilities)
    if not np.isfinite(probabilities).all():
        raise ValueError("the model's outputs contain NaN/inf; no metrics can be computed from them")
    labels = list(range(len(class_names)))
    y_pred = probabilities.argmax(axis=1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    result = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "loss": float(skm.log_loss(y_true, clipped / clipped.sum(axis=1, keepdims=True), labels=labels)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "predicted": y_pred.tolist(),
        "roc_auc": _roc_auc(y_true, probabilities, labels),
        "ece": stats.expected_calibration_error(y_true, probabilities, calibration_bins),
        "reliability": stats.reliability(y_true, probabilities, calibration_bins),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
    }
    if len(class_names) == 2:
        (tn, fp), (fn, tp) = result["confusion_matrix"]
        result["sensitivity"] = tp / (tp + fn) if tp + fn else float("nan")
        result["specificity"] = tn / (tn + fp) if tn + fp else float("nan")
    return result


def at_threshold(y_true, probabilities, threshold: float) -> dict:
    """Two classes: sensitivity and specificity when the positive class needs p >= threshold."""
    sensitivity, specificity = stats.sensitivity_specificity(y_true, class_probabilities(probabilities)[:, 1],
                                                             threshold)
    return {"target_threshold": threshold, "target_sensitivity": sensitivity, "target_specificity": specificity}


def _roc_auc(y_true, probabilities, labels) -> float:
    """NaN when undefined (a class missing from y_true)."""
    if len(set(y_true.tolist())) < len(labels):
        return float("nan")
    if len(labels) == 2:
        return float(skm.roc_auc_score(y_true, probabilities[:, 1]))
    return float(skm.roc_auc_score(y_true, probabilities, multi_class="ovr", labels=labels))


def flatten(result: dict, prefix: str) -> dict[str, float]:
    """MLflow-ready scalars: '{prefix}_accuracy', '{prefix}_recall_glioma', ... (NaN left out)."""
    flat = {f"{prefix}_{k}": v for k, v in result.items() if isinstance(v, float | int)}
    for name, values in result["per_class"].items():
        flat.update({f"{prefix}_{metric}_{name}": value for metric, value in values.items()})
    return {k: float(v) for k, v in flat.items() if np.isfinite(v)}


def score_range(key: str) -> tuple[float, float] | None:
    """The range of a flattened metric (`flatten`'s keys): 0..1 for every rate, 0.. for the loss,
    None for the class counts (support)."""
    if "_support_" in key:
        return None
    return (0.0, float("inf")) if key.endswith("_loss") else (0.0, 1.0)


def report_text(result: dict, class_names: list[str]) -> str:
    """A human-readable classification report with the confusion matrix."""
    lines = [f"{'class':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name in class_names:
        c = result["per_class"][name]
        lines.append(f"{name:<16}{c['precision']:>10.3f}{c['recall']:>10.3f}{c['f1']:>10.3f}{c['support']:>10d}")
    lines.append("")
    for key in ("accuracy", "loss", "macro_f1", "weighted_f1", "roc_auc", "ece", "sensitivity", "specificity",
                "target_threshold", "target_sensitivity", "target_specificity"):
        if key in result:
            lines.append(f"{key:<16}{result[key]:>10.4f}")
    lines += ["", "confusion matrix (rows: true, columns: predicted; order " + ", ".join(class_names) + ")"]
    lines += ["  " + " ".join(f"{n:>6d}" for n in row) for row in result["confusion_matrix"]]
    return "\n".join(lines) + "\n"
