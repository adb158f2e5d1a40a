import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression

from benchmark import intake
from benchmark.phantoms import FOUR_CLASSES, phantom_dataset


def _pixels(folder, size=32):
    dataset = intake.load_dataset(folder)
    x = np.stack([np.asarray(Image.fromarray(dataset.read(s)).resize((size, size)))[..., 0].ravel() / 255
                  for s in dataset.splits["all"]])
    return dataset, x, np.array([s.label for s in dataset.splits["all"]])


def test_deterministic_by_seed_and_cached(tmp_path):
    a = phantom_dataset("4class", per_class=3, size=48, seed=5, cache=tmp_path / "a")
    b = phantom_dataset("4class", per_class=3, size=48, seed=5, cache=tmp_path / "b")
    c = phantom_dataset("4class", per_class=3, size=48, seed=6, cache=tmp_path / "c")
    fingerprint = intake.load_dataset(a).fingerprint
    assert intake.load_dataset(b).fingerprint == fingerprint
    assert intake.load_dataset(c).fingerprint != fingerprint
    mtime = (a / "glioma" / "0000.png").stat().st_mtime_ns
    assert phantom_dataset("4class", per_class=3, size=48, seed=5, cache=tmp_path / "a") == a
    assert (a / "glioma" / "0000.png").stat().st_mtime_ns == mtime  # reused, not redrawn


def test_modes_classes_and_sizes(tmp_path):
    four = intake.load_dataset(phantom_dataset("4class", per_class=2, size=40, cache=tmp_path))
    assert four.class_names == list(FOUR_CLASSES) and four.sizes == {(40, 40): 8}
    binary = intake.load_dataset(phantom_dataset("binary", per_class=3, size=40, cache=tmp_path))
    assert binary.counts("all") == {"no": 3, "yes": 3}


def test_classes_are_learnable_but_not_trivial(tmp_path):
    import keras

    dataset, x, y = _pixels(phantom_dataset("4class", per_class=50, size=96, seed=0, cache=tmp_path), size=64)
    order = np.random.default_rng(0).permutation(len(y))
    train, val = order[:150], order[150:]
    # not trivial: tumours move, so a linear model on raw pixels stays near chance (0.25)
    linear = LogisticRegression(max_iter=500, C=0.1).fit(x[train], y[train]).score(x[val], y[val])
    assert linear < 0.5, linear
    # learnable: a three-layer CNN trained from scratch on 150 images gets far above chance
    keras.utils.set_random_seed(0)
    layers = [keras.Input((64, 64, 1))]
    for filters in (16, 32, 64):
        layers += [keras.layers.Conv2D(filters, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D()]
    cnn = keras.Sequential(layers + [keras.layers.GlobalMaxPooling2D(), keras.layers.Dense(4, activation="softmax")])
    cnn.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    images = x.reshape(-1, 64, 64, 1).astype("float32")
    cnn.fit(images[train], y[train], epochs=30, batch_size=16, verbose=0)
    accuracy = cnn.evaluate(images[val], y[val], verbose=0)[1]
    assert accuracy > 0.55, accuracy
