"""End to end on tiny phantoms with random weights: every registered backbone, MLflow, the table."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score

import backbones
from benchmark import audit, bench, cli, intake, metrics, pipeline, probe, recipe, report, tracking
from benchmark.config import load_config
from benchmark.model import adapt_batchnorm, build_classifier
from benchmark.trainer import TrainingFailed, ema_momentum, train_two_phase
from conftest import clean_env, image_folder, skip_serving_rehearsal

TINY = [
    "data.phantom_per_class=5", "data.phantom_size=32", "data.val_fraction=0.4",
    'model.weights="none"', "model.input_size=32", "model.head_units=8",
    "train.epochs1=1", "train.epochs2=1", "train.batch_size=8", "train.verbose=0", "train.eager=true",
]


def tiny_config(tmp_path, *extra):
    return load_config(None, [*TINY, f'tracking.results_dir="{tmp_path / "results"}"', *extra])


@pytest.fixture(scope="session")
def benched(tmp_path_factory):
    """One tiny benchmark over every registered backbone, shared by the assertions below: trained
    once per test process (pytest-xdist workers run other modules' tests in between, which ended a
    module-scoped one); its store, a model file per backbone, goes at the end."""
    tmp = tmp_path_factory.mktemp("bench")
    config = tiny_config(tmp, f"model.backbones={json.dumps(backbones.names())}")
    with pytest.MonkeyPatch.context() as monkeypatch:  # what the autouse fixtures do for each test
        monkeypatch.setenv("TUMORBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        skip_serving_rehearsal(monkeypatch)
        table, paths, name = bench.run(config)
    yield config, table, paths, name
    shutil.rmtree(tmp, ignore_errors=True)


def test_one_finished_run_and_row_per_backbone(benched):
    config, table, paths, name = benched
    client = MlflowClient(tracking.tracking_uri(config.tracking))
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert sorted(r.data.params["backbone"] for r in runs) == backbones.names()
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.params[tracking.SCORED_ON] for r in runs}) == 1  # one split: one table
    assert sorted(table["backbone"]) == backbones.names()
    assert list(table["input_px"]) == [str(config.model.input_size)] * len(table)  # the protocol, in the table
    n = len(backbones.names())
    main_table, pairs_table = paths["md"].read_text().split("## Paired comparisons")
    assert main_table.count("\n| ") == n + 1  # header + one row each
    # header + one row per pair of backbones + the ensemble of all against each, without and with the flip
    assert pairs_table.count("\n| ") == 1 + 2 * (n * (n - 1) // 2 + n)
    for run in runs:
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.toml", "confusion_matrix_val.png", "training_curves.png", "model",
                "classification_report_val.txt", "gradcam_examples.png"} <= artifacts
        assert run.data.params["weights"] == "none"
        assert run.data.tags["version.keras"] == keras.__version__
        history = client.get_metric_history(run.info.run_id, "epoch_phase")
        assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 2.0)]  # one axis, phase 2 continues


def test_every_run_logs_where_its_time_went(benched):
    """Stage seconds as metrics: the stages a tiny bench run goes through, each its own time, so
    those inside the run fit inside its wall time; reading the data (shared by every backbone of the
    command, the same figures in each run) and building the model come before the run starts."""
    config, _, _, name = benched
    client = MlflowClient(tracking.tracking_uri(config.tracking))
    before_the_run = {"stage_intake_seconds", "stage_duplicate_groups_seconds", "stage_build_seconds",
                      "stage_decoding_seconds"}
    shared = []
    for run in client.search_runs([client.get_experiment_by_name(name).experiment_id]):
        stages = {k: v for k, v in run.data.metrics.items() if k.startswith("stage_")}
        assert {"stage_probe_seconds", "stage_training_seconds", "stage_evaluation_seconds", "stage_tta_seconds",
                "stage_inference_timing_seconds", "stage_gradcam_seconds", "stage_model_logging_seconds",
                "stage_intake_seconds", "stage_duplicate_groups_seconds", "stage_build_seconds"} <= set(stages)
        assert all(v >= 0 for v in stages.values()) and stages["stage_build_seconds"] > 0
        inside = sum(v for k, v in stages.items() if k not in before_the_run)
        assert inside <= (run.info.end_time - run.info.start_time) / 1000
        shared.append((stages["stage_intake_seconds"], stages["stage_duplicate_groups_seconds"]))
    assert len(set(shared)) == 1


def _saved_model(client, run_id, tmp_path):
    """The run's logged model file, loaded to predict eagerly as the tiny run scored (train.eager): a
    graph fuses conv and BatchNorm, which moves near-tied scores of untrained models by 1e-7."""
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/model.keras",
                                                dst_path=str(tmp_path), tracking_uri=client.tracking_uri)
    model = keras.saving.load_model(local)
    model.run_eagerly = True
    return model


def _validation_runs(benched):
    """The tiny bench's tracking client, prepared data, validation samples, their labels and its runs:
    what the tests that rescore its saved models start from."""
    config, _, _, name = benched
    client = MlflowClient(tracking.tracking_uri(config.tracking))
    prepared = recipe.prepare_data(config)
    val = prepared.parts["val"]
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    return client, prepared, val, np.array([s.label for s in val]), runs


def test_logged_metrics_equal_scikit_learn_on_the_saved_model(benched, tmp_path):
    table = benched[1]
    client, prepared, val, y, runs = _validation_runs(benched)
    classes = prepared.dataset.class_names
    for run in runs:
        spec = backbones.get(run.data.params["backbone"])
        model = _saved_model(client, run.info.run_id, tmp_path)
        probs = model.predict(pipeline.make_dataset(prepared.dataset, val, spec.preprocess, 32, 8), verbose=0)
        pred = probs.argmax(axis=1)
        logged = run.data.metrics
        precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
        assert logged["val_accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert logged["val_macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
        assert logged["val_roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-6)
        for i, cls in enumerate(classes):
            assert logged[f"val_precision_{cls}"] == pytest.approx(precision[i])
            assert logged[f"val_recall_{cls}"] == pytest.approx(recall[i])
            assert logged[f"val_f1_{cls}"] == pytest.approx(f1[i])
            assert logged[f"val_support_{cls}"] == support[i]
        row = table.set_index("backbone").loc[spec.name]
        assert row["val_accuracy"] == pytest.approx(logged["val_accuracy"])


def test_test_time_flip_scores_are_the_mean_over_each_image_and_its_mirror(benched, tmp_path):
    client, prepared, val, y, runs = _validation_runs(benched)
    images = np.asarray(pipeline.decoded_images(prepared.dataset, val, 32), dtype=np.float32)
    for run in runs:
        spec = backbones.get(run.data.params["backbone"])
        model = _saved_model(client, run.info.run_id, tmp_path)
        views = [model.predict(spec.preprocess(x), verbose=0) for x in (images, images[:, :, ::-1])]
        averaged = metrics.class_probabilities(np.mean(views, axis=0))
        logged = _artifact_frame(client, run.info.run_id, "predictions_tta_val.csv", tmp_path / run.info.run_id)
        assert list(logged["source"]) == [s.source for s in val]
        np.testing.assert_allclose(logged[recipe.probability_columns(prepared.dataset.class_names)], averaged,
                                   atol=1e-5)
        m = run.data.metrics
        assert m["tta_val_accuracy"] == pytest.approx(accuracy_score(y, averaged.argmax(1)))
        assert m["tta_val_macro_f1"] == pytest.approx(f1_score(y, averaged.argmax(1), average="macro",
                                                               zero_division=0))


def test_predict_finds_models_by_run_id_and_best(benched):
    from benchmark import modelfile, predict

    config, table, _, name = benched
    best = table.sort_values("val_macro_f1", ascending=False, kind="stable").iloc[0]
    (by_best,) = predict.resolve_models(f"best:{name}", config.tracking)
    assert modelfile.read_description(by_best)["backbone"] == best["backbone"]
    for row in table.itertuples():
        (path,) = predict.resolve_models(row.run_id, config.tracking)
        description = modelfile.read_description(path)
        assert description["backbone"] == row.backbone and description["input_size"] == 32
        assert description["class_names"] == ["glioma", "meningioma", "notumor", "pituitary"]
    with pytest.raises(modelfile.ModelFileError, match="neither a model file"):
        predict.resolve_models("no-such-thing", config.tracking)


def test_report_rebuilds_the_same_table_from_mlflow_alone(benched, tmp_path):
    config, table, paths, name = benched
    before = paths["csv"].read_text()
    paths["csv"].unlink()
    result = subprocess.run(
        [sys.executable, "-m", "benchmark", "report", "--set", f'tracking.results_dir="{config.tracking.results_dir}"',
         "--set", "data.phantom_per_class=5", "--set", "data.phantom_size=32"],
        capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert paths["csv"].read_text() == before
    assert len(pd.read_csv(paths["csv"])) == len(backbones.names())


def test_report_runs_tables_the_runs_named_on_the_command_line(benched, tmp_path, capsys):
    config, table, _, name = benched
    picked = table.sort_values("backbone").iloc[[0, -1]]
    out = tmp_path / "picked"
    args = cli.build_parser().parse_args(
        ["report", "--runs", ",".join(picked["run_id"]), "--dataset", name,
         "--set", f'tracking.uri="{tracking.tracking_uri(config.tracking)}"', "--set", f'tracking.results_dir="{out}"'])
    code = args.run(args)
    assert code == 0, capsys.readouterr().err
    written = pd.read_csv(out / name / "comparison.csv")
    assert list(written["run_id"]) == list(picked["run_id"]) and len(table) > 2


def test_report_runs_refuses_unknown_and_unfinished_runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("set")

    def run(backbone, status="FINISHED", kind="bench"):
        made = client.create_run(experiment_id, tags={tracking.KIND_TAG: kind})
        client.log_param(made.info.run_id, "backbone", backbone)
        if status != "RUNNING":
            client.set_terminated(made.info.run_id, status)
        return made.info.run_id

    old_vgg, lite0, new_vgg = run("vgg16"), run("efficientnet_lite0"), run("vgg16")
    running, parent = run("resnet50", "RUNNING"), run("resnet50", kind="bench-cv")
    fold = run("resnet50", kind="bench-fold")
    assert [r.info.run_id for r in report.select_runs(client, "set")] == [lite0, new_vgg]
    assert [r.info.run_id for r in report.select_runs(client, "set", only=[old_vgg, lite0])] == [lite0, old_vgg]
    for wrong in (running, parent, "no-such-run"):
        with pytest.raises(LookupError, match=f"not finished bench runs of experiment 'set': {wrong}"):
            report.select_runs(client, "set", only=[lite0, wrong])
    with pytest.raises(LookupError, match="needs --source cv"):
        report.select_runs(client, "set", only=[parent])
    with pytest.raises(LookupError, match="named by its parent"):  # a fold's run, asked for as a cv table row
        report.select_runs(client, "set", source="cv", only=[fold])
    assert [r.info.run_id for r in report.select_runs(client, "set", source="cv", only=[parent])] == [parent]


def test_report_runs_compares_the_recipes_of_one_backbone_by_their_saved_configs(tmp_path):
    """Two runs of one backbone (`report --runs`) are two rows named by the recipe settings their
    saved configs differ in (not where their results went), and are paired image by image."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("set")
    truth = [0, 1, 0, 1]

    def run(backbone, overrides, p_yes):
        made = client.create_run(experiment_id, tags={tracking.KIND_TAG: "bench"}).info.run_id
        for key, value in {"backbone": backbone, "weights": "imagenet", "input_size": 224,
                           "class_names": json.dumps(["no", "yes"])}.items():
            client.log_param(made, key, value)
        accuracy = float(np.mean((np.asarray(p_yes) > 0.5) == np.asarray(truth)))
        client.log_metric(made, "val_accuracy", accuracy)
        client.log_text(made, load_config(None, overrides).to_toml(), "config.toml")
        predictions = pd.DataFrame({"source": ["a", "b", "c", "d"], "label": truth,
                                    "prob_no": 1 - np.asarray(p_yes), "prob_yes": p_yes})
        client.log_text(made, predictions.to_csv(index=False), "predictions_val.csv")
        client.set_terminated(made, "FINISHED")
        return made

    six = run("efficientnet_lite0", ["train.epochs2=6", 'tracking.results_dir="one"'], [0.2, 0.9, 0.6, 0.4])
    twelve = run("efficientnet_lite0", ["train.epochs2=12", "train.cache_views=8", 'tracking.results_dir="two"'],
                 [0.1, 0.8, 0.3, 0.7])
    vgg = run("vgg16", ["train.epochs2=6"], [0.6, 0.4, 0.6, 0.4])
    runs = report.select_runs(client, "set", only=[twelve, vgg, six])
    assert [r.info.run_id for r in runs] == [twelve, six, vgg]
    table, paths = report.build(client, "set", runs, tmp_path / "results", resamples=200)
    assert table["recipe"].tolist() == ["train.epochs2=12, train.cache_views=8", "train.epochs2=6, train.cache_views=4",
                                        ""]
    pairs = pd.read_csv(paths["pairs"]).set_index(["split", "a", "b"])
    twelve_six = pairs.loc[("val", "efficientnet_lite0 (train.epochs2=12, train.cache_views=8)",
                            "efficientnet_lite0 (train.epochs2=6, train.cache_views=4)")]
    assert (twelve_six["accuracy_a"], twelve_six["accuracy_b"]) == (1.0, 0.5)
    assert (twelve_six["only_a_right"], twelve_six["only_b_right"]) == (2, 0)
    assert pairs.loc[("val", "efficientnet_lite0 (train.epochs2=6, train.cache_views=4)", "vgg16"), "accuracy_b"] == 0.0
    assert "| efficientnet_lite0 | train.epochs2=12, train.cache_views=8 |" in paths["md"].read_text()


