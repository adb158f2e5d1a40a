"""Self-describing model files, `predict`, and Grad-CAM."""
import csv
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import backbones
from backbones._registry import _REGISTRY
from benchmark import gradcam, intake, modelfile, pipeline, predict
from benchmark.model import build_classifier
from conftest import bomb_png, broken_exif_jpeg, clean_env, write_image

SIZE = 32


def saved_model(tmp_path, name="vgg16", classes=("no", "yes"), size=SIZE):
    keras.utils.set_random_seed(0)
    spec = backbones.get(name)
    base, used = backbones.build_base(spec, size, "none")
    model = build_classifier(base, size, len(classes), 8, 0.0)
    path = modelfile.save(model, tmp_path / f"{name}.keras",
                          modelfile.describe(spec, classes, size, used, "fp123", threshold=None))
    return model, path


def test_description_round_trips_and_predictions_equal_the_in_memory_model(tmp_path):
    model, path = saved_model(tmp_path)
    loaded, description = modelfile.load(path)
    assert description["backbone"] == "vgg16" and description["class_names"] == ["no", "yes"]
    assert description["input_size"] == SIZE and description["preprocessing"] == "caffe"
    assert description["weights"] == "none" and description["data_fingerprint"] == "fp123"
    files = [write_image(tmp_path / "in" / f"{i}.png", "RGB", (40, 30), seed=i) for i in range(5)]
    rows = predict.run(path, [str(tmp_path / "in")], batch_size=2)
    assert [r["path"] for r in rows] == [str(f) for f in files]
    pixels = np.stack([pipeline.resize(intake.load_rgb(f), SIZE) for f in files]).astype("float32")
    expected = model.predict(backbones.get("vgg16").preprocess(pixels), verbose=0)[:, 0]
    np.testing.assert_allclose([r["prob_yes"] for r in rows], expected, rtol=1e-5, atol=1e-6)
    assert [r["predicted"] for r in rows] == [["no", "yes"][int(p >= 0.5)] for p in expected]
    thresholded = predict.run(path, [str(f) for f in files], threshold=float(np.median(expected)))
    assert sum(r["predicted"] == "yes" for r in thresholded) == int((expected >= np.median(expected)).sum())


def test_models_of_different_sizes_and_runs_predict_as_one_ensemble(tmp_path):
    """References joined by commas are one ensemble; each model sees the images at its own input
    size, and the ensemble's probabilities are the mean of what each model alone predicts."""
    _, small = saved_model(tmp_path, "vgg16", size=SIZE)
    _, large = saved_model(tmp_path, "resnet50", size=48)
    files = [write_image(tmp_path / "in" / f"{i}.png", "RGB", (40, 30), seed=i) for i in range(4)]
    models = predict.resolve_models(f"{small},{large}", None)
    assert models == [small, large]
    rows = predict.run(models, [str(tmp_path / "in")], batch_size=2)
    alone = [[r["prob_yes"] for r in predict.run(path, [str(tmp_path / "in")])] for path in (small, large)]
    assert not np.allclose(*alone)
    np.testing.assert_allclose([r["prob_yes"] for r in rows], np.mean(alone, axis=0), rtol=1e-5, atol=1e-6)
    assert {r["models"] for r in rows} == {2} and [r["path"] for r in rows] == [str(f) for f in files]
    _, other_classes = saved_model(tmp_path, "efficientnetb0", classes=("a", "b"))
    with pytest.raises(modelfile.ModelFileError, match="class_names .* differ"):
        predict.run([small, other_classes], [str(tmp_path / "in")])


def test_a_trained_model_is_saved_without_its_optimizer_state(tmp_path):
    """The Adam moments would double the file and are never read back: the file keeps only the
    model's weights, and they load back equal to the trained ones."""
    import h5py
    import zipfile

    from benchmark import trainer

    model, _ = saved_model(tmp_path)
    trainer.compile_model(model, 2, keras.optimizers.Adam(1e-3), "off")
    model.fit(np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)), np.array([0, 1, 0, 1]), verbose=0)
    assert model.optimizer.variables and any(np.any(v.numpy()) for v in model.optimizer.variables[2:])
    path = modelfile.save(model, tmp_path / "trained.keras", {"backbone": "vgg16", "plugins": []})
    with zipfile.ZipFile(path) as archive, h5py.File(archive.open("model.weights.h5")) as weights:
        stored = []
        weights.visititems(lambda name, item: stored.append(name) if isinstance(item, h5py.Dataset) else None)
    assert stored and not [name for name in stored if name.startswith("optimizer")]
    assert len(stored) == len(model.weights)
    loaded, _ = modelfile.load(path)
    for trained, back in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(trained.numpy(), back.numpy())


