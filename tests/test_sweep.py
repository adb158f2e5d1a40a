"""Optuna sweeps on tiny phantoms: end to end, failures, kill -9 and resume, two workers on PostgreSQL."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from benchmark import report, sweep, tracking
from benchmark.config import load_config
from conftest import clean_env

TINY = [
    "data.phantom_per_class=5", "data.phantom_size=32", "data.val_fraction=0.4", 'model.weights="none"',
    "model.input_size=32", 'model.backbones=["vgg16"]', "train.epochs1=1", "train.epochs2=1",
    "train.batch_size=8", "train.verbose=0", "train.eager=true", "sweep.unfreeze=[0, 2]", "sweep.head_units=[8, 32]",
]
STATES = optuna.trial.TrialState


def tiny(tmp_path, *extra):
    return [*TINY, f'tracking.results_dir="{tmp_path / "results"}"', *extra]


def worker_command(overrides, worker=0, workers=1):
    args = [sys.executable, "-m", "benchmark", "sweep", "--worker", str(worker), "--workers", str(workers)]
    for override in overrides:
        args += ["--set", override]
    return args


def child_runs(client, parent):
    experiment = client.get_experiment(client.get_run(parent).info.experiment_id)
    return client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")


def test_tiny_sweep_end_to_end(tmp_path):
    config = load_config(None, tiny(tmp_path, "sweep.trials=3"))
    sweep.run(config)
    study = optuna.load_study(study_name="phantoms-4class-vgg16", storage=sweep.storage_url(config))
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == STATES.COMPLETE for t in study.trials)
    assert study.metric_names == ["val_macro_f1"]  # what optuna-dashboard shows instead of "Objective 0"
    # one process per trial: no growth (in one process it grew about 200 MB a trial); the level
    # itself varies by a trial's parameters
    rss = [t.user_attrs["rss_mb"] for t in study.trials]
    assert rss[-1] - rss[0] < 150, rss

    client = MlflowClient(tracking.tracking_uri(config.tracking))
    parent = client.get_run(study.user_attrs[sweep.STUDY_ATTR_PARENT])
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.KIND_TAG] == "sweep-study"
    assert parent.data.metrics["best_val_macro_f1"] == pytest.approx(study.best_value)
    assert parent.data.tags["best_unfreeze"] == str(study.best_params["unfreeze"])
    children = child_runs(client, parent.info.run_id)
    assert sorted(int(r.data.tags["tumorbench.trial"]) for r in children) == [0, 1, 2]
    for run in children:  # the objective is the final validation metric; reports are per epoch, one axis
        trial = study.trials[int(run.data.tags["tumorbench.trial"])]
        assert run.data.metrics["val_macro_f1"] == pytest.approx(trial.value)
        assert run.data.params["lr1"] == str(trial.params["lr1"])
        history = client.get_metric_history(run.info.run_id, "epoch_val_macro_f1")
        assert {m.step: m.value for m in history} == pytest.approx(trial.intermediate_values)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "vgg16-optimization_history.png", "vgg16-param_importances.png", "vgg16-unfreeze_depth.png"}

    runs = report.select_runs(client, "phantoms-4class", "sweep")
    table, paths = report.build(client, "phantoms-4class", runs, config.tracking.results_dir, source="sweep")
    assert paths["md"].parent.name == "sweep"
    assert int(table.loc[0, "trial"]) == study.best_trial.number
    assert table.loc[0, "val_macro_f1"] == pytest.approx(study.best_value)


def test_pruning_callback_reports_each_epoch_and_prunes():
    class FakeTrial:
        def __init__(self):
            self.reports = {}

        def report(self, value, step):
            self.reports[step] = value

        def should_prune(self):
            return len(self.reports) >= 2

    trial = FakeTrial()
    callback = sweep.OptunaPruning(trial, "val_macro_f1")
    callback.on_epoch_end(0, {"val_macro_f1": 0.3})
    with pytest.raises(optuna.TrialPruned, match="pruned at epoch 2"):
        callback.on_epoch_end(1, {"val_macro_f1": 0.2})
    assert trial.reports == {0: 0.3, 1: 0.2}


def test_failed_trials_are_recorded_with_reason_and_the_study_goes_on(tmp_path, nan_plugin):
    config = load_config(None, tiny(tmp_path, "sweep.trials=2", "sweep.head_units=[0, 0]",
                                    "sweep.process_per_trial=false", *nan_plugin))
    sweep.run(config)
    study = optuna.load_study(study_name="phantoms-4class-nan_net", storage=sweep.storage_url(config))
    assert [t.state for t in study.trials] == [STATES.FAIL, STATES.FAIL]
    assert all("NaN" in t.user_attrs["fail_reason"] for t in study.trials)
    client = MlflowClient(tracking.tracking_uri(config.tracking))
    children = child_runs(client, study.user_attrs[sweep.STUDY_ATTR_PARENT])
    assert sorted(r.info.status for r in children) == ["FAILED", "FAILED"]
    assert all(r.data.tags["tumorbench.state"] == "FAIL" for r in children)


@pytest.fixture
def hold(tmp_path, monkeypatch):
    """The `hold_net` plugin (tests/hold_backbone.py), importable here and in worker processes."""
    from backbones._registry import _REGISTRY

    folder = tmp_path / "hold"
    monkeypatch.setenv("HOLD_DIR", str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    yield folder, ['plugins=["hold_backbone"]', 'model.backbones=["hold_net"]']
    _REGISTRY.pop("hold_net", None)
    sys.modules.pop("hold_backbone", None)


def _wait_for_file(path, process, limit_s: float = 600) -> None:
    """Until `path` exists; fails at once if `process` ends first (a safety limit only)."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the worker ended (exit {process.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} never appeared")
        time.sleep(0.1)


