"""tf.data input: decode and resize once per input size into a cached uint8 array, stream batches
from it, augment in training only, apply the backbone's own preprocessing, prefetch."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from . import cache, intake, metrics, stopwatch

AUTOTUNE = tf.data.AUTOTUNE


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))


def augmenter(augment, seed: int) -> keras.Sequential | None:
    """The seeds' ImageDataGenerator recipe, and optional intensity changes, as Keras 3 preprocessing
    layers (None when off)."""
    if not augment.enabled:
        return None
    layers = []
    if augment.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if augment.rotation_degrees:
        layers.append(keras.layers.RandomRotation(augment.rotation_degrees / 360, fill_mode="nearest", seed=seed + 1))
    if augment.shift:
        layers.append(keras.layers.RandomTranslation(augment.shift, augment.shift, fill_mode="nearest", seed=seed + 2))
    if augment.shear:
        layers.append(keras.layers.RandomShear(augment.shear, augment.shear, fill_mode="nearest", seed=seed + 3))
    if augment.zoom:
        layers.append(keras.layers.RandomZoom(augment.zoom, augment.zoom, fill_mode="nearest", seed=seed + 4))
    if augment.contrast:
        layers.append(keras.layers.RandomContrast(augment.contrast, value_range=(0, 255), seed=seed + 5))
    if augment.brightness:
        layers.append(keras.layers.RandomBrightness(augment.brightness, value_range=(0, 255), seed=seed + 6))
    if augment.sharpness:  # Keras' factor: 0 blurred, 0.5 unchanged, 1 sharpened twice as much
        half = augment.sharpness / 2
        layers.append(keras.layers.RandomSharpness((0.5 - half, 0.5 + half), value_range=(0, 255), seed=seed + 7))
    return keras.Sequential(layers, name="augmentation") if layers else None


def class_weights(labels: list[int], n_classes: int) -> np.ndarray:
    """Balanced weights n / (k * count_c), so every class adds the same total weight."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    return len(labels) / (n_classes * np.maximum(counts, 1))


def label_array(samples: list[intake.Sample], n_classes: int) -> np.ndarray:
    """Labels as the loss wants them: (N, 1) floats for one sigmoid unit, (N,) ints otherwise."""
    labels = np.array([s.label for s in samples])
    return labels.astype("float32")[:, None] if n_classes == 2 else labels.astype("int32")


def decoded_images(dataset: intake.Dataset, samples: list[intake.Sample], size: int) -> np.ndarray:
    """(N, size, size, 3) uint8, decoded in parallel once and kept memory-mapped in the cache."""
    key = {"fingerprint": dataset.fingerprint, "size": size, "samples": intake.samples_hash(samples)}

    def fill(out):
        with ThreadPoolExecutor(max_workers=intake.READ_THREADS) as pool:
            for i, pixels in enumerate(pool.map(lambda s: resize(dataset.read(s), size), samples)):
                out[i] = pixels

    with stopwatch.stage("decoding"):  # checksums of the cached copy, written or read, included
        return cache.cached_array("decoded", key, (len(samples), size, size, 3), np.uint8, fill)


# Test-time flips: out of fold on the 4-class set (5,708 images, lite0 top-4 fold models) the mean
# with the horizontal flip scored 0.9802 against 0.9786 plain; adding two 5 % wrap-around rolls
# (the views before) gave 0.9797, so they went (results/README.md).
TTA_VIEWS = "original, horizontal flip (mean of 2)"
TTA_VIEW_COUNT = 2


def tta_view(batch: tf.Tensor, view: int) -> tf.Tensor:
    """Test-time view `view` (0..TTA_VIEW_COUNT - 1, as TTA_VIEWS lists them) of a (N, H, W, 3) batch."""
    return batch if view == 0 else tf.reverse(batch, axis=[2])


def ensemble_probabilities(members: list[tuple], images: np.ndarray, batch_size: int,
                           tta: bool = False) -> np.ndarray:
    """(N, K) class probabilities of raw RGB images (N, H, W, 3), 0..255: the mean over the models
    of an ensemble ((model, preprocess) pairs; one for a single model) and, with `tta`, over the
    test-time views. What `predict` and the MLflow model both compute."""
    return np.mean(view_probabilities(members, images, batch_size, range(TTA_VIEW_COUNT if tta else 1)), axis=0)