def test_mixed_folder_gives_rows_and_per_file_errors(tmp_path):
    _, path = saved_model(tmp_path)
    folder = tmp_path / "scans"
    write_image(folder / "gray.png", "L")
    write_image(folder / "sub" / "cmyk.jpg", "CMYK", fmt="JPEG")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bomb_png(folder / "bomb.png")
    broken_exif_jpeg(folder / "exif.jpg")
    os.mkfifo(folder / "stream.png")  # a pipe: opening it would wait forever for a writer
    os.symlink("/", folder / "sub" / "rootfs")
    out = tmp_path / "preds.csv"
    result = subprocess.run([sys.executable, "-m", "benchmark", "predict", str(path), str(folder), "--out", str(out),
                             "--tta", "--explain", str(tmp_path / "cams")], capture_output=True, text=True,
                            env=clean_env(), timeout=300)
    assert result.returncode == 2, result.stderr
    rows = {row["path"].split("/")[-1]: row for row in csv.DictReader(open(out))}
    assert set(rows) == {"gray.png", "cmyk.jpg", "broken.png", "bomb.png", "exif.jpg", "stream.png", "rootfs"}
    assert rows["stream.png"]["error"] == "a named pipe, not an image file: never opened"
    assert rows["rootfs"]["error"] == f"folder link to /, outside {folder}: not followed"
    assert rows["exif.jpg"]["predicted"] in ("no", "yes") and rows["exif.jpg"]["note"].startswith("Corrupt EXIF data")
    assert rows["broken.png"]["predicted"] == "" and "not an image" in rows["broken.png"]["error"]
    assert rows["bomb.png"]["predicted"] == "" and "decompression bomb" in rows["bomb.png"]["error"]
    for name in ("gray.png", "cmyk.jpg"):
        assert rows[name]["error"] == rows[name]["note"] == "" and rows[name]["predicted"] in ("no", "yes")
        assert float(rows[name]["prob_no"]) + float(rows[name]["prob_yes"]) == pytest.approx(1.0, abs=1e-5)
        assert "flip" in rows[name]["tta"]
    assert "broken.png" in result.stderr and "bomb.png" in result.stderr and "Traceback" not in result.stderr
    assert "Warning" not in result.stderr and "site-packages" not in result.stderr
    assert len(list((tmp_path / "cams").glob("*_gradcam.png"))) == 3


def test_score_compares_predictions_with_the_class_folders(tmp_path):
    _, path = saved_model(tmp_path)
    test_split = tmp_path / "Testing"
    for i in range(6):
        write_image(test_split / ("no" if i < 4 else "yes") / f"{i}.png", "RGB", (40, 30), seed=10 + i)
    # a linked file counts for the folder the link sits in, not where it points
    (test_split / "yes" / "link.png").symlink_to(write_image(tmp_path / "elsewhere" / "x.png", "RGB", seed=7))
    out = tmp_path / "preds.csv"
    command = [sys.executable, "-m", "benchmark", "predict", str(path), str(test_split), "--score", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(out)))
    truth = [r["path"].split("/")[-2] for r in rows]
    predicted = [["no", "yes"][int(float(r["prob_yes"]) > float(r["prob_no"]))] for r in rows]
    accuracy = np.mean([t == p for t, p in zip(truth, predicted)])
    assert f"scored 7 images against their class folders (1 model(s)): accuracy {accuracy:.4f}," in result.stdout
    assert f"{'no':<16}" in result.stdout and "confusion matrix" in result.stdout

    write_image(test_split / "stray.png", "RGB", seed=99)  # not in a class folder: refused, by name
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env())
    assert result.returncode == 1 and "stray.png: --score needs every image in a subfolder" in result.stderr


@pytest.mark.serving_rehearsal
def test_mlflow_model_averages_the_test_time_views_when_asked(tmp_path, monkeypatch):
    import mlflow
    import mlflow.models.utils
    import mlflow.pyfunc

    from benchmark import mlflow_model

    rehearsed = []  # MLflow only warns when the rehearsal fails: record what it returned, or raised
    real = mlflow.models.utils._validate_serving_input

    def rehearse(model_uri, serving_input):
        try:
            rehearsed.append(real(model_uri, serving_input))
        except Exception as error:
            rehearsed.append(error)
            raise
        return rehearsed[-1]

    monkeypatch.setattr(mlflow.models.utils, "_validate_serving_input", rehearse)
    _, path = saved_model(tmp_path)
    files = [write_image(tmp_path / "in" / f"{i}.png", "RGB", (40, 30), seed=i) for i in range(4)]
    pixels = np.stack([pipeline.resize(intake.load_rgb(f), SIZE) for f in files])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run():
        info = mlflow_model.log([path, path], modelfile.load(path)[1], pixels[:1])
    # The logged input example serves as MLflow's scoring server would: one row of probabilities.
    assert len(rehearsed) == 1 and list(rehearsed[0].columns) == ["prob_no", "prob_yes"]
    assert rehearsed[0].to_numpy().sum() == pytest.approx(1, abs=1e-5)
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    for tta in (False, True):
        expected = [r["prob_yes"] for r in predict.run(path, [str(f) for f in files], tta=tta)]
        got = pyfunc.predict(pixels, params={"tta": tta})
        np.testing.assert_allclose(got["prob_yes"], expected, atol=1e-5)
    plain = pyfunc.predict(pixels)["prob_yes"]
    assert np.abs(got["prob_yes"] - plain).max() > 1e-4  # the views change the answer