def test_killed_worker_is_marked_failed_and_the_study_resumes(tmp_path, hold, monkeypatch):
    """The worker is held inside its second trial (the plugin blocks there), killed at that known
    point, and the same command run again finishes the study."""
    folder, plugin = hold
    monkeypatch.setenv("HOLD_MODE", "second")
    overrides = tiny(tmp_path, "sweep.trials=3", "sweep.heartbeat_seconds=1", *plugin)
    config = load_config(None, overrides)
    storage = sweep.storage_url(config)
    env = {**clean_env(), "HOLD_DIR": str(folder), "HOLD_MODE": "second"}
    worker = subprocess.Popen(worker_command(overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_for_file(folder / "holding", worker)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    trials = optuna.load_study(study_name="phantoms-4class-hold_net", storage=storage).trials
    assert [t.state for t in trials] == [STATES.COMPLETE, STATES.RUNNING]
    finished_before = {t.number: (t.value, t.datetime_complete) for t in trials if t.state == STATES.COMPLETE}
    (folder / "release").touch()
    time.sleep(2.5)  # the killed trial's last heartbeat is now older than its 2 s grace period
    sweep.run(config)  # the same command again
    study = optuna.load_study(study_name="phantoms-4class-hold_net", storage=storage)
    assert study.trials[1].state == STATES.FAIL
    for number, kept in finished_before.items():
        assert (study.trials[number].value, study.trials[number].datetime_complete) == kept
    assert sweep.finished_count(study) == 3
    assert sum(t.state == STATES.COMPLETE for t in study.trials) == 2


def _postgres_urls():
    optuna_url = os.environ.get("TUMORBENCH_TEST_POSTGRES")
    mlflow_url = os.environ.get("TUMORBENCH_TEST_POSTGRES_MLFLOW")
    if not (optuna_url and mlflow_url):
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the PostgreSQL test: TUMORBENCH_TEST_POSTGRES(_MLFLOW) are not set "
                        "(.ci/postgres.sh could not start a server)")
        pytest.skip("no PostgreSQL test server (set TUMORBENCH_TEST_POSTGRES and TUMORBENCH_TEST_POSTGRES_MLFLOW)")
    return optuna_url, mlflow_url


def test_two_workers_share_one_postgres_study(tmp_path, hold, postgres_turn):
    """Every trial waits (in the plugin) until both workers have started one, so both must take part
    however slowly either starts."""
    optuna_url, mlflow_url = _postgres_urls()
    folder, plugin = hold
    overrides = tiny(tmp_path, "sweep.trials=2", f'sweep.storage="{optuna_url}"', f'tracking.uri="{mlflow_url}"',
                     *plugin)
    try:
        optuna.delete_study(study_name="phantoms-4class-hold_net", storage=optuna_url)  # from an earlier run
    except KeyError:
        pass
    env = {**clean_env(), "HOLD_DIR": str(folder), "HOLD_MODE": "pair"}
    workers = [subprocess.Popen(worker_command(overrides, worker=i, workers=2), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    study = optuna.load_study(study_name="phantoms-4class-hold_net", storage=optuna_url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) and len(numbers) >= 2
    assert all(t.state == STATES.COMPLETE for t in study.trials)
    assert all(f"(worker {i})" in out for i, out in enumerate(outputs))
    worked = [out.count("-- phantoms-4class-hold_net trial") for out in outputs]
    assert sum(worked) == len(numbers) and min(worked) >= 1  # both workers ran trials
    client = MlflowClient(mlflow_url)
    children = child_runs(client, study.user_attrs[sweep.STUDY_ATTR_PARENT])
    assert sorted(int(r.data.tags["tumorbench.trial"]) for r in children) == sorted(numbers)
    assert all(r.info.status == "FINISHED" for r in children)


@pytest.mark.parametrize("name", __import__("backbones").names())
def test_lp_ft_sweeps_search_depth_over_every_group_and_no_head(name):
    import backbones

    spec = backbones.get(name)
    config = load_config(None, ['train.head_init="probe"', "model.head_units=0"])
    deepest = optuna.trial.FixedTrial({"lr2": 1e-4, "unfreeze": len(spec.group_names), "dropout": 0.1})
    params = sweep.suggest(deepest, config, spec)
    assert params == {"lr2": 1e-4, "unfreeze": len(spec.group_names), "dropout": 0.1}
    trial = sweep.trial_config(config, params)
    assert trial.model.head_units == 0 and trial.train.unfreeze == len(spec.group_names)
    asked = optuna.create_study().ask()
    sweep.suggest(asked, config, spec)
    assert set(asked.distributions) == {"lr2", "unfreeze", "dropout"}
    assert (asked.distributions["unfreeze"].low, asked.distributions["unfreeze"].high) == (0, len(spec.group_names))


def test_two_workers_summarising_one_parent_at_once_leave_the_latest_best(tmp_path, monkeypatch):
    """Workers that finish together both write the parent's best-trial tags: the one whose insert the
    store refuses (the other inserted the same tag a moment before) retries and updates it."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.create_run(client.create_experiment("phantoms")).info.run_id
    study = optuna.create_study(direction="maximize")
    space = {"lr2": optuna.distributions.FloatDistribution(1e-6, 1e-3, log=True),
             "unfreeze": optuna.distributions.IntDistribution(0, 2)}
    study.add_trial(optuna.trial.create_trial(params={"lr2": 1e-4, "unfreeze": 1}, distributions=space, value=0.5))
    real, calls = client.log_batch, []

    def first_call_loses_the_race(*args, **kwargs):
        calls.append(sorted(t.key for t in kwargs["tags"]))
        if len(calls) == 1:
            raise tracking.mlflow.exceptions.MlflowException(
                'duplicate key value violates unique constraint "tag_pk"')
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "log_batch", first_call_loses_the_race)
    sweep.summarise(client, study, parent, tmp_path / "sweep", "vgg16", "macro_f1")
    assert calls == [["best_lr2", "best_trial", "best_unfreeze"]] * 2
    study.add_trial(optuna.trial.create_trial(params={"lr2": 3e-5, "unfreeze": 2}, distributions=space, value=0.75))
    sweep.summarise(client, study, parent, tmp_path / "sweep", "vgg16", "macro_f1")  # the later worker
    run = client.get_run(parent)
    assert run.data.tags["best_trial"] == "1" and run.data.tags["best_unfreeze"] == "2"
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(parent, "best_val_macro_f1")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
