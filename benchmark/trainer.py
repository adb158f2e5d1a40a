"""One two-phase trainer for every backbone (Keras transfer-learning guide).

Phase 1 trains the head on a frozen base; phase 2 unfreezes the last layer groups, recompiles
with a low learning rate and goes on, its epoch numbers continuing phase 1's. Both phases keep
the best weights by validation loss, stop early, and reduce the learning rate on plateaus.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import keras
import numpy as np

from . import metrics
from .model import set_trainable


class TrainingFailed(RuntimeError):
    """The run can't give a trustworthy model (e.g. the loss became NaN)."""


class FailOnNaN(keras.callbacks.Callback):
    """Stops at the first NaN/inf loss and remembers where, so the trainer can fail loudly."""

    def __init__(self):
        super().__init__()
        self.where: str | None = None
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.where = f"epoch {self.epoch + 1}, batch {batch + 1}"
            self.model.stop_training = True


class EpochScore(keras.callbacks.Callback):
    """Adds `val_<key>` (e.g. val_macro_f1) to each epoch's logs, computed on the validation data,
    so later callbacks (MLflow, Optuna pruning) see the metric a study optimises. Keeps each
    epoch's validation probabilities, so a sweep trial can be scored without another pass."""

    def __init__(self, val_inputs, labels, class_names, key: str, by_epoch: dict):
        super().__init__()
        self.val_inputs, self.labels, self.class_names, self.key = val_inputs, labels, class_names, key
        self.by_epoch = by_epoch

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        probabilities = self.model.predict(self.val_inputs, verbose=0)
        self.by_epoch[epoch] = probabilities
        if np.isfinite(probabilities).all():
            logs[f"val_{self.key}"] = metrics.compute(self.labels, probabilities, self.class_names)[self.key]


