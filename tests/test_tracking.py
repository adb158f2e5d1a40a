"""Which run holds the registered champion alias (no training: runs are stand-ins)."""
from types import SimpleNamespace

import pytest

from benchmark import tracking


def _run(run_id: str, folds: int | None = None, scored: str = "") -> SimpleNamespace:
    params = {} if folds is None else {"folds": str(folds), "folds_scored": scored}
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(params=params))


WHOLE_CV, ONE_SPLIT, SOME_FOLDS = _run("cv", 5, "1,2,3,4,5"), _run("split"), _run("part", 5, "1,2")


@pytest.mark.parametrize("run, score, champion, champion_score, expected", [
    (ONE_SPLIT, 0.99, WHOLE_CV, 0.97, False),  # the easiest split alone scores above a CV mean
    (WHOLE_CV, 0.97, ONE_SPLIT, 0.99, True),   # every image scored once, and an ensemble
    (WHOLE_CV, 0.97, SOME_FOLDS, 0.99, True),
    (_run("cv2", 5, "1,2,3,4,5"), 0.98, WHOLE_CV, 0.97, True),
    (_run("cv2", 5, "1,2,3,4,5"), 0.97, WHOLE_CV, 0.97, False),  # the same score is no improvement
    (_run("split2"), 0.96, ONE_SPLIT, 0.95, True),
    (WHOLE_CV, 0.99, WHOLE_CV, 0.97, False),  # already the champion
])
def test_more_evidence_wins_the_champion_alias_then_the_higher_score(run, score, champion, champion_score, expected):
    assert tracking.replaces_champion(run, score, champion, champion_score) is expected


def test_evidence_ranks_whole_cross_validation_over_one_split_over_some_folds():
    assert [tracking.evidence(r) for r in (WHOLE_CV, ONE_SPLIT, SOME_FOLDS)] == [2, 1, 0]


def test_ui_prints_each_data_sets_runs_table_address_and_serves_the_store(tmp_path, monkeypatch, capsys):
    """MLflow 3.18's UI opens an experiment on its GenAI overview: the printed address opens the runs
    table in the Model training view (checked in headless Chromium, 2026-12-07)."""
    from benchmark import cli
    from benchmark.config import load_config

    config = load_config(None, [f'tracking.results_dir="{tmp_path}"'])
    client = tracking.connect(config.tracking)
    made = tracking.experiment_id(client, "brain-mri-yes-no", config.tracking)
    client.create_experiment("someone-elses-genai-app")
    served = []
    monkeypatch.setattr(cli.os, "execv", lambda path, args: served.append(args))
    cli.main(["ui", "--port", "5123", "--set", f'tracking.results_dir="{tmp_path}"'])
    out = capsys.readouterr().out
    assert f"  brain-mri-yes-no: http://127.0.0.1:5123/#/experiments/{made}/runs?workflowType=machine_learning" in out
    assert "someone-elses-genai-app" not in out
    assert served == [[served[0][0], "ui", "--host", "127.0.0.1", "--port", "5123", "--backend-store-uri",
                       f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"]]
    assert served[0][0].endswith("/mlflow")