def test_pairs_and_the_ensemble_match_images_by_name_and_refuse_different_images():
    """Per-image predictions are paired by file, whatever order each run wrote them in; runs scored
    on other images get a note instead of a comparison."""
    def frame(sources, labels, p_one):
        return pd.DataFrame({"source": sources, "label": labels, "prob_no": 1 - np.asarray(p_one),
                             "prob_yes": p_one})
    a = frame(["a.png", "b.png", "c.png", "d.png"], [1, 0, 1, 0], [0.9, 0.2, 0.4, 0.3])  # 3 of 4 right
    b = frame(["d.png", "c.png", "b.png", "a.png"], [0, 1, 0, 1], [0.6, 0.7, 0.1, 0.8])  # shuffled; 3 of 4
    row = report.pair("val", "A", a, "B", b, resamples=200)
    assert (row["n_images"], row["accuracy_a"], row["accuracy_b"]) == (4, 0.75, 0.75)
    assert (row["only_a_right"], row["only_b_right"], row["note"]) == (1, 1, "")  # d.png: A; c.png: B
    ensemble = report._ensemble({"A": a, "B": b})
    assert ensemble["source"].tolist() == ["a.png", "b.png", "c.png", "d.png"]
    assert ensemble["prob_yes"].tolist() == pytest.approx([0.85, 0.15, 0.55, 0.45])  # all 4 right
    other = frame(["a.png", "b.png", "c.png", "e.png"], [1, 0, 1, 0], [0.9, 0.2, 0.4, 0.3])
    refused = report.pair("val", "A", a, "C", other, resamples=200)
    assert refused["note"].startswith("not the same images") and refused["n_images"] == 3
    assert report._ensemble({"A": a, "C": other}) is None


def test_probe_flags_say_which_rows_and_how_many_folds_ended_below_their_probe(tmp_path):
    """A fine-tuned model below its own linear probe is a recipe bug: flagged on the mean, and on
    the folds a mean above the probe hides."""
    probe = {"accuracy": 0.85, "macro_f1": 0.84}
    assert report.below_probe({"accuracy": 0.90, "macro_f1": 0.88}, probe) == []
    assert report.below_probe({"accuracy": 0.90, "macro_f1": 0.80}, probe) == ["macro_f1"]
    assert report.below_probe(dict(probe), probe) == []  # equal is not below
    assert report.below_probe({"accuracy": 0.80, "macro_f1": 0.80}, probe) == ["accuracy", "macro_f1"]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("set")

    def parent(backbone, accuracy, probe, below=None):
        made = client.create_run(experiment_id, tags={tracking.KIND_TAG: "bench-cv"})
        for key, value in {"backbone": backbone, "weights": "imagenet", "folds": 5, "n_images": 20,
                           "class_names": json.dumps(["no", "yes"])}.items():
            client.log_param(made.info.run_id, key, value)
        for name in report.PROBE:
            client.log_metric(made.info.run_id, f"val_{name}_mean", accuracy)
            client.log_metric(made.info.run_id, f"probe_val_{name}_mean", probe)
        if below is not None:
            client.log_metric(made.info.run_id, report.FOLDS_BELOW_PROBE, below)
        return client.get_run(made.info.run_id)

    runs = [parent("vgg16", 0.8, 0.9), parent("resnet50", 0.9, 0.8, below=2),
            parent("efficientnetb0", 0.9, 0.8, below=0)]
    table = report.comparison_table(runs, "cv").set_index("backbone")
    assert table.loc["vgg16", "vs_probe"] == "BELOW PROBE: accuracy, macro_f1"
    assert table.loc["resnet50", "vs_probe"] == "above or equal; folds below it: 2"
    assert table.loc["efficientnetb0", "vs_probe"] == "above or equal"
    assert table.loc["resnet50", report.FOLDS_BELOW_PROBE] == 2 and pd.isna(table.loc["vgg16", report.FOLDS_BELOW_PROBE])
    flagged = report.terminal(table.reset_index(), "cv").splitlines()[-2:]
    assert flagged == ["vgg16: BELOW PROBE: accuracy, macro_f1", "resnet50: above or equal; folds below it: 2"]


