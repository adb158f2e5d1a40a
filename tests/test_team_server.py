"""The team set-up of docs/team.md: an MLflow server with its basic-auth app on localhost. A user with
valid credentials logs runs; without them, or with a wrong password, `bench` and `sweep` stop before
any training with one line; the password itself is never stored."""
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow.server
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from benchmark import bench, cli, recipe, sweep
from conftest import clean_env
from test_secrets import TINY, _rows

ADMIN_PASSWORD = "adm1n-Rotated-at-start"
PLANTED = "al1ce-Pl4nted-9c2e"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An authenticated MLflow server (the docs' command line, on localhost) with one user, alice."""
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (the test extra has it)")
    root = tmp_path_factory.mktemp("team")
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**clean_env(), "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-key"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the MLflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
            mlflow.server.get_app_client("basic-auth", tracking_uri=uri).create_user("alice", PLANTED)
        yield uri, root
    finally:
        process.terminate()
        process.wait(timeout=30)


def _as(monkeypatch, user: str | None, password: str | None) -> None:
    for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def _args(uri, tmp_path) -> list[str]:
    """The tiny run, without its model file: uploading tens of MB through the test server is most of a minute."""
    overrides = [*TINY, f'tracking.uri="{uri}"', f'tracking.results_dir="{tmp_path}"', "tracking.log_model=false"]
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.parametrize("user, password", [(None, None), ("alice", "wrong-password")], ids=["none", "wrong"])
@pytest.mark.parametrize("command", ["bench", "sweep"])
def test_without_valid_credentials_bench_and_sweep_stop_before_training(server, command, user, password, tmp_path,
                                                                        monkeypatch, capsys):
    uri, _ = server

    def must_not_run(*args, **kwargs):
        raise AssertionError("training started without valid credentials")

    monkeypatch.setattr(recipe, "prepare_data", must_not_run)
    monkeypatch.setattr(bench, "run_backbone", must_not_run)
    monkeypatch.setattr(sweep, "open_study", must_not_run)
    _as(monkeypatch, user, password)
    assert cli.main([command, *_args(uri, tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: MLflow server {uri} refused ") and \
        "MLFLOW_TRACKING_USERNAME" in err[0], err
    assert "wrong-password" not in err[0]


def test_a_user_with_valid_credentials_logs_runs_and_the_password_is_not_stored(server, tmp_path, monkeypatch,
                                                                                  capsys):
    uri, root = server
    _as(monkeypatch, "alice", PLANTED)
    assert cli.main(["bench", *_args(uri, tmp_path)]) == 0
    assert PLANTED not in "".join(capsys.readouterr())
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("phantoms-4class").experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"] and runs[0].info.user_id == "alice"
    _as(monkeypatch, "admin", ADMIN_PASSWORD)  # docs/team.md: bob may read that experiment, not change it
    admin = mlflow.server.get_app_client("basic-auth", tracking_uri=uri)
    admin.create_user("bob", "bob-password")
    admin.grant_user_permission("bob", "experiment", runs[0].info.experiment_id, "READ")
    _as(monkeypatch, "bob", "bob-password")
    assert MlflowClient(uri).get_run(runs[0].info.run_id).info.status == "FINISHED"
    with pytest.raises(MlflowException, match="403|Permission denied"):
        MlflowClient(uri).set_tag(runs[0].info.run_id, "tampered", "yes")
    _as(monkeypatch, "admin", ADMIN_PASSWORD)  # alice's password is in neither store nor any artifact
    texts = _rows(f"sqlite:///{root / 'mlflow.db'}") | {str(p): p.read_bytes().decode("latin-1")
                                                        for p in (root / "artifacts").rglob("*") if p.is_file()}
    assert len(texts) > 10 and [where for where, text in texts.items() if PLANTED in text] == []
