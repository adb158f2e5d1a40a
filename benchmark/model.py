"""Backbone base + classification head, and which base layers train in each phase."""
from __future__ import annotations

from contextlib import contextmanager

import keras


def build_classifier(base: keras.Model, input_size: int, n_classes: int, head_units: int = 256,
                     dropout: float = 0.5, batch_statistics: bool = False) -> keras.Model:
    """GlobalAveragePooling -> Dense(head_units, relu) -> Dropout -> softmax (or one sigmoid for 2 classes).

    A pretrained base is called with training=False so its BatchNormalization layers stay in
    inference mode even when unfrozen (Keras transfer-learning guide): their ImageNet statistics
    are part of the weights. With `batch_statistics` (a base trained from scratch, which has no
    statistics worth keeping, or train.batchnorm = "train") the base follows the training flag: the
    BatchNormalization layers `set_trainable` unfreezes normalise with batch statistics while
    training and update their moving statistics; frozen ones stay in inference mode regardless
    (Keras 3 runs a non-trainable BatchNormalization layer in inference mode).
    """
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = base(inputs) if batch_statistics else base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    if head_units:
        x = keras.layers.Dense(head_units, activation="relu", name="head_dense")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    if n_classes == 2:
        outputs = keras.layers.Dense(1, activation="sigmoid", name="head_output", dtype="float32")(x)
    else:  # float32 output keeps the loss stable under mixed precision
        outputs = keras.layers.Dense(n_classes, activation="softmax", name="head_output", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"{base.name}_classifier")


def batchnorm_layers(base: keras.Model) -> list:
    """The base's BatchNormalization layers, bottom to top."""
    return [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]


def set_batchnorm_momentum(base: keras.Model, momentum: float) -> None:
    """Momentum of every BatchNormalization layer's moving statistics (a base trained from scratch)."""
    for layer in batchnorm_layers(base):
        layer.momentum = momentum


def unfrozen_groups(spec, unfreeze: int) -> list[str]:
    """The last `unfreeze` layer groups of the spec (0: none, more than exist: all)."""
    return spec.group_names[len(spec.group_names) - min(max(unfreeze, 0), len(spec.group_names)):]


def set_trainable(base: keras.Model, spec, unfreeze: int, train_batchnorm: bool = False) -> list[str]:
    """Freeze the base except the last `unfreeze` groups; BatchNormalization stays frozen unless
    `train_batchnorm` (a base trained from scratch)."""
    groups = set(unfrozen_groups(spec, unfreeze))
    base.trainable = bool(groups)
    for layer in base.layers:
        layer.trainable = spec.group_of(layer.name) in groups and (
            train_batchnorm or not isinstance(layer, keras.layers.BatchNormalization))
    return sorted(groups, key=spec.group_names.index)


def adapt_batchnorm(base: keras.Model, spec, unfreeze: int, batches) -> int:
    """AdaBN (Li et al. 2016): set the moving statistics of the BatchNormalization layers in the top
    `unfreeze` groups to the mean of their batch statistics over `batches` (preprocessed images).

    Fine-tuning with batch statistics (train.batchnorm = "train") normalises with statistics of MRI
    batches, not ImageNet's; a head fitted on features normalised the ImageNet way (the linear probe)
    would then start far off. Adapting first lets the probe, its head and fine-tuning see the same
    features. Each layer's statistics are those of its inputs in training mode, i.e. with every
    adapted layer below it already normalising by batch. Returns the number of layers adapted; the
    base is left frozen."""
    set_trainable(base, spec, unfreeze, train_batchnorm=True)
    layers = [layer for layer in batchnorm_layers(base) if layer.trainable]
    momenta = [layer.momentum for layer in layers]
    seen = 0
    try:
        for batch in batches:
            for layer in layers:  # the running mean becomes the mean over images seen so far
                layer.momentum = seen / (seen + len(batch))
            base(batch, training=True)
            seen += len(batch)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        set_trainable(base, spec, 0)
    return len(layers)


def batchnorm_statistics(base: keras.Model) -> dict[str, list]:
    """The moving mean and variance of every BatchNormalization layer, by layer name."""
    return {layer.name: [layer.moving_mean.numpy(), layer.moving_variance.numpy()] for layer in batchnorm_layers(base)}


@contextmanager
def batchnorm_statistics_set_to(base: keras.Model, statistics: dict[str, list] | None):
    """Within the block, the base's BatchNormalization layers hold `statistics` (None: as they are)."""
    if statistics is None:
        yield
        return
    current = batchnorm_statistics(base)

    def assign(values):
        for name, (mean, variance) in values.items():
            layer = base.get_layer(name)
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)

    assign(statistics)
    try:
        yield
    finally:
        assign(current)