def test_a_table_joins_only_runs_scored_on_the_same_held_out_images(tmp_path, capsys):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("set")

    def run(backbone, scored_on):
        made = client.create_run(experiment_id, tags={tracking.KIND_TAG: "bench"})
        client.log_param(made.info.run_id, "backbone", backbone)
        client.log_param(made.info.run_id, tracking.SCORED_ON, scored_on)
        client.set_terminated(made.info.run_id, "FINISHED")
        return made.info.run_id

    vgg16, lite0, resnet50 = run("vgg16", "split-a"), run("efficientnet_lite0", "split-b"), run("resnet50", "split-a")
    # The newest run (resnet50's) sets the images: lite0, last run on another split, is left out, said so.
    assert [r.info.run_id for r in report.select_runs(client, "set")] == [resnet50, vgg16]
    assert f"left out of the table: efficientnet_lite0 run {lite0}, scored on other" in capsys.readouterr().err
    # A command's own run sets them.
    assert [r.info.run_id for r in report.select_runs(client, "set", made=[lite0])] == [lite0]


def _tiny_parts(tmp_path, mode="binary"):
    from benchmark.phantoms import phantom_dataset

    dataset = intake.load_dataset(phantom_dataset(mode, per_class=6, size=32, seed=1, cache=tmp_path))
    return dataset, intake.split(dataset, 0.34, seed=1)


def _tiny_model_and_feed(tmp_path, name: str, mode: str, *overrides) -> tuple:
    """(spec, dataset, parts, config, base, model, feed): `name` from random init at 32 px with an
    8-unit head, on the tiny phantom set of `mode`; phase 2 unfreezes its top group."""
    spec = backbones.get(name)
    dataset, parts = _tiny_parts(tmp_path, mode)
    config = load_config(None, ["train.unfreeze=1", "train.verbose=0", *overrides])
    keras.utils.set_random_seed(0)
    base, _ = backbones.build_base(spec, 32, "none")
    model = build_classifier(base, 32, len(dataset.class_names), 8, 0.0)
    feed = recipe.make_feed(config, recipe.Prepared(dataset, parts, "tiny", "tiny"), spec, 32, "none", config.seed)
    return spec, dataset, parts, config, base, model, feed


class _Snapshots(keras.callbacks.Callback):
    """Base weights per layer when phase 2 begins and ends (before the best-weights restore);
    train_two_phase sets `phase` before each phase's fit."""

    def __init__(self, base):
        super().__init__()
        self.base, self.phase, self.start, self.end = base, 0, None, None

    def _weights(self):
        return {layer.name: [w.numpy().copy() for w in layer.weights] for layer in self.base.layers}

    def on_train_begin(self, logs=None):
        if self.phase == 2:
            self.start = self._weights()

    def on_train_end(self, logs=None):
        if self.phase == 2:
            self.end = self._weights()