class KeepBest(keras.callbacks.Callback):
    """Keeps the whole classifier's weights with the lowest validation loss seen in either phase
    (the model being fitted may be only its trainable part)."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.best = math.inf
        self.best_epoch = -1
        self.weights = None

    def on_epoch_end(self, epoch, logs=None):
        val_loss = (logs or {}).get("val_loss")
        if val_loss is not None and val_loss < self.best:
            self.best, self.best_epoch = float(val_loss), epoch
            self.weights = self.classifier.get_weights()

    def consider(self, model, fit_model, val_data, n_classes: int, epoch: int, label_smoothing: float = 0.0):
        """Count the current weights (before any epoch) as a candidate, scored on `val_data` with the
        loss the epochs are scored with."""
        compile_model(fit_model, n_classes, make_optimizer(1e-3), "off", label_smoothing=label_smoothing)
        x, y = val_data if isinstance(val_data, tuple) else (val_data, None)
        val_loss = fit_model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
        if val_loss < self.best:
            self.best, self.best_epoch, self.weights = float(val_loss), epoch, model.get_weights()

    def restore(self):
        if self.weights is not None:
            self.classifier.set_weights(self.weights)


@dataclass
class TrainResult:
    epochs: list[dict] = field(default_factory=list)  # one dict per epoch: epoch, phase, metrics
    phase2_start: int = 0  # first epoch number of phase 2
    best_epoch: int = -1  # the epoch whose weights the model ends with (train.keep)
    unfrozen: list[str] = field(default_factory=list)
    trainable_params: int = 0
    seconds: float = 0.0
    phase_seconds: dict = field(default_factory=dict)  # {1: s, 2: s}, cache building included
    # With `score`: the validation outputs of each epoch, as the fitted model saw them (cached
    # inputs when the feed caches); best_val_outputs is the best epoch's.
    val_outputs: dict = field(default_factory=dict)

    @property
    def best_val_outputs(self):
        return self.val_outputs.get(self.best_epoch)


def make_optimizer(learning_rate: float, weight_decay: float = 0.0, decay_steps: int = 0,
                   average_momentum: float = 0.0):
    """Adam, or AdamW when `weight_decay` > 0; cosine decay to 0 over `decay_steps` when given; a
    moving average of the weights with this momentum when > 0 (swapped in by SwapEMAWeights)."""
    schedule = (keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps) if decay_steps > 0
                else learning_rate)
    averaging = {"use_ema": True, "ema_momentum": average_momentum} if average_momentum > 0 else {}
    if weight_decay > 0:
        return keras.optimizers.AdamW(schedule, weight_decay=weight_decay, **averaging)
    return keras.optimizers.Adam(schedule, **averaging)


def ema_momentum(ema_epochs: float, batches_per_epoch: int) -> float:
    """The momentum m of a moving average whose window, 1 / (1 - m) steps, spans `ema_epochs`."""
    return max(0.0, 1.0 - 1.0 / (ema_epochs * batches_per_epoch)) if ema_epochs > 0 else 0.0


def _soft(labels, n_classes: int) -> bool:
    """Whether `labels` are soft targets, a row of class probabilities per example (mixup), rather
    than class indices; known when the graph is traced, so training and validation may differ."""
    return n_classes > 2 and len(labels.shape) == 2 and labels.shape[-1] == n_classes


def _one_hot(labels, n_classes: int):
    return labels if _soft(labels, n_classes) else keras.ops.one_hot(
        keras.ops.cast(keras.ops.reshape(labels, (-1,)), "int32"), n_classes)


def cross_entropy(n_classes: int, label_smoothing: float = 0.0, soft_targets: bool = False):
    """The training loss. Label smoothing s aims at 1 - s on the labelled class plus s spread evenly
    over all classes (Keras' convention), so a few hundred images never push the model to certainty.
    With `soft_targets` (mixup) it also takes a row of class probabilities per example (validation
    keeps class indices); one sigmoid unit's targets are probabilities anyway."""
    if n_classes == 2:
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
    if label_smoothing == 0 and not soft_targets:
        return keras.losses.SparseCategoricalCrossentropy()

    def categorical_crossentropy(labels, probabilities):
        return keras.losses.categorical_crossentropy(_one_hot(labels, n_classes), probabilities,
                                                     label_smoothing=label_smoothing)
    return categorical_crossentropy


def accuracy_metric(n_classes: int, soft_targets: bool = False):
    """Accuracy; on soft targets (mixup), against the class they weight most."""
    if not soft_targets:
        return (keras.metrics.BinaryAccuracy(name="accuracy") if n_classes == 2
                else keras.metrics.SparseCategoricalAccuracy(name="accuracy"))

    def accuracy(labels, probabilities):
        if n_classes == 2:
            return keras.metrics.binary_accuracy(keras.ops.round(labels), probabilities)
        return keras.metrics.categorical_accuracy(_one_hot(labels, n_classes), probabilities)
    return keras.metrics.MeanMetricWrapper(accuracy, name="accuracy")


def compile_model(model: keras.Model, n_classes: int, optimizer, jit_compile="auto", eager: bool = False,
                  label_smoothing: float = 0.0, soft_targets: bool = False) -> None:
    model.compile(optimizer=optimizer, loss=cross_entropy(n_classes, label_smoothing, soft_targets),
                  metrics=[accuracy_metric(n_classes, soft_targets)],
                  jit_compile=False if eager else {"on": True, "off": False, "auto": "auto"}[jit_compile],
                  run_eagerly=eager)


def _batches_per_epoch(train_data) -> int:
    try:
        return len(train_data)
    except TypeError:
        return max(int(train_data.cardinality()), 1)


def train_two_phase(model, base, spec, feed, train_config, n_classes: int, callbacks: list = (),
                    score: tuple | None = None, from_scratch: bool = False, head_ready: bool = False) -> TrainResult:
    """Run both phases on `model` (whose base is `base`), fed by `feed` (feeds.Streamed or
    feeds.Cached). `callbacks` see every epoch of both; `score` = (key, labels, class_names)
    adds val_<key> to each epoch's logs before them. A base trained `from_scratch` has every
    group and its BatchNormalization trainable in both phases (nothing there is worth freezing).

    Phase 1 is the linear-probe half of LP-FT (Kumar et al. 2022): on cached features its epochs
    cost almost nothing, so it runs to convergence (early stopping on validation loss) and phase 2
    fine-tunes from a trained head instead of distorting the features to fit a random one. Phase 2
    uses cosine decay of lr2 over its epochs when `schedule2 = "cosine"`, else ReduceLROnPlateau;
    AdamW when `weight_decay` > 0. With `head_ready` the head was already fitted (the linear probe):
    phase 1 is skipped, and that starting point counts as a candidate for the best weights, so
    fine-tuning can't end on weights with a higher validation loss than the probe's. With `keep =
    "last"` phase 2 runs all its epochs and ends on the last one's weights instead (best_epoch
    then names that epoch). With `ema_epochs` > 0, phase 2's epochs are validated, kept and ended
    on a moving average of the weights over about that many last epochs instead.
    """
    cfg = train_config
    result = TrainResult()
    keep_best, nan_guard = KeepBest(model), FailOnNaN()
    started = time.perf_counter()
    epoch, kept_epoch = 0, -1  # -1: the probe's head, before any epoch
    every_group = len(spec.group_names)
    phases = [(1, every_group if from_scratch else 0, cfg.lr1, cfg.epochs1),
              (2, every_group if from_scratch else cfg.unfreeze, cfg.lr2, cfg.epochs2)]
    for phase, unfreeze, learning_rate, epochs in phases:
        phase_started = time.perf_counter()
        if phase == 1 and head_ready:
            continue
        if phase == 2:
            if epochs <= 0 or unfreeze <= 0:
                break
            result.phase2_start = epoch
            print(f"-- {spec.name}: phase 2 from epoch {epoch + 1}: fine-tuning the top {unfreeze} layer group(s) "
                  f"at lr {learning_rate:g}" + (" (cosine decay)" if cfg.schedule2 == "cosine" else ""), flush=True)
        else:
            print(f"-- {spec.name}: phase 1: " + ("every layer trains (from scratch)" if from_scratch
                                                  else "head on the frozen base") + f" at lr {learning_rate:g}",
                  flush=True)
        unfrozen = set_trainable(base, spec, unfreeze, train_batchnorm=from_scratch or cfg.batchnorm == "train")
        if phase == 2:
            result.unfrozen = unfrozen
        fit_model, train_data, val_data = feed.phase(model, base, spec, unfreeze)
        keep_last = phase == 2 and cfg.keep == "last"  # then no candidate weights to score or keep
        if phase == 2 and head_ready and epoch == 0 and not keep_last:
            keep_best.consider(model, fit_model, val_data, n_classes, epoch=-1, label_smoothing=cfg.label_smoothing)
        cosine = phase == 2 and cfg.schedule2 == "cosine"
        batches = _batches_per_epoch(train_data)
        momentum = ema_momentum(cfg.ema_epochs, batches) if phase == 2 else 0.0
        optimizer = make_optimizer(learning_rate, cfg.weight_decay if phase == 2 else 0.0,
                                   epochs * batches if cosine else 0, momentum)
        compile_model(fit_model, n_classes, optimizer, cfg.jit_compile, cfg.eager, cfg.label_smoothing,
                      soft_targets=cfg.mixup > 0)
        result.trainable_params = sum(int(np.prod(w.shape)) for w in fit_model.trainable_weights)
        scoring = []
        if score:
            key, labels, class_names = score
            val_inputs = val_data[0] if isinstance(val_data, tuple) else val_data
            scoring.append(EpochScore(val_inputs, labels, class_names, key, result.val_outputs))
        for callback in callbacks:  # e.g. the MLflow epoch logger marks which phase an epoch is in
            if hasattr(callback, "phase"):
                callback.phase = phase
        history = fit_model.fit(
            train_data,
            validation_data=val_data,
            initial_epoch=epoch,
            epochs=epoch + epochs,
            verbose=cfg.verbose,
            shuffle=False,  # the feeds shuffle
            callbacks=[
                nan_guard,
                # Before the rest: validation, the best weights and the scores see the averaged weights.
                *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if momentum > 0 else []),
                *([] if keep_last else [keep_best, keras.callbacks.EarlyStopping(monitor="val_loss",
                                                                                  patience=cfg.patience)]),
                *([] if cosine else [keras.callbacks.ReduceLROnPlateau(
                    monitor="val_loss", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr)]),
                *scoring,
                *callbacks,
            ],
        )
        if nan_guard.where:
            raise TrainingFailed(
                f"{spec.name}: the loss became NaN/inf in phase {phase} at {nan_guard.where} "
                f"(learning rate {learning_rate:g}); no model or metrics are reported. Lower the learning rate.")
        for number in history.epoch:
            logs = {k: float(v[history.epoch.index(number)]) for k, v in history.history.items()}
            result.epochs.append({"epoch": number, "phase": phase, **logs})
        epoch = (history.epoch[-1] + 1) if history.epoch else epoch
        if keep_last:
            kept_epoch = epoch - 1
        else:
            keep_best.restore()
            kept_epoch = keep_best.best_epoch
        result.phase_seconds[phase] = time.perf_counter() - phase_started
    result.best_epoch = kept_epoch
    result.seconds = time.perf_counter() - started
    return result
