"""Figures for runs and tables (matplotlib, no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# A flat curve at chance drawn with an offset label ("1e-5+1.386") looks like it moves: never offset.
plt.rcParams["axes.formatter.useoffset"] = False


def confusion_matrix(matrix, class_names: list[str], title: str):
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2.5, 1.2 * len(class_names) + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def training_curves(epochs: list[dict], phase2_start: int, title: str):
    """Loss and accuracy per epoch on one axis for both phases, the boundary marked. Loss is on a log
    scale, so a large first epoch does not flatten every later one."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [e["epoch"] + 1 for e in epochs]
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(steps, [e.get(key) for e in epochs], "o-", label=f"train {key}")
        ax.plot(steps, [e.get(f"val_{key}") for e in epochs], "s-", label=f"val {key}")
        if phase2_start:
            ax.axvline(phase2_start + 0.5, color="grey", linestyle="--", label="phase 2 starts")
        if key == "loss":
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (both phases on one axis)")
        ax.set_ylabel(key + (" (log scale)" if key == "loss" else ""))
        ax.set_title(key)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def comparison_bars(table, metrics: list[str], title: str):
    """Grouped bars: one group per metric, one bar per row (backbone, or recipe); 95% CI whiskers where
    the table has them."""
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(metrics), 3.8))
    width = 0.8 / max(len(table), 1)
    for k, (_, row) in enumerate(table.iterrows()):
        values = np.array([row.get(m, np.nan) for m in metrics], dtype=float)
        low = np.array([row.get(f"{m}_ci_low", np.nan) for m in metrics], dtype=float)
        high = np.array([row.get(f"{m}_ci_high", np.nan) for m in metrics], dtype=float)
        whiskers = None if np.isnan(low).all() else np.nan_to_num(np.vstack([values - low, high - values]))
        ax.bar(np.arange(len(metrics)) + k * width, values, width, yerr=whiskers, capsize=3,
               label=f"{row['backbone']} ({row['weights']}" + (f"; {row['recipe']})" if row.get("recipe") else ")"))
    ax.set_xticks(np.arange(len(metrics)) + width * (len(table) - 1) / 2, metrics)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (validation" + (", mean and 95% CI over folds)" if "folds" in table else ")"))
    if table["weights"].nunique() > 1:  # rows trained from different weights are not like for like
        title += "\n(rows use different weights: " + ", ".join(sorted(table["weights"].unique())) + ")"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def score_by_unfreeze(trials, score_label: str, title: str):
    """Each finished trial's score against how many layer groups it unfroze."""
    fig, ax = plt.subplots()
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        part = trials[trials["state"] == state] if "state" in trials else trials.iloc[:0]
        if len(part) and "params_unfreeze" in part:
            ax.scatter(part["params_unfreeze"], part["value"], marker=marker,
                       label=state.lower() + (" (value: last reported epoch)" if state == "PRUNED" else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("unfrozen layer groups (0 = head only)")
    ax.set_ylabel(score_label)
    ax.set_title(f"{title}: score by unfreeze depth")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:  # every trial failed: nothing to plot, and the figure says so
        ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes)
    return fig


def gradcam_grid(images, overlays, titles: list[str], title: str):
    """Each example's image above its Grad-CAM overlay."""
    fig, axes = plt.subplots(2, len(images), figsize=(2.2 * len(images), 4.8), squeeze=False)
    for k, (image, over, caption) in enumerate(zip(images, overlays, titles)):
        axes[0, k].imshow(image)
        axes[1, k].imshow(over)
        axes[0, k].set_title(caption, fontsize=8)
        for ax in axes[:, k]:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_sheet(images, captions: list[str], title: str, per_row: int = 6):
    """Images in a grid, `per_row` a row, each with its caption."""
    rows = -(-len(images) // per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(2.2 * per_row, 2.5 * rows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, captions):
        ax.imshow(image)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def message_figure(text: str):
    fig, ax = plt.subplots(figsize=(6, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig


def pair_sheet(pairs: list, title: str, per_row: int = 3):
    """Pairs in a grid, `per_row` pairs a row: ([image, image], [caption, caption], pair title)."""
    rows = -(-len(pairs) // per_row)
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(3.2 * per_row, 2.1 * rows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (images, captions, pair_title) in enumerate(pairs):
        row, col = divmod(k, per_row)
        for ax, image, caption in zip(axes[row, 2 * col:2 * col + 2], images, captions):
            ax.imshow(image)
            ax.set_title(caption, fontsize=6)
        axes[row, 2 * col].text(1.0, -0.06, pair_title, transform=axes[row, 2 * col].transAxes, ha="center",
                                va="top", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def reliability_diagram(bins: dict, ece: float, title: str):
    """Accuracy against mean confidence per bin (bar width: the bin), the diagonal being perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    edges = np.asarray(bins["edges"])
    filled = np.asarray(bins["count"]) > 0
    ax.bar(edges[:-1][filled], np.asarray(bins["accuracy"])[filled], width=np.diff(edges)[filled], align="edge",
           edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.plot(np.asarray(bins["confidence"])[filled], np.asarray(bins["accuracy"])[filled], "ro", ms=4,
            label="mean confidence")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {ece:.3f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
