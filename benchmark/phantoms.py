"""Synthetic brain-MRI-like slices, deterministic by seed: the embedded default data set.

Each slice is an axial head: skull ring, brain with soft texture, ventricles, noise. Tumour
classes differ the way the real ones do on MRI, so they are learnable but not trivial:
glioma — irregular intra-axial mass with a halo of edema; meningioma — round, sharply bounded
mass against the skull; pituitary — small midline mass at the skull base; notumor — none.
Head shape, size, position, slice level, intensity, contrast and noise all vary.
The set is written as ordinary PNG folders into a cache folder, so it goes through the intake.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

FOUR_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
BINARY_CLASSES = ("no", "yes")
VERSION = 2  # bump when the drawing changes, so cached sets are regenerated


def cache_root() -> Path:
    """$TUMORBENCH_CACHE, else ~/.cache/tumorbench; never inside the repository's tracked files."""
    return Path(os.environ.get("TUMORBENCH_CACHE") or Path.home() / ".cache" / "tumorbench")


def _smooth_field(rng, yy, xx, waves: int = 4) -> np.ndarray:
    """Low-frequency texture in about -1..1: a sum of random plane waves."""
    field = np.zeros_like(xx)
    for _ in range(waves):
        fy, fx = rng.normal(0, 3, 2)
        field += np.sin(fy * yy + fx * xx + rng.uniform(0, 2 * np.pi))
    return field / waves


def _glioma(rng, yy, xx, radius):
    """Irregular mass inside the brain, off the midline, with surrounding edema."""
    angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.5) * radius
    cy, cx = dist * np.sin(angle), dist * np.cos(angle)
    size = rng.uniform(0.12, 0.22) * radius
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + sum(rng.uniform(0.08, 0.25) * np.sin(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5))
    r = np.hypot(yy - cy, xx - cx) / (size * wobble)
    mass = np.clip(1.3 - r, 0, 1) ** 0.5 * (0.8 + 0.2 * _smooth_field(rng, yy * 8, xx * 8))
    edema = np.exp(-(np.clip(r - 1, 0, None) ** 2) / 0.8) * (r > 0.9)
    necrosis = (r < rng.uniform(0.0, 0.5)) * rng.uniform(0.3, 0.6)
    return 0.45 * mass - necrosis * mass + 0.2 * edema


def _meningioma(rng, yy, xx, radius, head_axes):
    """Round, well-bounded, homogeneous mass whose edge touches the inner skull."""
    size = rng.uniform(0.14, 0.22) * radius
    angle = rng.uniform(-np.pi, np.pi)
    ay, ax = head_axes
    reach = 0.86 - size / radius
    cy, cx = reach * ay * np.sin(angle), reach * ax * np.cos(angle)
    r = np.hypot(yy - cy, xx - cx) / size
    return 0.5 / (1 + np.exp((r - 1) * 25))


def _pituitary(rng, yy, xx, radius, head_axes):
    """Small midline mass at the skull base (lower middle of the slice)."""
    size = rng.uniform(0.07, 0.11) * radius
    cy = rng.uniform(0.45, 0.6) * head_axes[0]
    cx = rng.normal(0, 0.015)
    r = np.hypot((yy - cy) / 1.2, xx - cx) / size
    return 0.5 / (1 + np.exp((r - 1) * 12))


def draw_slice(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size) uint8 slice with a tumour of `kind` (a FOUR_CLASSES name)."""
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    level = rng.uniform(0, 1)  # slice level: higher slices are smaller, with smaller ventricles
    scale = rng.uniform(0.78, 0.92) * (1 - 0.15 * level)
    head_axes = (scale * rng.uniform(1.0, 1.12), scale * rng.uniform(0.82, 0.95))
    tilt = rng.normal(0, 0.12)
    oy, ox = rng.normal(0, 0.04, 2)
    cos, sin = np.cos(tilt), np.sin(tilt)
    ry = (yy - oy) * cos - (xx - ox) * sin
    rx = (yy - oy) * sin + (xx - ox) * cos
    rho = np.hypot(ry / head_axes[0], rx / head_axes[1])

    brain_level = rng.uniform(0.35, 0.5)
    image = np.where(rho < 1.0, 0.85, 0.0) * (rho > 0.9)  # skull
    brain = rho < 0.9
    image = image + brain * (brain_level + 0.06 * _smooth_field(rng, ry * 6, rx * 6))
    vent = 0.12 + 0.08 * (1 - level)
    for side in (-1, 1):
        v = np.hypot((ry + 0.05) / (vent * 1.6), (rx - side * vent * 0.6) / (vent * 0.5))
        image = np.where(v < 1, 0.12, image)

    radius = min(head_axes)
    if kind == "glioma":
        image = image + brain * _glioma(rng, ry, rx, radius)
    elif kind == "meningioma":
        image = image + brain * _meningioma(rng, ry, rx, radius, head_axes)
    elif kind == "pituitary":
        image = image + brain * _pituitary(rng, ry, rx, radius, head_axes)
    elif kind != "notumor":
        raise ValueError(f"unknown phantom kind {kind!r}; choose from {FOUR_CLASSES}")

    contrast = rng.uniform(0.8, 1.2)
    image = np.clip(image * contrast + rng.normal(0, rng.uniform(0.02, 0.06), image.shape), 0, 1)
    image = image ** rng.uniform(0.8, 1.25)
    return np.round(image * 255).astype(np.uint8)


def _kind_for(mode: str, class_name: str, rng) -> str:
    if mode == "binary":
        return "notumor" if class_name == "no" else rng.choice(["glioma", "meningioma", "pituitary"])
    return class_name


def phantom_dataset(mode: str = "4class", per_class: int = 40, size: int = 128, seed: int = 0,
                    cache: Path | None = None) -> Path:
    """Folder of phantom PNGs (`<class>/<nnnn>.png`), generated once per parameter set and cached."""
    if mode not in ("4class", "binary"):
        raise ValueError(f"phantom mode must be '4class' or 'binary', got {mode!r}")
    classes = FOUR_CLASSES if mode == "4class" else BINARY_CLASSES
    target = (cache or cache_root()) / "phantoms" / f"phantoms-{mode}-n{per_class}-s{size}-seed{seed}-v{VERSION}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        for class_index, name in enumerate(classes):
            (staging / name).mkdir()
            for i in range(per_class):
                rng = np.random.default_rng([seed, class_index, i])
                pixels = draw_slice(_kind_for(mode, name, rng), size, rng)
                Image.fromarray(pixels, mode="L").save(staging / name / f"{i:04d}.png")
        staging.rename(target)  # atomic: a half-written set is never seen as finished
    except OSError:
        if target.is_dir():  # another process finished the same set first
            shutil.rmtree(staging, ignore_errors=True)
            return target
        raise
    finally:
        if staging.exists() and staging != target:
            shutil.rmtree(staging, ignore_errors=True)
    return target