def test_a_model_file_with_code_is_refused(tmp_path):
    inputs = keras.Input((4,))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    path = modelfile.save(unsafe, tmp_path / "unsafe.keras", {"backbone": "vgg16", "plugins": []})
    with pytest.raises(modelfile.ModelFileError, match="unsafe.keras: refused: it holds code"):
        modelfile.load(path)
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(tmp_path / "plain.keras")
    with pytest.raises(modelfile.ModelFileError, match="not a tumorbench model file"):
        modelfile.load(tmp_path / "plain.keras")


@pytest.mark.parametrize("name", backbones.names())
def test_gradcam_maps_every_backbone(name, tmp_path):
    size = 96  # at 32 px the last conv map of resnet50 / efficientnetb0 is 1x1: nothing to localise
    model, _ = saved_model(tmp_path, name, classes=("a", "b", "c"), size=size)
    spec = backbones.get(name)
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (2, size, size, 3)).astype("float32")
    images[1, :48] = 0
    maps = gradcam.heatmaps(model, spec, spec.preprocess(images))
    assert maps.shape == (2, size, size) and maps.min() >= 0 and maps.max() <= 1
    assert not np.allclose(maps[0], maps[1])


BLOB_NET = '''
import keras
from backbones import BackboneSpec, register
from backbones.preprocessing import raw

def build(size, weights):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255, name="blob_scale")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="blob_conv1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="blob_conv2")(x)
    return keras.Model(inputs, x, name="blobnet")

@register
def blobnet():
    return BackboneSpec(name="blobnet", build=build, preprocess=raw, preprocessing="raw", input_size=32,
                        layer_groups=(("all", ("input", "blob_")),), last_conv_layer="blob_conv2")
'''


def test_gradcam_highlights_a_planted_blob(tmp_path, monkeypatch):
    (tmp_path / "blob_backbone.py").write_text(BLOB_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        backbones.load_plugins(["blob_backbone"])
        spec = backbones.get("blobnet")
        rng = np.random.default_rng(0)
        n = 160
        images = rng.normal(60, 15, (n, SIZE, SIZE, 3)).clip(0, 255).astype("float32")
        labels = np.arange(n) % 2
        corners = rng.integers(2, SIZE - 8, (n, 2))
        for i in np.flatnonzero(labels):  # class 1: a bright 6x6 blob somewhere
            y, x = corners[i]
            images[i, y:y + 6, x:x + 6] = 250
        keras.utils.set_random_seed(0)
        base, _ = backbones.build_base(spec, SIZE, "none")
        model = build_classifier(base, SIZE, 2, 0, 0.0)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy", metrics=["accuracy"])
        model.fit(images, labels[:, None].astype("float32"), epochs=15, batch_size=32, verbose=0)
        test = np.flatnonzero(labels)[:10]
        maps = gradcam.heatmaps(model, spec, spec.preprocess(images[test]), class_index=1)
        inside, outside = [], []
        for k, i in enumerate(test):
            y, x = corners[i]
            mask = np.zeros((SIZE, SIZE), bool)
            mask[y:y + 6, x:x + 6] = True
            inside.append(maps[k][mask].mean())
            outside.append(maps[k][~mask].mean())
        assert np.mean(inside) > 2 * np.mean(outside), (np.mean(inside), np.mean(outside))
    finally:
        _REGISTRY.pop("blobnet", None)
        sys.modules.pop("blob_backbone", None)


def test_ensemble_probabilities_average_the_models_and_the_test_time_views():
    """Each model's probabilities on each view (original, horizontal flip), averaged."""
    images = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3)).astype(np.uint8)

    def left_half_model(scale):  # P(second class) = mean brightness of the left half, scaled: a flip moves it
        inputs = keras.Input((20, 20, 3))
        outputs = keras.layers.Lambda(lambda x: scale * keras.ops.mean(x[:, :, :10], axis=(1, 2, 3))[:, None])(inputs)
        return keras.Model(inputs, outputs)

    members = [(left_half_model(1.0), lambda x: x / 255.0), (left_half_model(0.5), lambda x: x / 255.0)]
    x = images.astype(np.float32) / 255.0
    views = [x, x[:, :, ::-1]]
    expected = np.mean([scale * v[:, :, :10].mean(axis=(1, 2, 3)) for scale in (1.0, 0.5) for v in views], axis=0)
    got = pipeline.ensemble_probabilities(members, images, batch_size=2, tta=True)
    np.testing.assert_allclose(got[:, 1], expected, atol=1e-6)
    np.testing.assert_allclose(got[:, 0], 1 - expected, atol=1e-6)
    plain = pipeline.ensemble_probabilities(members[:1], images, batch_size=2)
    np.testing.assert_allclose(plain[:, 1], x[:, :, :10].mean(axis=(1, 2, 3)), atol=1e-6)
    assert pipeline.TTA_VIEW_COUNT == 2 and not np.allclose(got, plain)
