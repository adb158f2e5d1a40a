"""Frozen-layer caches: same results as the full model, rebuilt whenever an input changes, never used corrupt."""
import dataclasses

import keras
import numpy as np
import pytest

import backbones
from benchmark import cache, feeds, intake, pipeline, recipe
from benchmark.config import load_config
from benchmark.model import build_classifier, set_trainable
from benchmark.phantoms import phantom_dataset


@pytest.fixture
def tiny(tmp_path):
    dataset = intake.load_dataset(phantom_dataset("binary", per_class=6, size=32, seed=3, cache=tmp_path))
    return recipe.Prepared(dataset, intake.split(dataset, 0.34, seed=3), "tiny", "tiny")


def test_head_trained_from_cache_predicts_as_the_full_model(tiny):
    spec, size, views, epochs = backbones.get("vgg16"), 32, 2, 3
    config = load_config(None, ["model.dropout=0.0"])
    train_images = pipeline.decoded_images(tiny.dataset, tiny.parts["train"], size)
    val_images = pipeline.decoded_images(tiny.dataset, tiny.parts["val"], size)
    y = pipeline.label_array(tiny.parts["train"], 2)
    n = len(y)

    def fresh():
        keras.backend.clear_session()
        keras.utils.set_random_seed(11)
        base, _ = backbones.build_base(spec, size, "none")
        model = build_classifier(base, size, 2, 8, 0.0)
        set_trainable(base, spec, 0)
        return base, model

    base, cached_model = fresh()
    feed = feeds.Cached(train_images, y, None, val_images, pipeline.label_array(tiny.parts["val"], 2),
                        spec.preprocess, config.augment, views, 5, n, {"test": "equivalence"})
    fit_model, sequence, _ = feed.phase(cached_model, base, spec, 0)
    # Plain SGD: Adam's first steps move every weight by about lr * sign(gradient), which turns
    # 1e-7 float noise in near-zero gradients into visible differences; SGD keeps them 1e-7.
    fit_model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
    fit_model.fit(sequence, epochs=epochs, verbose=0, shuffle=False)

    view_images = [spec.preprocess(batch) for _, _, batch in
                   pipeline.view_batches(train_images, config.augment, views, 5, n)]
    _, full_model = fresh()
    full_model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
    for epoch in range(epochs):  # epoch e sees view e mod views, as the cache feeds it
        full_model.fit(view_images[epoch % views], y, batch_size=n, epochs=1, verbose=0, shuffle=False)

    val_inputs = spec.preprocess(np.asarray(val_images, dtype="float32"))
    np.testing.assert_allclose(cached_model.predict(val_inputs, verbose=0), full_model.predict(val_inputs, verbose=0),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(view_images[0], view_images[1])  # the two views really differ


def test_a_probe_started_head_caches_every_view_in_one_pass_as_deep_as_it_needs(tiny, tmp_path, monkeypatch):
    """With the head starting at the linear probe, pooled features are cached of the plain images
    only, and phase 2's frozen-prefix outputs of every view in the same pass: phase 2 then computes
    nothing, and every cached value is what the base itself gives on that view."""
    monkeypatch.setenv("TUMORBENCH_CACHE", str(tmp_path / "cache"))
    spec, size, views = backbones.get("vgg16"), 32, 3
    config = load_config(None, [])
    images = pipeline.decoded_images(tiny.dataset, tiny.parts["train"], size)
    val_images = pipeline.decoded_images(tiny.dataset, tiny.parts["val"], size)
    keras.backend.clear_session()
    keras.utils.set_random_seed(2)
    base, _ = backbones.build_base(spec, size, "none")
    model = build_classifier(base, size, 2, 0, 0.0)
    feed = feeds.Cached(images, pipeline.label_array(tiny.parts["train"], 2), None, val_images,
                        pipeline.label_array(tiny.parts["val"], 2), spec.preprocess, config.augment, views, 5, 4,
                        {"test": "one pass"}, plan_unfreeze=1, probe_head=True)
    passes = []
    real_batches = pipeline.view_batches
    monkeypatch.setattr(pipeline, "view_batches", lambda *a, **k: passes.append(a[2]) or real_batches(*a, **k))
    train_pooled, val_pooled = feed.pooled(base, spec)
    assert passes == [views, 1]  # train (every view) and val, once each
    assert train_pooled.shape == (1, len(images), 512) and val_pooled.shape == (len(val_images), 512)
    set_trainable(base, spec, 1)
    _, sequence, (val_prefix, _) = feed.phase(model, base, spec, 1)
    assert passes == [views, 1]  # phase 2 found its inputs cached
    boundary = feeds.boundary_layer(base, spec, 1)
    prefix = keras.Model(base.inputs, base.get_layer(boundary).output)
    pooled = keras.Model(base.inputs, keras.layers.GlobalAveragePooling2D()(base.output))
    batches = [[] for _ in range(views)]  # the views as the feed draws them (augmentation is per batch of 4)
    for view, _, batch in real_batches(images, config.augment, views, 5, 4):
        batches[view].append(spec.preprocess(batch))
    batches = [np.concatenate(view) for view in batches]
    assert sequence.features.shape[0] == views
    for view, batch in enumerate(batches):
        np.testing.assert_allclose(sequence.features[view], prefix.predict(batch, verbose=0), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(train_pooled[0], pooled.predict(batches[0], verbose=0), rtol=1e-4, atol=1e-4)
    assert not np.allclose(sequence.features[1], sequence.features[0], atol=1e-2)  # augmented views differ
    np.testing.assert_allclose(val_prefix, prefix.predict(spec.preprocess(np.asarray(val_images, "float32")),
                                                          verbose=0), rtol=2e-3, atol=2e-3)


def _feature_files(tmp_path):
    return sorted((tmp_path / "cache" / "arrays" / "features-pooled").glob("*.npy"))


def test_a_changed_input_builds_a_new_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TUMORBENCH_CACHE", str(tmp_path / "cache"))
    spec = backbones.get("vgg16")

    def phase_one(config, prepared=tiny, weights="none"):
        keras.backend.clear_session()
        base, _ = backbones.build_base(spec, 32, "none")
        model = build_classifier(base, 32, 2, 8, 0.0)
        recipe.make_feed(config, prepared, spec, 32, weights, config.seed).phase(model, base, spec, 0)
        return {p.name for p in _feature_files(tmp_path)}

    config = load_config(None, ["train.cache_views=2", "train.epochs2=0"])
    first = phase_one(config)
    assert len(first) == 2  # train and val
    assert phase_one(config) == first  # same key: reused
    changes = {
        "augmentation": lambda: phase_one(load_config(None, ["train.cache_views=2", "train.epochs2=0",
                                                             "augment.zoom=0.2"])),
        "weights source": lambda: phase_one(config, weights="hed"),
        "view count": lambda: phase_one(load_config(None, ["train.cache_views=3", "train.epochs2=0"])),
    }
    seen = set(first)
    for what, run in changes.items():
        after = run()
        assert len(after - seen) >= 1, f"changing the {what} reused a stale cache"
        seen |= after
    changed = dataclasses.replace(tiny.dataset, fingerprint="a-changed-file")
    after = phase_one(config, recipe.Prepared(changed, tiny.parts, "tiny", "tiny"))
    assert len(after - seen) == 2, "a changed data file reused a stale cache"


def test_truncated_or_corrupt_cache_files_are_rebuilt(tmp_path, capsys, monkeypatch):
    """Checked by checksum the first time this process reads a file, and again after any write to it."""
    fills, hashed = [], []
    digest = cache._digest
    monkeypatch.setattr(cache, "_digest", lambda path: hashed.append(path) or digest(path))

    def fill(out):
        fills.append(1)
        out[:] = np.arange(out.size, dtype=np.float32).reshape(out.shape)

    def get():
        return np.array(cache.cached_array("demo", {"k": 1}, (64, 100), np.float32, fill, root=tmp_path))

    expected = get()
    assert len(fills) == 1 and len(get()) == 64 and len(fills) == 1  # second call reads the file
    assert len(hashed) == 1  # written and hashed once; read back unchanged without hashing it again
    monkeypatch.setattr(cache, "_checked", {})  # a new process hashes what it reads
    get()
    assert len(hashed) == 2 and len(fills) == 1
    (data,) = (tmp_path / "demo").glob("*.npy")
    data.write_bytes(data.read_bytes()[:-1000])  # truncated
    np.testing.assert_array_equal(get(), expected)
    assert len(fills) == 2 and "corrupt, truncated or stale" in capsys.readouterr().err
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, size unchanged
    data.write_bytes(bytes(raw))
    np.testing.assert_array_equal(get(), expected)
    assert len(fills) == 3


def test_a_failed_build_leaves_no_cache_behind(tmp_path):
    def broken(out):
        out[:2] = 1
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        cache.cached_array("demo", {"k": 2}, (8, 4), np.float32, broken, root=tmp_path)
    assert list((tmp_path / "demo").iterdir()) == []
