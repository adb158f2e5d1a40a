"""tf.data input: parallel decode and resize once (cached), augmentation in training only, the
backbone's own preprocessing, batching and prefetch. Knows only the intake."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from . import intake

AUTOTUNE = tf.data.AUTOTUNE


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))


def augmenter(augment, seed: int) -> keras.Sequential | None:
    """The seeds' ImageDataGenerator recipe as Keras 3 preprocessing layers (None when off)."""
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
    return keras.Sequential(layers, name="augmentation") if layers else None


def class_weights(labels: list[int], n_classes: int) -> np.ndarray:
    """Balanced weights n / (k * count_c), so every class adds the same total weight."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    return len(labels) / (n_classes * np.maximum(counts, 1))


def label_array(samples: list[intake.Sample], n_classes: int) -> np.ndarray:
    """Labels as the loss wants them: (N, 1) floats for one sigmoid unit, (N,) ints otherwise."""
    labels = np.array([s.label for s in samples])
    return labels.astype("float32")[:, None] if n_classes == 2 else labels.astype("int32")


def make_dataset(dataset: intake.Dataset, samples: list[intake.Sample], preprocess, size: int, batch_size: int,
                 *, training: bool = False, augment=None, weights: np.ndarray | None = None,
                 seed: int = 0) -> tf.data.Dataset:
    """Batches of (preprocessed images, labels[, sample weights]); training shuffles and augments."""
    n_classes = len(dataset.class_names)

    def load(index):
        return resize(dataset.read(samples[int(index)]), size)

    def decoded(index, label):
        pixels = tf.numpy_function(load, [index], tf.uint8, stateful=False)
        return tf.ensure_shape(pixels, (size, size, 3)), label

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(samples)), label_array(samples, n_classes)))
    ds = ds.map(decoded, num_parallel_calls=AUTOTUNE, deterministic=True).cache()
    if training:
        ds = ds.shuffle(len(samples), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
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

    return ds.map(finish, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
