"""The statistics that tell a ranking from noise: fold means with confidence intervals, paired
bootstrap and McNemar's test on the same images, calibration error, thresholds for a target
sensitivity."""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import stats as scipy_stats


def mean_ci(values, confidence: float = 0.95,
            bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval over fold scores; NaN bounds with fewer than two. With
    `bounds` (a score's range, e.g. 0..1 for accuracy) the interval is cut to it: with few folds the
    t interval is wide, and an accuracy interval reaching past 1 says nothing more than one at 1."""
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(values) == 0:
        return np.nan, np.nan, np.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, np.nan, np.nan
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    low, high = mean - half, mean + half
    return (mean, low, high) if bounds is None else (mean, max(low, bounds[0]), min(high, bounds[1]))


def accuracy(y_true, y_pred) -> np.ndarray:
    """Accuracy of each row of (resamples, n) labels and predictions (a scalar for 1-D input)."""
    return (np.asarray(y_true) == np.asarray(y_pred)).mean(axis=-1)


def macro_f1(y_true, y_pred) -> np.ndarray:
    """Macro-F1 of each row, as scikit-learn's f1_score(average="macro", zero_division=0): the mean
    over the classes present in that row's labels or predictions."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.union1d(np.unique(y_true), np.unique(y_pred))
    per_class = []
    for c in classes:
        is_true, is_pred = y_true == c, y_pred == c
        tp = (is_true & is_pred).sum(axis=-1)
        wrong = (is_true ^ is_pred).sum(axis=-1)  # false positives + false negatives
        per_class.append(np.stack([2 * tp, 2 * tp + wrong]))
    counts = np.stack(per_class)  # (classes, 2, ...)
    present = counts[:, 1] > 0
    f1 = np.divide(counts[:, 0], counts[:, 1], out=np.zeros(counts[:, 0].shape), where=present)
    return f1.sum(axis=0) / present.sum(axis=0)


def paired_bootstrap(y_true, pred_a, pred_b, metric: Callable, resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> tuple[float, float, float]:
    """(metric(a) - metric(b), low, high): percentile interval over images resampled with
    replacement, the same resample for both models, so what they share cancels out.

    `metric(y_true, y_pred)` scores each row of (resamples, n) arrays at once (accuracy, macro_f1)."""
    y_true, pred_a, pred_b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    observed = metric(y_true, pred_a) - metric(y_true, pred_b)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(y_true), size=(resamples, len(y_true)))
    differences = metric(y_true[draws], pred_a[draws]) - metric(y_true[draws], pred_b[draws])
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(differences, [tail, 100 - tail])
    return float(observed), float(low), float(high)


def mcnemar(correct_a, correct_b) -> tuple[int, int, float]:
    """(only a right, only b right, two-sided p): McNemar's exact test, a binomial test on the
    discordant images (valid for any count, unlike the chi-square form)."""
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((correct_a & ~correct_b).sum()), int((~correct_a & correct_b).sum())
    if only_a + only_b == 0:
        return only_a, only_b, 1.0
    p = 2 * scipy_stats.binom.cdf(min(only_a, only_b), only_a + only_b, 0.5)
    return only_a, only_b, float(min(1.0, p))


def reliability(y_true, probabilities, bins: int = 10) -> dict:
    """Per equal-width confidence bin: edges, count, mean top-class confidence, accuracy."""
    y_true, probabilities = np.asarray(y_true), np.asarray(probabilities, dtype=float)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_confidence = np.bincount(which, confidence, minlength=bins) / count
        accuracy = np.bincount(which, correct.astype(float), minlength=bins) / count
    return {"edges": edges.tolist(), "count": count.tolist(), "confidence": mean_confidence.tolist(),
            "accuracy": accuracy.tolist()}


def expected_calibration_error(y_true, probabilities, bins: int = 10) -> float:
    """ECE: sum over bins of (share of images) x |accuracy - mean confidence|, top-class confidence."""
    table = reliability(y_true, probabilities, bins)
    count = np.asarray(table["count"], dtype=float)
    filled = count > 0
    gaps = np.abs(np.asarray(table["accuracy"])[filled] - np.asarray(table["confidence"])[filled])
    return float((count[filled] / count.sum() * gaps).sum())


def threshold_for_sensitivity(y_true, positive_probability, target: float) -> float:
    """The highest threshold t with sensitivity (p >= t counted positive) >= target: the least
    specificity given up to reach it. NaN without positives."""
    y_true, p = np.asarray(y_true), np.asarray(positive_probability, dtype=float)
    positives = np.sort(p[y_true == 1])[::-1]
    if len(positives) == 0:
        return float("nan")
    needed = int(np.ceil(target * len(positives) - 1e-9))  # positives that must be at or above t
    return float(positives[max(needed, 1) - 1])


def sensitivity_specificity(y_true, positive_probability, threshold: float) -> tuple[float, float]:
    y_true, predicted = np.asarray(y_true), np.asarray(positive_probability) >= threshold
    positives, negatives = y_true == 1, y_true == 0
    sensitivity = float(predicted[positives].mean()) if positives.any() else float("nan")
    specificity = float((~predicted[negatives]).mean()) if negatives.any() else float("nan")
    return sensitivity, specificity
