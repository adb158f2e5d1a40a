"""What each training phase fits, and on what: the full model on streamed images (the seeds' way),
or only the trainable part on cached outputs of the frozen part (computed once).

With a cache, phase 1 trains the head on pooled base features of `views` copies of each training
image (the image itself, then augmented copies); phase 2 trains the unfrozen groups on the stored
outputs of the frozen groups below them. Epoch e uses view e mod views, so the views trade fresh augmentation every
epoch (the seeds) for speed: fewer views, faster; more views, closer to on-the-fly augmentation.
Everything a run caches is computed in one pass per view, each view only as deep as its outputs need:
when the head starts at the linear probe (which sees the plain images only), the augmented views
run through the frozen groups alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np

from . import cache, pipeline, stopwatch


@dataclass
class Streamed:
    """Every epoch runs the whole model over the tf.data pipeline (fresh augmentation each epoch)."""

    train_ds: object
    val_ds: object

    def phase(self, model, base, spec, unfreeze: int):
        return model, self.train_ds, self.val_ds


class ViewSequence(keras.utils.PyDataset):
    """Batches from cached (views, N, ...) features; epoch e reads view e mod views, reshuffled."""

    def __init__(self, features, labels, weights, batch_size: int, seed: int, shuffle: bool = True,
                 mix: float = 0.0, n_classes: int = 0):
        super().__init__()
        self.features, self.labels, self.weights = features, labels, weights
        self.mix, self.n_classes = mix, n_classes  # mix > 0: pipeline.mixup of every batch
        self.mix_rng = np.random.default_rng(seed + 1)
        self.batch_size, self.shuffle = batch_size, shuffle
        self.rng = np.random.default_rng(seed)
        self.epochs_begun = 0
        self.view = 0
        self._reorder()

    def _reorder(self):
        n = self.features.shape[1]
        self.order = self.rng.permutation(n) if self.shuffle else np.arange(n)

    def on_epoch_begin(self):
        """Keras calls this exactly once per epoch (on_epoch_end it also calls once before training)."""
        self.view = self.epochs_begun % self.features.shape[0]
        self.epochs_begun += 1
        self._reorder()

    def __len__(self):
        return math.ceil(self.features.shape[1] / self.batch_size)

    def __getitem__(self, index):
        rows = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        x = np.asarray(self.features[self.view, rows], dtype=np.float32)
        batch = (x, self.labels[rows], None if self.weights is None else self.weights[rows])
        if self.mix > 0:
            batch = pipeline.mixup(*batch, self.mix_rng, self.mix, self.n_classes)
        return batch if batch[2] is not None else batch[:2]


def boundary_layer(base, spec, unfreeze: int) -> str | None:
    """The last layer of the frozen groups when the top `unfreeze` groups train (None: nothing frozen)."""
    frozen = set(spec.group_names[:max(len(spec.group_names) - unfreeze, 0)])
    names = [layer.name for layer in base.layers if spec.group_of(layer.name) in frozen]
    return names[-1] if names else None


def head_layers(model) -> list:
    return [layer for layer in model.layers if layer.name.startswith("head_")]


class Cached:
    """Frozen layers run once per view; their outputs are cached on disk and reused by every run
    and trial sharing the key (backbone, input size, weights, augmentation, views, data)."""

    def __init__(self, train_images, train_labels, train_weights, val_images, val_labels, preprocess, augment,
                 views: int, seed: int, batch_size: int, key: dict, plan_unfreeze: int = 0,
                 stream: Streamed | None = None, batch_statistics: bool = False, mix: float = 0.0,
                 n_classes: int = 0, probe_head: bool = False):
        self.stream = stream  # used when nothing is frozen: caching the input saves nothing then
        self.batch_statistics = batch_statistics  # as model.build_classifier's
        self.train_images, self.val_images = train_images, val_images
        self.train_labels, self.val_labels, self.train_weights = train_labels, val_labels, train_weights
        self.preprocess, self.augment, self.seed, self.batch_size = preprocess, augment, seed, batch_size
        self.views = views if (augment is not None and augment.enabled) else 1
        # probe_head: the head starts at the linear probe and phase 1 never trains on pooled views, so
        # pooled features are wanted of the plain images (view 0) alone
        self.pooled_views = 1 if probe_head else self.views
        self.key = {**key, "views": self.views, "seed": seed, "view0": "plain"}
        self.plan_unfreeze = plan_unfreeze
        self.mix, self.n_classes = mix, n_classes  # mixup of the training batches (pipeline.mixup)

    def _entries(self, base, spec, unfreeze: int) -> dict[str, tuple]:
        """Cache entries for pooled features and (unfreeze > 0) the frozen prefix's outputs."""
        outputs = {"pooled": keras.layers.GlobalAveragePooling2D()(base.output)}
        if unfreeze > 0:
            boundary = boundary_layer(base, spec, unfreeze)
            outputs["prefix"] = base.get_layer(boundary).output if boundary else base.inputs[0]
        entries = {}
        for name, tensor in outputs.items():
            dtype = np.float32 if name == "pooled" else np.float16
            train_views = self.pooled_views if name == "pooled" else self.views
            for split, images, views in (("train", self.train_images, train_views), ("val", self.val_images, 1)):
                key = {**self.key, "output": name, "split": split, "views": views}
                if name == "prefix":
                    key["boundary"] = boundary or "input"
                shape = (views, len(images), *tensor.shape[1:])
                entries[(name, split)] = (cache.Entry(f"features-{name}", key, shape, dtype), tensor, images, views)
        return entries

    def _arrays(self, base, spec, unfreeze: int) -> dict:
        """Load the cached arrays, computing the missing ones in one pass over the views, each view
        through a model with just the outputs still wanted of it (the prefix alone stops early)."""
        with stopwatch.stage("cache"):  # checksums of the files, written or read, included
            entries = self._entries(base, spec, unfreeze)
            arrays = {k: entry.load() for k, (entry, *_rest) in entries.items()}
            for split in ("train", "val"):
                missing = [k for k in arrays if k[1] == split and arrays[k] is None]
                if missing:
                    arrays.update(self._compute(base, entries, missing, split))
        return arrays

    def _compute(self, base, entries: dict, missing: list, split: str) -> dict:
        """The `missing` entries of `split`, computed and written."""
        images = entries[missing[0]][2]
        extractors = {}  # the outputs wanted of a view -> the model computing just those
        outs = {k: entries[k][0].open() for k in missing}
        try:
            augment = self.augment if split == "train" else None
            views = max(entries[k][3] for k in missing)
            for view, start, batch in pipeline.view_batches(images, augment, views, self.seed, self.batch_size):
                wanted = tuple(k for k in missing if view < entries[k][3])
                if wanted not in extractors:
                    extractors[wanted] = keras.Model(base.inputs, [entries[k][1] for k in wanted])
                results = extractors[wanted].predict_on_batch(self.preprocess(batch))
                results = results if isinstance(results, (list, tuple)) else [results]
                for k, result in zip(wanted, results):
                    outs[k][view, start:start + len(batch)] = np.asarray(result)
            return {k: entries[k][0].commit(out) for k, out in outs.items()}
        finally:
            for k in missing:
                entries[k][0].discard()

    def _planned(self, base, spec) -> int:
        """The unfreeze depth whose frozen prefix this run's phase 2 will train on (0: none)."""
        return self.plan_unfreeze if boundary_layer(base, spec, self.plan_unfreeze) is not None else 0

    def pooled(self, base, spec) -> tuple[np.ndarray, np.ndarray]:
        """Pooled base features: train (views, N, F), view 0 the plain images, val (N, F). Phase 2's
        frozen-prefix outputs are cached in the same pass."""
        arrays = self._arrays(base, spec, self._planned(base, spec))
        return arrays[("pooled", "train")], np.asarray(arrays[("pooled", "val")][0])

    def phase(self, model, base, spec, unfreeze: int):
        """(model to fit, training batches, validation data) for a phase with `unfreeze` top groups.

        With every group trainable there is nothing frozen to cache: the whole model trains on the
        streamed images, with fresh augmentation every epoch."""
        if self.stream is not None and boundary_layer(base, spec, unfreeze) is None:
            return self.stream.phase(model, base, spec, unfreeze)
        arrays = self._arrays(base, spec, unfreeze or self._planned(base, spec))
        name = "prefix" if unfreeze > 0 else "pooled"
        train, val = arrays[(name, "train")], arrays[(name, "val")]
        inputs = keras.Input(train.shape[2:], name=f"cached_{name}")
        if unfreeze > 0:
            boundary = boundary_layer(base, spec, unfreeze)
            suffix = keras.Model(base.get_layer(boundary).output, base.output) if boundary else base
            # Pretrained BatchNormalization stays in inference mode unless it trains batch statistics
            x = suffix(inputs) if self.batch_statistics else suffix(inputs, training=False)
            layers = head_layers(model)
        else:
            x = inputs
            layers = [layer for layer in head_layers(model)
                      if not isinstance(layer, keras.layers.GlobalAveragePooling2D)]
        for layer in layers:
            x = layer(x)
        fit_model = keras.Model(inputs, x, name=f"{model.name}_{name}")
        sequence = ViewSequence(train, self.train_labels, self.train_weights, self.batch_size, self.seed + unfreeze,
                                mix=self.mix, n_classes=self.n_classes)
        return fit_model, sequence, (np.asarray(val[0], dtype=np.float32), self.val_labels)
