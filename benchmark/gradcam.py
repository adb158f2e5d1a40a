"""Grad-CAM (Selvaraju et al. 2017): where the model looked, from the gradient of the predicted
class's score at the backbone's last conv layer (named by each adapter)."""
from __future__ import annotations

import keras
import matplotlib
import numpy as np
import tensorflow as tf

from .feeds import head_layers


def base_of(model: keras.Model) -> keras.Model:
    """The backbone inside a tumorbench classifier (its one nested model)."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def heatmaps(model: keras.Model, spec, inputs, class_index=None) -> np.ndarray:
    """(B, H, W) maps in 0..1 at the input's size for preprocessed `inputs`; by default for the
    predicted class of each image."""
    base = base_of(model)
    conv = base.get_layer(spec.last_conv_layer)
    prefix = keras.Model(base.inputs, conv.output)
    suffix = None if conv is base.layers[-1] else keras.Model(conv.output, base.output)
    inputs = tf.convert_to_tensor(inputs, tf.float32)
    with tf.GradientTape() as tape:
        features = prefix(inputs, training=False)
        tape.watch(features)
        x = suffix(features, training=False) if suffix is not None else features
        for layer in head_layers(model):
            x = layer(x, training=False)
        probabilities = tf.concat([1 - x, x], axis=1) if x.shape[-1] == 1 else x
        chosen = tf.argmax(probabilities, axis=1) if class_index is None else tf.fill([len(inputs)], class_index)
        score = tf.gather(probabilities, chosen, axis=1, batch_dims=1)
    gradients = tape.gradient(score, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[..., None]
    cam = tf.image.resize(cam, inputs.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap (jet colours) blended over an (H, W, 3) uint8 image."""
    colours = matplotlib.colormaps["jet"](heatmap)[..., :3] * 255
    return np.clip((1 - alpha) * image + alpha * colours, 0, 255).astype(np.uint8)