def _dense_classifier(n_classes: int, seed: int) -> tuple:
    """(features, class indices, an untrained one-layer classifier, its class probabilities) for
    checking a loss by hand; two classes use one sigmoid unit, as the models here do."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(8, 3)).astype("float32")
    labels = rng.integers(0, n_classes, 8)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1 if n_classes == 2 else n_classes,
                                                   activation="sigmoid" if n_classes == 2 else "softmax")(inputs))
    predicted = model.predict(features, verbose=0)
    return features, labels, model, np.hstack([1 - predicted, predicted]) if n_classes == 2 else predicted


def _as_fed(targets: np.ndarray, n_classes: int) -> np.ndarray:
    """Class indices or soft targets as the feeds give them: one sigmoid unit gets P(class 1), (N, 1)."""
    if targets.ndim == 1:
        return targets.reshape(-1, 1).astype("float32") if n_classes == 2 else targets
    return targets[:, 1:] if n_classes == 2 else targets


@pytest.mark.parametrize("n_classes", [2, 4])
def test_label_smoothing_scores_against_the_smoothed_targets(n_classes):
    from benchmark.trainer import compile_model, make_optimizer

    features, labels, model, probabilities = _dense_classifier(n_classes, 0)
    for smoothing in (0.0, 0.3):
        targets = np.eye(n_classes)[labels] * (1 - smoothing) + smoothing / n_classes
        expected = -(targets * np.log(probabilities)).sum(1).mean()
        compile_model(model, n_classes, make_optimizer(1e-3), "off", label_smoothing=smoothing)
        got = model.evaluate(features, _as_fed(labels, n_classes), batch_size=8, verbose=0, return_dict=True)["loss"]
        assert got == pytest.approx(expected, rel=1e-4), smoothing


@pytest.mark.parametrize("n_classes", [2, 4])
def test_soft_targets_score_as_cross_entropy_and_class_indices_as_before(n_classes):
    """With mixup the loss takes soft targets on training batches and class indices on validation."""
    from benchmark.trainer import compile_model, make_optimizer

    features, labels, model, probabilities = _dense_classifier(n_classes, 1)
    soft = np.random.default_rng(2).dirichlet(np.ones(n_classes), 8).astype("float32")
    compile_model(model, n_classes, make_optimizer(1e-3), "off", soft_targets=True)
    for targets, fed in ((np.eye(n_classes)[labels], labels), (soft, soft)):
        got = model.evaluate(features, _as_fed(fed, n_classes), batch_size=8, verbose=0, return_dict=True)
        assert got["loss"] == pytest.approx(-(targets * np.log(probabilities)).sum(1).mean(), rel=1e-4)
        assert got["accuracy"] == pytest.approx(np.mean(probabilities.argmax(1) == targets.argmax(1)))


@pytest.mark.parametrize("mode", ["binary", "4class"])
@pytest.mark.parametrize("views", [0, 2], ids=["streamed", "cached"])
def test_mixup_feeds_soft_targets_to_training_and_class_indices_to_validation(views, mode, tmp_path):
    spec, dataset, parts, config, base, model, feed = _tiny_model_and_feed(
        tmp_path, "vgg16", mode, "train.epochs1=1", "train.epochs2=1", "train.eager=true", "train.batch_size=8",
        f"train.cache_views={views}", "train.mixup=0.4")
    n_classes = len(dataset.class_names)
    _, train_data, val_data = feed.phase(model, base, spec, 1)
    x, targets, weights = (np.asarray(a) for a in next(iter(train_data)))
    one_hot = np.hstack([1 - targets, targets]) if n_classes == 2 else targets  # one sigmoid unit: P(class 1)
    assert targets.shape == (len(x), 1 if n_classes == 2 else n_classes) and (weights > 0).all()
    np.testing.assert_allclose(one_hot.sum(1), 1, rtol=1e-5)
    assert ((one_hot > 0) & (one_hot < 1)).any()  # mixed rows, not labels
    val_labels = np.asarray(val_data[1] if isinstance(val_data, tuple) else next(iter(val_data))[1])
    assert set(np.unique(val_labels)) <= set(range(n_classes))  # validation keeps its labels
    result = train_two_phase(model, base, spec, feed, config.train, n_classes)
    assert [e["phase"] for e in result.epochs] == [1, 2]
    assert all(0 <= e["accuracy"] <= 1 and np.isfinite(e["val_loss"]) for e in result.epochs)


@pytest.mark.parametrize("views", [0, 2], ids=["streamed", "cached"])
@pytest.mark.parametrize("name", backbones.names())
def test_phase_two_changes_only_the_unfrozen_groups(name, views, tmp_path, monkeypatch):
    spec = backbones.get(name)
    # Random weights push efficientnet_lite0's top into ReLU6's flat ends (no gradient at all); its
    # ImageNet weights are made offline, so it is tested with them, the case that matters.
    weights = "imagenet" if spec.imagenet_make is not None else "none"
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    dataset, parts = _tiny_parts(tmp_path)
    prepared = recipe.Prepared(dataset, parts, "tiny", "tiny")
    config = load_config(None, ["train.epochs1=1", "train.epochs2=2", "train.lr2=1e-2", "train.unfreeze=1",
                                "train.verbose=0", "train.eager=true", "train.patience=5", "train.batch_size=4",
                                f"train.cache_views={views}"])
    keras.utils.set_random_seed(0)
    base, _ = backbones.build_base(spec, 32, weights)
    model = build_classifier(base, 32, 2, 8, 0.0)
    snapshots = _Snapshots(base)
    feed = recipe.make_feed(config, prepared, spec, 32, weights, config.seed)
    result = train_two_phase(model, base, spec, feed, config.train, 2, callbacks=[snapshots])
    assert result.unfrozen == spec.group_names[-1:]
    assert result.phase2_start == 1 and [e["phase"] for e in result.epochs] == [1, 2, 2]
    changed_top = False
    for layer in base.layers:
        if not snapshots.start[layer.name]:
            continue
        same = all(np.array_equal(a, b) for a, b in zip(snapshots.start[layer.name], snapshots.end[layer.name]))
        in_top = spec.group_of(layer.name) in result.unfrozen
        if not in_top or isinstance(layer, keras.layers.BatchNormalization):
            assert same, f"{layer.name} is frozen in phase 2 but its weights changed"
        elif not same:
            changed_top = True
    assert changed_top, "no weight of the unfrozen group changed in phase 2"


def _toy_base():
    """Two conv + BatchNormalization groups (b1 below b2) and a spec for them."""
    inputs = keras.Input((8, 8, 3), name="b1_input")
    x = keras.layers.BatchNormalization(name="b1_bn")(keras.layers.Conv2D(4, 3, name="b1_conv")(inputs))
    x = keras.layers.BatchNormalization(name="b2_bn")(keras.layers.Conv2D(5, 3, name="b2_conv")(x))
    spec = backbones.BackboneSpec("toy", None, None, "", 8, (("b1", ("b1_",)), ("b2", ("b2_",))), "b2_conv")
    return keras.Model(inputs, x), spec


@pytest.mark.parametrize("unfreeze", [1, 2])
def test_adapted_batchnorm_holds_the_training_images_statistics(unfreeze):
    """AdaBN: the adapted layers' moving mean and variance are the mean over batches of their
    inputs' batch statistics (each input computed with the adapted layers below normalising by
    batch); layers of frozen groups keep theirs; the base is left frozen, momenta untouched."""
    keras.utils.set_random_seed(0)
    base, spec = _toy_base()
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, (6, 8, 8, 3)).astype("float32") for _ in range(3)]
    loaded = {name: [w.numpy().copy() for w in base.get_layer(name).weights] for name in ("b1_bn", "b2_bn")}
    assert adapt_batchnorm(base, spec, unfreeze, iter(batches)) == unfreeze
    b1 = base.get_layer("b1_bn")

    def by_batch(x):  # b1 normalising with its batch statistics (gamma 1, beta 0 as initialised)
        x = np.asarray(x)
        return (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + b1.epsilon)

    b1_output = by_batch if unfreeze == 2 else b1  # a frozen b1 normalises with its loaded statistics
    expected = {}
    for name, conv_input in (("b1_bn", lambda b: b), ("b2_bn", lambda b: b1_output(base.get_layer("b1_conv")(b)))):
        conv = base.get_layer(name.replace("bn", "conv"))
        outputs = [np.asarray(conv(conv_input(b))) for b in batches]
        expected[name] = (np.mean([o.mean(axis=(0, 1, 2)) for o in outputs], axis=0),
                          np.mean([o.var(axis=(0, 1, 2)) for o in outputs], axis=0))
    for name in ("b1_bn", "b2_bn"):
        layer = base.get_layer(name)
        adapted = spec.group_of(name) in spec.group_names[-unfreeze:]
        if adapted:
            np.testing.assert_allclose(layer.moving_mean.numpy(), expected[name][0], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(layer.moving_variance.numpy(), expected[name][1], rtol=1e-3, atol=1e-4)
        else:
            assert all(np.array_equal(w.numpy(), v) for w, v in zip(layer.weights, loaded[name]))
        assert layer.momentum == 0.99 and not layer.trainable


def test_fine_tuning_with_batch_statistics_adapts_and_trains_only_the_unfrozen_batchnorm(tmp_path, monkeypatch):
    """train.batchnorm = "train" on a pretrained base: the model factory adapts the unfrozen groups'
    BatchNormalization statistics to the training images before the probe (AdaBN), and phase 2
    goes on updating them; the frozen groups' BatchNormalization keeps its ImageNet values."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    dataset, parts = _tiny_parts(tmp_path)
    prepared = recipe.Prepared(dataset, parts, "tiny", "tiny")
    config = load_config(None, ["train.epochs2=2", "train.lr2=1e-3", "train.unfreeze=1", "train.verbose=0",
                                "train.eager=true", "train.batch_size=4", "train.cache_views=0",
                                'train.batchnorm="train"', 'train.head_init="probe"', "model.head_units=0",
                                "model.input_size=32", 'model.backbones=["efficientnet_lite0"]'])
    spec = backbones.get("efficientnet_lite0")
    loaded, _ = backbones.build_base(spec, 32, "imagenet")
    built = recipe.build(config, prepared, spec.name, "imagenet")
    top = spec.group_names[-1]

    def statistics(base):
        return {layer.name: layer.moving_mean.numpy().copy() for layer in base.layers
                if isinstance(layer, keras.layers.BatchNormalization)}

    imagenet, adapted = statistics(loaded), statistics(built.base)
    for name in imagenet:
        in_top = spec.group_of(name) == top
        assert np.array_equal(imagenet[name], adapted[name]) != in_top, name

    # The probe baseline sees the network as loaded; the head starts at a probe of the adapted features.
    def probe_on(base):
        built_like = recipe.Built(spec, 32, base, None, "imagenet", None)
        x = {split: recipe._pooled_features(built_like, pipeline.decoded_images(dataset, parts[split], 32), 4)
             for split in ("train", "val")}
        fitted = probe.fit(x["train"][None], [s.label for s in parts["train"]], config.seed)
        return fitted, fitted.predict_proba(x["val"])

    baseline, baseline_val = probe_on(loaded)
    adapted_probe, _ = probe_on(built.base)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run() as run:
            scores = recipe.run_probe(config, prepared, built, score_test=False)
        logged = MlflowClient().get_run(run.info.run_id).data.metrics
    finally:
        mlflow.set_tracking_uri(None)
    labels = [s.label for s in parts["val"]]
    assert scores["val"]["accuracy"] == logged["probe_val_accuracy"] == accuracy_score(labels, baseline_val.argmax(1))
    assert "probe_adapted_val_accuracy" in logged
    head = built.model.get_layer("head_output").get_weights()
    for got, want in zip(head, probe.head_weights(adapted_probe)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert statistics(built.base).keys() == adapted.keys()
    assert all(np.array_equal(statistics(built.base)[name], adapted[name]) for name in adapted)
    ended = {}
    at_end = keras.callbacks.LambdaCallback(on_train_end=lambda logs: ended.update(statistics(built.base)))
    result = train_two_phase(built.model, built.base, spec, built.feed, config.train, 2, callbacks=[at_end],
                             head_ready=True)  # phase 2 only, from the (untrained) head
    assert result.unfrozen == [top]
    trained = ended  # before the best weights are restored
    for name in imagenet:
        changed = not np.array_equal(adapted[name], trained[name])
        assert changed == (spec.group_of(name) == top), name


@pytest.mark.parametrize("weights", ["none", "imagenet"])
def test_batchnorm_trained_from_scratch_forgets_its_initial_statistics_within_an_epoch(weights, tmp_path,
                                                                                      monkeypatch):
    """From scratch, moving statistics use momentum 0.9 (a small set gives few steps an epoch);
    pretrained statistics keep Keras' 0.99."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    dataset, parts = _tiny_parts(tmp_path)
    config = load_config(None, ["model.input_size=32", 'model.backbones=["efficientnet_lite0"]'])
    built = recipe.build(config, recipe.Prepared(dataset, parts, "tiny", "tiny"), "efficientnet_lite0", weights)
    momenta = {layer.momentum for layer in built.base.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == ({0.9} if weights == "none" else {0.99})


def _train_tiny_and_predict(tmp_path, name: str, *overrides, callbacks=()) -> tuple:
    """Both phases of `name` (random init, 32 px) on two tiny classes, with every epoch's validation
    outputs kept; and what the model it ends with predicts on the validation images."""
    spec, dataset, parts, config, base, model, feed = _tiny_model_and_feed(
        tmp_path, name, "binary", "train.lr1=1e-2", "train.batch_size=4", "train.cache_views=2", *overrides)
    labels = [s.label for s in parts["val"]]
    result = train_two_phase(model, base, spec, feed, config.train, 2, callbacks=callbacks,
                             score=("accuracy", labels, dataset.class_names))
    return result, recipe._predict(model, dataset, parts["val"], spec, 32, 4)


@pytest.mark.parametrize("name", backbones.names())
def test_best_epoch_outputs_are_what_the_restored_model_predicts(name, tmp_path):
    """A sweep trial is scored from the validation outputs its best epoch had; they must be the
    restored model's predictions on the images (the cache stores the frozen prefix as float16)."""
    result, on_images = _train_tiny_and_predict(tmp_path, name, "train.epochs1=2", "train.epochs2=2",
                                                "train.lr2=1e-3")
    assert sorted(result.val_outputs) == [e["epoch"] for e in result.epochs]
    assert result.best_epoch == min(result.epochs, key=lambda e: e["val_loss"])["epoch"]
    np.testing.assert_allclose(metrics.class_probabilities(result.best_val_outputs), on_images, atol=2e-3)


def test_keep_last_runs_phase_two_to_the_end_and_ends_on_its_last_epoch(tmp_path):
    """train.keep = "last": phase 2 runs every epoch (patience is not used) and the model predicts
    what its last epoch did, not the restored weights of the best epoch (here phase 1's)."""
    result, on_images = _train_tiny_and_predict(tmp_path, "vgg16", "train.epochs1=1", "train.epochs2=4",
                                                "train.lr2=3e-2", "train.patience=1", 'train.keep="last"')
    assert [e["epoch"] for e in result.epochs if e["phase"] == 2] == [1, 2, 3, 4]
    assert result.best_epoch == 4
    losses = [e["val_loss"] for e in result.epochs]
    assert min(losses) < losses[-1]  # the best epoch was another: restoring it would differ
    np.testing.assert_allclose(metrics.class_probabilities(result.val_outputs[4]), on_images, atol=2e-3)


class _PhaseTwoSteps(keras.callbacks.Callback):
    """The trained weights after every step of phase 2 and at every epoch's end (what the
    callbacks before this one, which keep the best weights and score the epoch, saw), and the
    variables themselves, to read what the run ends with; train_two_phase sets `phase`."""

    def __init__(self):
        super().__init__()
        self.phase, self.steps, self.epoch_ends, self.variables = 0, [], [], []

    def _values(self):
        return [w.numpy().copy() for w in self.variables]

    def on_train_begin(self, logs=None):
        if self.phase == 2:
            self.variables = self.model.trainable_weights

    def on_train_batch_end(self, batch, logs=None):
        if self.phase == 2:
            self.steps.append(self._values())

    def on_epoch_end(self, epoch, logs=None):
        if self.phase == 2:
            self.epoch_ends.append(self._values())


def test_weight_averaging_scores_keeps_and_ends_on_the_moving_average(tmp_path):
    """train.ema_epochs: phase 2's epochs are scored and kept on the moving average of the weights
    after each step, avg = m avg + (1 - m) w with a window of 1 / (1 - m) steps = ema_epochs epochs,
    and the run ends on the average after the last step (train.keep = "last")."""
    steps = _PhaseTwoSteps()
    result, _ = _train_tiny_and_predict(
        tmp_path, "vgg16", "train.epochs1=1", "train.epochs2=3", "train.lr2=3e-2", 'train.keep="last"',
        "train.ema_epochs=1", callbacks=[steps])
    assert [e["epoch"] for e in result.epochs if e["phase"] == 2] == [1, 2, 3]
    batches = len(steps.steps) // 3
    momentum = ema_momentum(1, batches)
    assert batches > 1 and momentum == pytest.approx(1 - 1 / batches)
    averages = [steps.steps[0]]  # the first step starts the average
    for weights in steps.steps[1:]:
        averages.append([momentum * a + (1 - momentum) * w for a, w in zip(averages[-1], weights)])
    for epoch in range(3):
        for got, want in zip(steps.epoch_ends[epoch], averages[(epoch + 1) * batches - 1]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    ended = [w.numpy() for w in steps.variables]
    for got, want in zip(ended, averages[-1]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert any(not np.allclose(got, raw, atol=1e-5) for got, raw in zip(ended, steps.steps[-1]))


def test_nan_loss_fails_the_run_loudly(tmp_path, nan_plugin):
    config = tiny_config(tmp_path, *nan_plugin)
    with pytest.raises(TrainingFailed, match="nan_net: the loss became NaN/inf in phase 1 at epoch 1"):
        bench.run(config)
    client = MlflowClient(tracking.tracking_uri(config.tracking))
    (run,) = client.search_runs([client.get_experiment_by_name("phantoms-4class").experiment_id])
    assert run.info.status == "FAILED" and "NaN" in run.data.tags["failure"]
    assert "val_accuracy" not in run.data.metrics


def test_unreachable_tracking_server_fails_before_training(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("training started although the tracking server is unreachable")

    monkeypatch.setattr(recipe, "prepare_data", must_not_run)
    monkeypatch.setattr(bench, "run_backbone", must_not_run)
    config = tiny_config(tmp_path, 'tracking.uri="http://127.0.0.1:9"')
    with pytest.raises(tracking.TrackingUnavailable, match="http://127.0.0.1:9 is unreachable"):
        bench.run(config)


def test_missing_weights_fall_back_loudly_or_fail(tmp_path, monkeypatch, capsys):
    """resnet50's ImageNet file comes from a download only (no PyPI wheel holds it)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras"))
    monkeypatch.setattr(tracking.urllib.request, "urlopen", None)  # never used for sqlite; guards the network
    strict = tiny_config(tmp_path, 'model.weights="imagenet"', 'model.backbones=["resnet50"]')
    with pytest.raises(backbones.WeightsUnavailable, match="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        recipe.resolve_weights(strict)
    lenient = tiny_config(tmp_path, 'model.weights="imagenet"', 'model.weights_fallback="none"',
                          'model.backbones=["resnet50"]')
    assert recipe.resolve_weights(lenient) == {"resnet50": "none"}
    assert "falls back to weights 'none'" in capsys.readouterr().err


def test_runs_carry_dataset_inputs_in_a_model_training_experiment(benched):
    config, table, paths, name = benched
    client = MlflowClient(tracking.tracking_uri(config.tracking))
    experiment = client.get_experiment_by_name(name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens the runs table
    runs = client.search_runs([experiment.experiment_id])
    fingerprint = runs[0].data.params["data_fingerprint"]
    for run in runs:
        inputs = run.inputs.dataset_inputs
        contexts = sorted(next(t.value for t in i.tags if t.key == "mlflow.data.context") for i in inputs)
        assert contexts == ["train", "validation"]
        assert all(i.dataset.name == name and i.dataset.digest.startswith(fingerprint) for i in inputs)
        images = {next(t.value for t in i.tags if t.key == "mlflow.data.context"):
                  int(next(t.value for t in i.tags if t.key == "images")) for i in inputs}
        assert images == {"train": int(run.data.params["n_train"]), "validation": int(run.data.params["n_val"])}
    names = [run.info.run_name for run in runs]
    assert len(set(names)) == len(names) and all(n.startswith(r.data.params["backbone"]) for n, r in zip(names, runs))


def test_the_table_shows_this_commands_runs_when_a_command_beside_it_started_later(tmp_path, monkeypatch):
    """Two benches on one store at once: the newest finished run per backbone would be the other
    command's, so each command's table comes from the runs it made (its champion is chosen from the
    same selection)."""
    made = {}
    train_and_log = recipe.train_and_log

    def train_and_log_while_another_command_finishes(*args):
        outcome = train_and_log(*args)
        made["ours"] = mlflow.active_run().info.run_id
        client = MlflowClient()
        other = client.create_run(mlflow.active_run().info.experiment_id, tags={tracking.KIND_TAG: "bench"})
        client.log_param(other.info.run_id, "backbone", "vgg16")
        client.log_metric(other.info.run_id, "val_macro_f1", 1.0)
        client.set_terminated(other.info.run_id, "FINISHED")
        made["other"] = other.info.run_id
        return outcome

    monkeypatch.setattr(recipe, "train_and_log", train_and_log_while_another_command_finishes)
    config = tiny_config(tmp_path, 'model.backbones=["vgg16"]', "tracking.log_model=false")
    table, _, name = bench.run(config)
    client = MlflowClient(tracking.tracking_uri(config.tracking))
    assert [run.info.run_id for run in report.select_runs(client, name)] == [made["other"]]  # the newest
    assert list(table["run_id"]) == [made["ours"]]


def test_models_are_mlflow_models_and_the_best_is_the_registered_champion(benched):
    import mlflow.pyfunc

    from benchmark import predict, report

    config, table, _, name = benched
    client = MlflowClient(tracking.tracking_uri(config.tracking))
    registered = f"tumorbench-{name}"
    champion = client.get_model_version_by_alias(registered, "champion")
    best = table.sort_values("val_macro_f1", ascending=False, kind="stable").iloc[0]
    assert champion.run_id == best["run_id"]
    assert best["registered"] == f"{registered} v{champion.version}"
    runs = report.select_runs(client, name)
    assert report.register_best(client, name, runs) is None  # not better than itself: the alias stays
    assert client.get_model_version_by_alias(registered, "champion").version == champion.version

    files = sorted(recipe.data_path(config).rglob("*.png"))[:3]
    pixels = np.stack([pipeline.resize(intake.load_rgb(f), 32) for f in files])
    models = predict.resolve_models(best["run_id"], config.tracking)
    expected = [[row[f"prob_{c}"] for c in ("glioma", "meningioma", "notumor", "pituitary")]
                for row in predict.run(models, [str(f) for f in files])]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{registered}@champion")  # raw RGB in, probabilities out
    assert pyfunc.metadata.metadata["tumorbench"]["backbone"] == best["backbone"]
    got = pyfunc.predict(pixels)
    assert list(got.columns) == ["prob_glioma", "prob_meningioma", "prob_notumor", "prob_pituitary"]
    np.testing.assert_allclose(got.to_numpy(), expected, atol=1e-5)
    by_alias = predict.run(predict.resolve_models(f"models:/{registered}@champion", config.tracking),
                           [str(f) for f in files])
    np.testing.assert_allclose([[r[f"prob_{c}"] for c in ("glioma", "meningioma", "notumor", "pituitary")]
                                for r in by_alias], expected, atol=1e-6)
    (version_file,) = predict.resolve_models(f"models:/{registered}/{champion.version}", config.tracking)
    assert version_file.suffix == ".keras"


def test_terminal_table_is_compact(benched):
    _, table, _, _ = benched
    text = report.terminal(table)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 120 and len(lines) == 2 + len(table)
    for row in table.itertuples():
        line = next(line for line in lines if line.startswith(row.backbone + " "))
        assert f"{row.val_accuracy:.3f}" in line and f"{row.val_macro_f1:.3f}" in line


def _artifact_frame(client, run_id, name, tmp_path):
    return pd.read_csv(client.download_artifacts(run_id, name, str(tmp_path)))


def test_cross_validation_parent_and_fold_runs_with_intervals_and_pairs(tmp_path, monkeypatch):
    from benchmark import stats

    cv = ["data.folds=3", 'model.backbones=["vgg16", "efficientnetb0"]', 'data.phantom_mode="binary"',
          "data.phantom_per_class=6"]
    config = tiny_config(tmp_path, *cv)
    # A CV too long for one sitting: folds 1 and 3 of 3 now, scored as such ...
    partial, _, name = bench.run(tiny_config(tmp_path, *cv, "data.only_folds=[3, 1]"))
    client = MlflowClient(tracking.tracking_uri(config.tracking))
    experiment = client.get_experiment_by_name(name).experiment_id
    assert list(partial["folds"]) == ["1+3 of 3", "1+3 of 3"]
    partial_scored_on = {client.get_run(run_id).data.params[tracking.SCORED_ON] for run_id in partial["run_id"]}
    assert len(partial_scored_on) == 1
    assert (partial["registered"] == "").all()  # part of a CV is never the champion
    first_two = {}
    for row in partial.itertuples():
        children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{row.run_id}'")
        assert sorted(c.data.tags["tumorbench.fold"] for c in children) == ["1", "3"]
        assert row.n_images == sum(int(c.data.params["n_val"]) for c in children)
        first_two[row.backbone] = {c.info.run_id for c in children}
    # ... and the rest later: the whole CV reuses those two folds and trains only fold 2.
    table, paths, name = bench.run(config)
    assert (table["registered"] != "").sum() == 1  # the whole CV's best backbone is
    parents = [client.get_run(run_id) for run_id in table["run_id"]]
    assert sorted(p.data.params["backbone"] for p in parents) == ["efficientnetb0", "vgg16"]
    # all three folds are other held-out images than folds 1 and 3: the partial parents stay out of its tables
    assert len({p.data.params[tracking.SCORED_ON] for p in parents} | partial_scored_on) == 2
    out_of_fold = {}
    for parent in parents:
        children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted(c.data.tags["tumorbench.fold"] for c in children) == ["1", "2", "3"]
        assert first_two[parent.data.params["backbone"]] < {c.info.run_id for c in children}
        mean, low, high = stats.mean_ci([c.data.metrics["val_accuracy"] for c in children], bounds=(0, 1))
        assert parent.data.metrics["val_accuracy_mean"] == pytest.approx(mean)
        assert parent.data.metrics["val_accuracy_ci_low"] == pytest.approx(low)
        oof = _artifact_frame(client, parent.info.run_id, "predictions_oof.csv", tmp_path / parent.info.run_id)
        assert len(oof) == 12 and oof["source"].is_unique  # every image scored once, by the fold holding it out
        row = table.set_index("backbone").loc[parent.data.params["backbone"]]
        assert row["folds"] == 3 and row["input_px"] == "32" and row["val_accuracy"] == pytest.approx(mean)
        assert row["val_accuracy_ci_high"] == pytest.approx(high)
        out_of_fold[parent.data.params["backbone"]] = oof.sort_values("source").reset_index(drop=True)
    assert [p.name for p in paths.values()][:2] == ["comparison.md", "comparison.csv"]
    assert paths["md"].parent.name == "cv" and f"{table.loc[0, 'val_accuracy']:.4f} [" in paths["md"].read_text()
    pairs = pd.read_csv(paths["pairs"])
    assert list(pairs[["split", "a", "b"]].iloc[0]) == ["oof", "efficientnetb0", "vgg16"]
    a, b = out_of_fold["efficientnetb0"], out_of_fold["vgg16"]
    right_a = a[["prob_no", "prob_yes"]].to_numpy().argmax(1) == a["label"]
    right_b = b[["prob_no", "prob_yes"]].to_numpy().argmax(1) == b["label"]
    only_a, only_b, p = stats.mcnemar(right_a, right_b)
    assert (pairs.loc[0, "only_a_right"], pairs.loc[0, "only_b_right"]) == (only_a, only_b)
    assert pairs.loc[0, "mcnemar_p"] == pytest.approx(p)
    assert pairs.loc[0, "accuracy_diff"] == pytest.approx(right_a.mean() - right_b.mean())
    assert (pairs.loc[0, "accuracy_a"], pairs.loc[0, "accuracy_b"]) == pytest.approx((right_a.mean(), right_b.mean()))
    # The ensemble of both rows: their out-of-fold probabilities averaged per image, against each row.
    averaged = (a[["prob_no", "prob_yes"]].to_numpy() + b[["prob_no", "prob_yes"]].to_numpy()) / 2
    right_both = averaged.argmax(1) == a["label"]
    ensemble = pairs[pairs["a"] == report.ENSEMBLE].set_index("b")
    assert sorted(ensemble.index.unique()) == ["efficientnetb0", "vgg16"]
    assert list(ensemble["split"]) == ["oof", "oof", "tta_oof", "tta_oof"]
    plain = ensemble[ensemble["split"] == "oof"]
    assert plain.loc["vgg16", "accuracy_a"] == pytest.approx(right_both.mean())
    assert plain.loc["vgg16", "accuracy_diff"] == pytest.approx(right_both.mean() - right_b.mean())
    assert plain.loc["efficientnetb0", "only_a_right"] == int((right_both & ~right_a).sum())
    # ... and with the flip: both rows' predictions_tta_oof.csv averaged.
    flipped = [_artifact_frame(client, parent.info.run_id, "predictions_tta_oof.csv", tmp_path / f"tta-{i}")
               .sort_values("source").reset_index(drop=True) for i, parent in enumerate(parents)]
    averaged_flip = np.mean([frame[["prob_no", "prob_yes"]].to_numpy() for frame in flipped], axis=0)
    assert not np.allclose(averaged_flip, averaged)  # the flip changed the probabilities: a real second check
    with_flip = ensemble[ensemble["split"] == "tta_oof"]
    right_flip = averaged_flip.argmax(1) == flipped[0]["label"]
    assert with_flip.loc["vgg16", "accuracy_a"] == pytest.approx(right_flip.mean())

    # The same command again trains nothing: every fold is found finished in MLflow with the same config,
    # reused and moved under the new parent, and the summary is the same.
    fold_runs = {p.data.params["backbone"]: sorted(c.info.run_id for c in client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{p.info.run_id}'")) for p in parents}
    again, _, _ = bench.run(config)
    # (the champion stays with the first parent: the same score is no improvement)
    same = ["run_id", "train_s", "registered"]
    pd.testing.assert_frame_equal(again.drop(columns=same), table.drop(columns=same))
    assert (again["registered"] == "").all()
    for row in again.itertuples():
        children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{row.run_id}'")
        assert sorted(c.info.run_id for c in children) == fold_runs[row.backbone]

    # Runs of an older recipe (the code computes something else from the same config) are not reused.
    folds = recipe.fold_data(config, recipe.prepare_data(config))
    assert bench.finished_fold(config, folds[0], "vgg16", experiment, 0) is not None
    with monkeypatch.context() as patch:
        patch.setattr(recipe, "RECIPE_VERSION", recipe.RECIPE_VERSION + 1)
        assert bench.finished_fold(config, folds[0], "vgg16", experiment, 0) is None

    # A cross-validated run predicts as the ensemble of its fold models: the mean of their probabilities.
    from benchmark import predict
    members = predict.resolve_models(again.set_index("backbone").loc["vgg16", "run_id"], config.tracking)
    assert len(members) == 3
    images = recipe.data_path(config)
    rows = predict.run(members, [str(images)], batch_size=4)
    singles = [predict.run(member, [str(images)], batch_size=4) for member in members]
    assert all(row["models"] == 3 for row in rows)
    for i, row in enumerate(rows):
        assert row["prob_yes"] == pytest.approx(np.mean([single[i]["prob_yes"] for single in singles]), abs=1e-6)


def _binary_set_with_test_split(root: Path, n_train: int = 8, n_test: int = 5) -> Path:
    """train/ and test/ folders of no/yes phantom slices (32 px)."""
    from PIL import Image

    from benchmark.phantoms import draw_slice

    for split, count in (("train", n_train), ("test", n_test)):
        for c, (label, kind) in enumerate((("no", "notumor"), ("yes", "glioma"))):
            for i in range(count):
                folder = root / split / label
                folder.mkdir(parents=True, exist_ok=True)
                pixels = draw_slice(kind, 32, np.random.default_rng(hash((split, c, i)) % 2**32))
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_test_split_is_scored_with_what_validation_chose(tmp_path):
    """The threshold for the target sensitivity comes from validation; test is scored with it, once."""
    from benchmark import stats

    root = _binary_set_with_test_split(tmp_path / "data")
    config = tiny_config(tmp_path, f'data.path="{root}"', 'model.backbones=["vgg16"]', "data.val_fraction=0.25")
    table, _, name = bench.run(config)
    assert {"val_accuracy", "test_accuracy", "val_ece", "test_target_specificity"} <= set(table.columns)
    client = MlflowClient(tracking.tracking_uri(config.tracking))
    run = client.search_runs([client.get_experiment_by_name(name).experiment_id])[0]
    logged = run.data.metrics
    val = _artifact_frame(client, run.info.run_id, "predictions_val.csv", tmp_path / "v")
    test = _artifact_frame(client, run.info.run_id, "predictions_test.csv", tmp_path / "t")
    assert len(test) == 10 and set(test["source"]).isdisjoint(val["source"])
    threshold = stats.threshold_for_sensitivity(val["label"], val["prob_yes"], 0.95)
    assert logged["val_target_threshold"] == pytest.approx(threshold)
    assert logged["test_target_threshold"] == pytest.approx(threshold)
    _, specificity = stats.sensitivity_specificity(test["label"], test["prob_yes"], threshold)
    assert logged["test_target_specificity"] == pytest.approx(specificity)
    probabilities = test[["prob_no", "prob_yes"]].to_numpy()
    assert logged["test_ece"] == pytest.approx(stats.expected_calibration_error(test["label"], probabilities))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"reliability_val.png", "reliability_test.png"} <= artifacts


def test_cross_validation_scores_the_fold_ensemble_on_the_test_split(tmp_path):
    """Every fold model scores the test split (in no fold); the parent scores their averaged
    probabilities once (ensemble_test_*), and a rerun that reuses every fold gives the same figures.
    Out of fold, each image's distance to the nearest image its fold trained on, and far_oof_* for
    the images further than evaluate.far_distance."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    root = _binary_set_with_test_split(tmp_path / "data", n_train=9, n_test=6)
    config = tiny_config(tmp_path, f'data.path="{root}"', 'model.backbones=["vgg16"]', "data.folds=3")
    table, paths, name = bench.run(config)
    client = MlflowClient(tracking.tracking_uri(config.tracking))
    experiment = client.get_experiment_by_name(name).experiment_id
    parent = client.get_run(table.loc[0, "run_id"])
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    tests = [_artifact_frame(client, c.info.run_id, "predictions_test.csv", tmp_path / c.info.run_id)
             .sort_values("source").reset_index(drop=True) for c in children]
    assert len(tests) == 3 and all(len(frame) == 12 for frame in tests)
    averaged = sum(frame[["prob_no", "prob_yes"]].to_numpy() for frame in tests) / 3
    truth, predicted = tests[0]["label"], averaged.argmax(axis=1)
    logged = parent.data.metrics
    assert logged["ensemble_test_accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert logged["ensemble_test_macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert logged["ensemble_test_loss"] == pytest.approx(log_loss(truth, np.clip(averaged, 1e-7, 1)), rel=1e-4)
    # Per image, the logged ensemble is the folds' average, which is not any one fold's answer (tiny
    # untrained fold models can score nearly the same loss, so this compares probabilities, not losses).
    ensemble = (_artifact_frame(client, parent.info.run_id, "predictions_ensemble_test.csv", tmp_path / "ensemble")
                .sort_values("source").reset_index(drop=True))
    assert list(ensemble["source"]) == list(tests[0]["source"])
    assert ensemble[["prob_no", "prob_yes"]].to_numpy() == pytest.approx(averaged, abs=1e-6)
    assert max(np.abs(averaged - frame[["prob_no", "prob_yes"]].to_numpy()).max() for frame in tests) > 1e-5
    assert logged["test_accuracy_mean"] == pytest.approx(np.mean([c.data.metrics["test_accuracy"] for c in children]))
    assert table.loc[0, "ensemble_test_accuracy"] == pytest.approx(logged["ensemble_test_accuracy"])
    assert "ensemble_test_accuracy" in paths["md"].read_text()
    # The test-time flip: a mean over folds like every other figure, out of fold, and in the table.
    for split in ("val", "test"):
        per_fold = [c.data.metrics[f"tta_{split}_accuracy"] for c in children]
        assert logged[f"tta_{split}_accuracy_mean"] == pytest.approx(np.mean(per_fold))
        assert table.loc[0, f"tta_{split}_accuracy"] == pytest.approx(np.mean(per_fold))
    flipped = _artifact_frame(client, parent.info.run_id, "predictions_tta_oof.csv", tmp_path / "oof")
    assert sorted(flipped["fold"].unique()) == [1, 2, 3] and flipped["source"].is_unique
    right = flipped[["prob_no", "prob_yes"]].to_numpy().argmax(1) == flipped["label"]
    assert logged["tta_oof_accuracy"] == pytest.approx(right.mean())

    # How near each held-out image came to what its fold trained on, from hashes computed here.
    out_of_fold = _artifact_frame(client, parent.info.run_id, "predictions_oof.csv", tmp_path / "oof-plain")
    hashed = {source: audit.perceptual_hash(intake.load_rgb(root / source)) for source in out_of_fold["source"]}
    for row in out_of_fold.itertuples():
        trained = [hashed[other] for other, fold in zip(out_of_fold.source, out_of_fold.fold) if fold != row.fold]
        assert row.nearest_train_bits == audit.hamming(hashed[row.source][None], np.stack(trained)).min()
    assert logged["far_oof_images"] == (out_of_fold["nearest_train_bits"] > 64).sum()

    far_distance = int(out_of_fold["nearest_train_bits"].median())
    cv = [f'data.path="{root}"', 'model.backbones=["vgg16"]', "data.folds=3"]
    # every fold reused (the scoring distance is not part of a fold's recipe): from MLflow
    again, _, _ = bench.run(tiny_config(tmp_path, *cv, f"evaluate.far_distance={far_distance}"))
    rerun = client.get_run(again.loc[0, "run_id"]).data.metrics
    far = out_of_fold[out_of_fold["nearest_train_bits"] > far_distance]
    assert 0 < len(far) < len(out_of_fold) and rerun["far_oof_images"] == len(far)
    assert rerun["far_oof_accuracy"] == pytest.approx(
        (far[["prob_no", "prob_yes"]].to_numpy().argmax(1) == far["label"]).mean())
    assert again.loc[0, "far_oof_accuracy"] == pytest.approx(rerun["far_oof_accuracy"])
    assert again.loc[0, "far_oof_images"] == len(far)
    assert again.loc[0, "run_id"] != parent.info.run_id
    for key in ("ensemble_test_accuracy", "ensemble_test_loss", "test_accuracy_mean", "tta_val_accuracy_mean",
                "tta_test_macro_f1_mean", "tta_oof_accuracy"):
        assert rerun[key] == pytest.approx(logged[key])


def test_a_dataset_row_another_worker_inserted_first_is_linked_not_fatal(tmp_path, monkeypatch):
    """Two sweep workers can insert the same dataset row at once; the loser's unique-key error is retried."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    real, calls = mlflow.log_input, []

    def first_call_loses_the_race(*args, **kwargs):
        calls.append(kwargs["context"])
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException("duplicate key value violates unique constraint \"dataset_pk\"")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", first_call_loses_the_race)
    with mlflow.start_run() as run:
        tracking.log_dataset_inputs("phantoms", str(tmp_path), {"train": ("abc-1", 10), "val": ("abc-2", 4)})
    assert calls == ["train", "train", "validation"]
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.digest for i in inputs) == ["abc-1", "abc-2"]


def test_the_mlflow_server_shows_training_runs_datasets_models_and_the_champion(benched, tmp_path):
    """The real MLflow UI server (its REST API) over the benchmark's store, started and stopped here."""
    import socket
    import time
    import urllib.error
    import urllib.request

    config, table, _, name = benched
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", tracking.tracking_uri(config.tracking), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"

    def call(path, body=None):
        request = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 180  # a safety limit for a slow start, not what the test measures
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start (exit {server.poll()})")
                time.sleep(0.5)
        experiment = call(f"/experiments/get-by-name?experiment_name={name}")["experiment"]
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        runs = call("/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        assert len(runs) == len(table)
        for run in runs:
            contexts = sorted(next(t["value"] for t in i["tags"] if t["key"] == "mlflow.data.context")
                              for i in run["inputs"]["dataset_inputs"])
            assert contexts == ["train", "validation"]
        models = call("/logged-models/search", {"experiment_ids": [experiment["experiment_id"]]})["models"]
        assert sorted(m["info"]["source_run_id"] for m in models) == sorted(r["info"]["run_id"] for r in runs)
        champion = call(f"/registered-models/alias?name=tumorbench-{name}&alias=champion")["model_version"]
        best = table.sort_values("val_macro_f1", ascending=False, kind="stable").iloc[0]
        assert champion["run_id"] == best["run_id"]
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_a_killed_command_leaves_its_run_failed_not_running(tmp_path):
    """`kill` (SIGTERM, what a scheduler or a terminal's close sends) unwinds a command like Ctrl-C, so
    the MLflow run it had open ends FAILED instead of staying RUNNING in the UI for ever."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["check-data", str(image_folder(tmp_path / "data"))]) == 0
        assert signal.getsignal(signal.SIGTERM) is cli.stop_as_interrupted
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        with pytest.raises(SystemExit) as stopped, mlflow.start_run() as run:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the handler interrupts this at once
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


def test_seed_ensemble_members_per_fold(tmp_path, monkeypatch):
    """train.members = 2: each fold is two runs from seeds 42 and 43 on the same split; the fold's
    scores, the out-of-fold predictions and `predict` use their averaged probabilities. A CV run
    without members is member 1: adding a member reuses it and trains only the new one."""
    from benchmark import predict, stats

    cv = ["data.folds=2", 'model.backbones=["vgg16"]', 'data.phantom_mode="binary"', "data.phantom_per_class=6"]
    single, _, name = bench.run(tiny_config(tmp_path, *cv))
    client = MlflowClient(tracking.tracking_uri(tiny_config(tmp_path, *cv).tracking))
    experiment = client.get_experiment_by_name(name).experiment_id
    first_members = {c.info.run_id for c in client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{single.loc[0, 'run_id']}'")}

    config = tiny_config(tmp_path, *cv, "train.members=2")
    table, _, _ = bench.run(config)
    parent = client.get_run(table.loc[0, "run_id"])
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((c.data.tags["tumorbench.fold"], c.data.tags["tumorbench.member"]) for c in children) == [
        ("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert first_members < {c.info.run_id for c in children}  # member 1 of each fold reused, not retrained
    assert sorted(c.data.params["train_seed"] for c in children) == ["42", "42", "43", "43"]
    assert {c.data.params["seed"] for c in children} == {"42"}  # the folds stay those of seed 42

    oof = _artifact_frame(client, parent.info.run_id, "predictions_oof.csv", tmp_path / "oof").set_index("source")
    fold_accuracies = []
    for fold in ("1", "2"):
        members = [_artifact_frame(client, c.info.run_id, "predictions_val.csv", tmp_path / c.info.run_id)
                   .set_index("source") for c in children if c.data.tags["tumorbench.fold"] == fold]
        assert not np.allclose(members[0]["prob_yes"], members[1].loc[members[0].index, "prob_yes"])
        averaged = (members[0]["prob_yes"] + members[1].loc[members[0].index, "prob_yes"]) / 2
        np.testing.assert_allclose(oof.loc[averaged.index, "prob_yes"], averaged, rtol=1e-6)
        fold_accuracies.append(accuracy_score(members[0]["label"], averaged > 0.5))
    logged = parent.data.metrics
    assert logged["val_accuracy_mean"] == pytest.approx(np.mean(fold_accuracies))
    alone = [np.mean([c.data.metrics["val_accuracy"] for c in children if c.data.tags["tumorbench.fold"] == fold])
             for fold in ("1", "2")]  # the members alone, averaged within each fold; the CI is over folds
    mean, low, high = stats.mean_ci(alone, bounds=(0, 1))
    assert (logged["member_val_accuracy_mean"], logged["member_val_accuracy_ci_low"]) == pytest.approx((mean, low))
    assert parent.data.params["members"] == "2"
    assert table.loc[0, "members"] == 2 and table.loc[0, "member_val_accuracy"] == pytest.approx(
        logged["member_val_accuracy_mean"])
    assert len(predict.resolve_models(parent.info.run_id, config.tracking)) == 4  # every member predicts

    # The same command again trains nothing.
    monkeypatch.setattr(bench, "run_backbone", lambda *args, **kwargs: pytest.fail("a finished member was retrained"))
    again, _, _ = bench.run(config)
    assert again.loc[0, "val_accuracy"] == pytest.approx(table.loc[0, "val_accuracy"])


def test_label_review_lists_every_out_of_fold_error_most_confident_first(tmp_path):
    config = tiny_config(tmp_path, 'data.phantom_mode="binary"', "data.phantom_per_class=3")
    dataset = recipe.prepare_data(config).dataset
    samples = sorted((s for split in dataset.splits.values() for s in split), key=lambda s: s.source)
    assert len(samples) == 6
    labels = np.array([s.label for s in samples])
    p_own = np.array([0.9, 0.3, 0.05, 0.6, 0.45, 0.99])  # wrong where below 0.5: 3 of 6
    probabilities = np.zeros((6, 2))
    probabilities[np.arange(6), labels] = p_own
    probabilities[np.arange(6), 1 - labels] = 1 - p_own
    client = tracking.connect(config.tracking)
    with mlflow.start_run(experiment_id=tracking.experiment_id(client, "review", config.tracking)) as run:
        bench._log_label_review(dataset, samples, probabilities, np.array([1, 1, 2, 2, 3, 3]), "vgg16")
    review = _artifact_frame(client, run.info.run_id, "label_review_oof.csv", tmp_path)
    assert list(review["source"]) == [samples[2].source, samples[1].source, samples[4].source]
    assert list(review["p_label"]) == pytest.approx([0.05, 0.3, 0.45])
    assert list(review["fold"]) == [2, 1, 3]
    assert list(review["predicted"]) == [dataset.class_names[1 - labels[i]] for i in (2, 1, 4)]
    assert "label_review_oof.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_images_copied_in_another_set_are_left_out_before_the_split(tmp_path):
    """data.exclude_copies_of: an image whose copy (the same bytes, or a near copy) is in the other
    set is in no split of this one; the run logs how many and which, with the other set's file."""
    import shutil

    from conftest import write_image

    mine = image_folder(tmp_path / "mine", per_class=6, size=(40, 40))
    other = tmp_path / "other"
    shutil.copy(mine / "no" / "img 1.png", (other / "healthy").mkdir(parents=True) or other / "healthy" / "a.png")
    Image = pytest.importorskip("PIL.Image")
    near = np.asarray(Image.open(mine / "yes" / "img 2.png").convert("L")).astype(int)
    near[0, 0] = 255 - near[0, 0]  # one pixel changed: another file, the same picture
    (other / "tumour").mkdir()
    Image.fromarray(near.astype(np.uint8)).save(other / "tumour" / "b.png")
    write_image(other / "tumour" / "unrelated.png", "L", (40, 40), seed=999)
    config = tiny_config(tmp_path, f'data.path="{mine}"', 'model.backbones=["vgg16"]',
                         f'data.exclude_copies_of=["{other}"]', "train.epochs2=0")
    prepared = recipe.prepare_data(config)
    kept = {s.source for part in prepared.parts.values() for s in part}
    assert sorted(prepared.excluded["source"]) == ["no/img 1.png", "yes/img 2.png"]
    assert sorted(prepared.excluded["other_source"]) == ["healthy/a.png", "tumour/b.png"]
    assert kept == {f"{c}/img {i}.png" for c in ("no", "yes") for i in range(6)} - {"no/img 1.png", "yes/img 2.png"}
    assert (mine / "no" / "img 1.png").is_file()  # left out of the runs, not touched on disk

    table, _, _ = bench.run(config)
    client = MlflowClient(tracking.tracking_uri(config.tracking))
    run = client.get_run(table.loc[0, "run_id"])
    assert run.data.params["excluded_copies"] == "2"
    logged = _artifact_frame(client, run.info.run_id, "excluded_copies.csv", tmp_path / "logged")
    assert sorted(logged["source"]) == ["no/img 1.png", "yes/img 2.png"]
    assert set(logged["other_data"]) == {str(other.resolve())}


def test_weights_from_a_run_start_the_base_where_that_run_ended(tmp_path, monkeypatch):
    """model.weights = "run:<id>": the base of the model that run trained (its head is not taken),
    recorded as run:<id>; a run without a model of that backbone is refused by name before training."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    source_config = tiny_config(tmp_path, 'model.backbones=["efficientnetb0"]', "train.unfreeze=9")
    table, _, _ = bench.run(source_config)
    source_id = table.loc[0, "run_id"]
    client = MlflowClient(tracking.tracking_uri(source_config.tracking))
    trained, _ = recipe.modelfile.load(Path(client.download_artifacts(source_id, "model/model.keras", str(tmp_path / "m"))))
    [trained_base] = [layer for layer in trained.layers if isinstance(layer, keras.Model)]

    binary = tiny_config(tmp_path, 'data.phantom_mode="binary"', 'model.backbones=["efficientnetb0"]',
                         f'model.weights="run:{source_id}"')
    assert recipe.resolve_weights(binary) == {"efficientnetb0": f"run:{source_id}"}
    built = recipe.build(binary, recipe.prepare_data(binary), "efficientnetb0", f"run:{source_id}")
    assert built.weights_used == f"run:{source_id}" and not built.from_scratch
    started, ended = built.base.get_weights(), trained_base.get_weights()
    assert len(started) == len(ended) and all(np.array_equal(a, b) for a, b in zip(started, ended))
    assert built.model.output_shape == (None, 1)  # the new set's head: 2 classes, not the source's 4
    fresh = recipe.build(binary, recipe.prepare_data(binary), "efficientnetb0", "none").base.get_weights()
    assert not all(np.array_equal(a, b) for a, b in zip(started, fresh))  # the same seed's initial weights differ

    modelless = client.create_run(client.get_run(source_id).info.experiment_id).info.run_id  # e.g. a CV parent
    for weights, why in ((f"run:{source_id}", "that run trained efficientnetb0, not vgg16"),
                         ("run:0123456789abcdef", "no such run"), (f"run:{modelless}", "has no model/model.keras")):
        wrong = tiny_config(tmp_path, 'model.backbones=["vgg16"]', f'model.weights="{weights}"')
        with pytest.raises(backbones.WeightsUnavailable, match=why):
            recipe.resolve_weights(wrong)