def view_probabilities(members: list[tuple], images: np.ndarray, batch_size: int, views) -> list[np.ndarray]:
    """(N, K) class probabilities of each member on each test-time view in `views`, member by member."""
    ds = tf.data.Dataset.from_tensor_slices(np.asarray(images)).batch(batch_size)
    results = []
    for model, preprocess in members:
        for view in views:
            mapped = ds.map(lambda b, v=view: preprocess(tta_view(tf.cast(b, tf.float32), v)),
                            num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
            results.append(metrics.class_probabilities(model.predict(mapped, verbose=0)))
    return results


def mixup(inputs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None, rng: np.random.Generator,
          alpha: float, n_classes: int) -> tuple:
    """One batch mixed with itself in another order by one lambda ~ Beta(alpha, alpha): inputs,
    labels (as soft targets: a probability of class 1 for one sigmoid unit, else a row per example)
    and class weights alike. Returns (inputs, targets, weights or None), float32."""
    lam = np.float32(rng.beta(alpha, alpha))
    partner = rng.permutation(len(inputs))
    targets = (np.asarray(labels, np.float32) if n_classes == 2
               else np.eye(n_classes, dtype=np.float32)[np.asarray(labels).reshape(-1).astype(int)])
    inputs = np.asarray(inputs, np.float32)
    mixed = (lam * inputs + (1 - lam) * inputs[partner], lam * targets + (1 - lam) * targets[partner])
    if weights is None:
        return (*mixed, None)
    weights = np.asarray(weights, np.float32)
    return (*mixed, lam * weights + (1 - lam) * weights[partner])


def view_batches(images: np.ndarray, augment, views: int, seed: int, batch_size: int):
    """(view, start, float32 batch) for `views` passes over `images`, the same every time.

    View 0 is the images themselves (what the linear probe is fitted on, as the standard probe
    is); view v > 0 uses augmentation seeded with seed + 7919 v.
    """
    for view in range(views):
        layers = augmenter(augment, seed + 7919 * view) if (augment is not None and view > 0) else None
        for start in range(0, len(images), batch_size):
            batch = tf.convert_to_tensor(np.asarray(images[start:start + batch_size]), tf.float32)
            yield view, start, (layers(batch, training=True) if layers is not None else batch)


def make_dataset(dataset: intake.Dataset, samples: list[intake.Sample], preprocess, size: int, batch_size: int,
                 *, training: bool = False, augment=None, weights: np.ndarray | None = None,
                 seed: int = 0, mix: float = 0.0) -> tf.data.Dataset:
    """Batches of (preprocessed images, labels[, sample weights]); training shuffles and augments,
    and with `mix` > 0 mixes each batch (mixup; labels become soft targets)."""
    images = decoded_images(dataset, samples, size)
    labels = tf.constant(label_array(samples, len(dataset.class_names)))

    def gather(indices):
        pixels = tf.numpy_function(lambda i: images[np.asarray(i)], [indices], tf.uint8, stateful=False)
        return tf.ensure_shape(pixels, (None, size, size, 3)), tf.gather(labels, indices)

    ds = tf.data.Dataset.range(len(samples))
    if training:
        ds = ds.shuffle(len(samples), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(gather, num_parallel_calls=AUTOTUNE, deterministic=True)
    augmentation = augmenter(augment, seed) if (training and augment is not None) else None
    weight_table = None if weights is None else tf.constant(weights, tf.float32)

    def finish(pixels, label):
        pixels = tf.cast(pixels, tf.float32)
        if augmentation is not None:
            pixels = augmentation(pixels, training=True)
        inputs = preprocess(pixels)
        if weight_table is None:
            return inputs, label
        index = tf.cast(tf.reshape(label, [-1]), tf.int32)
        return inputs, label, tf.gather(weight_table, index)

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE)
    if training and mix > 0:
        n_classes, rng = len(dataset.class_names), np.random.default_rng(seed)

        def mixed(inputs, label, *weight):
            outputs = tf.numpy_function(
                lambda x, y, *w: mixup(x, y, w[0] if w else None, rng, mix, n_classes)[:2 + len(w)],
                [inputs, label, *weight], [tf.float32] * (2 + len(weight)), stateful=True)
            targets = tf.ensure_shape(outputs[1], (None, 1) if n_classes == 2 else (None, n_classes))
            return (tf.ensure_shape(outputs[0], inputs.shape), targets, *outputs[2:])
        ds = ds.map(mixed)  # one call at a time: the batches draw from one generator in order
    return ds.prefetch(AUTOTUNE)
