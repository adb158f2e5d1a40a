"""No password leaves the process: not into MLflow (rows, params, tags, artifacts), not into Optuna's
storage, not onto the terminal."""
import io
import re
import subprocess

import optuna
import pytest
import sqlalchemy

from benchmark import cli, redact
from benchmark.config import load_config
from conftest import clean_env
from test_sweep import _postgres_urls, worker_command

PLANTED = "Pl4nted-s3cret-7f3a"
TINY = [
    "data.phantom_per_class=5", "data.phantom_size=32", "data.val_fraction=0.4", 'model.weights="none"',
    "model.input_size=32", "model.head_units=8", 'model.backbones=["vgg16"]', "train.epochs1=1",
    "train.epochs2=1", "train.batch_size=8", "train.verbose=0", "train.eager=true", "sweep.trials=1",
    "sweep.unfreeze=[0, 1]", "sweep.head_units=[8, 16]",
]


@pytest.mark.parametrize("text, masked", [
    ("postgresql://tumorbench:s3cretPW@dbhost/optuna", "postgresql://tumorbench:***@dbhost/optuna"),
    ("postgresql+psycopg://u:p%40ss:w0rd@h:5432/db?sslmode=require", "postgresql+psycopg://u:***@h:5432/db?sslmode=require"),
    ('storage = "https://alice:pw@mlflow.lab:443"', 'storage = "https://alice:***@mlflow.lab:443"'),
    ("see http://host:5000/x?token=abc123&run=1", "see http://host:5000/x?token=***&run=1"),
    ("postgresql://tumorbench@dbhost/optuna", "postgresql://tumorbench@dbhost/optuna"),  # nothing to mask
    ("http://127.0.0.1:5000/#/experiments/1", "http://127.0.0.1:5000/#/experiments/1"),
    ("sqlite:////tmp/a:b@c/mlflow.db", "sqlite:////tmp/a:b@c/mlflow.db"),  # a path, not a password
])
def test_mask_hides_url_passwords_and_secret_query_values_only(text, masked):
    assert redact.mask(text) == masked
    assert redact.mask(masked) == masked


def test_masked_stream_masks_whatever_is_written_through_it():
    sink = io.StringIO()
    stream = redact.MaskedStream(sink)
    print(f"error: postgresql://u:{PLANTED}@h/db is down", file=stream)
    assert sink.getvalue() == "error: postgresql://u:***@h/db is down\n"
    assert stream.isatty() is False  # everything else is the wrapped stream's


def test_an_unreachable_store_is_named_without_its_password(tmp_path, capsys):
    code = cli.main(["bench", "--set", f'tracking.uri="http://alice:{PLANTED}@127.0.0.1:9"',
                     "--set", f'tracking.results_dir="{tmp_path}"'])
    err = capsys.readouterr().err
    assert code == 1 and "http://alice:***@127.0.0.1:9 is unreachable" in err and PLANTED not in err


def _rows(url: str) -> dict[str, str]:
    """Every row of every table of a database, as text per table."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as db:
            return {f"{url.split('://')[0]}:{table}": repr(db.execute(sqlalchemy.text(f'SELECT * FROM "{table}"')).all())
                    for table in sqlalchemy.inspect(engine).get_table_names()}
    finally:
        engine.dispose()


def _every_text_in(results, optuna_url) -> dict[str, str]:
    """The MLflow store's and the Optuna storage's rows, and every file under the results folder."""
    found = _rows(f"sqlite:///{results / 'mlflow.db'}") | _rows(optuna_url)
    for path in results.rglob("*"):
        if path.is_file():
            found[str(path)] = path.read_bytes().decode("latin-1")
    return found


def test_a_planted_password_is_nowhere_after_a_bench_a_cross_validation_and_a_sweep(tmp_path, capsys, postgres_turn):
    """The password of sweep.storage (a real PostgreSQL study, which accepts it) in every command's
    config; the sweep gets it on its command line, as the README's team set-up once did."""
    optuna_url, _ = _postgres_urls()
    secret_url = re.sub(r":[^:@/]*@", f":{PLANTED}@", optuna_url, count=1)
    results = tmp_path / "results"
    overrides = [*TINY, f'tracking.results_dir="{results}"']
    try:  # a new study, so the sweep below writes all its attributes
        optuna.delete_study(study_name="phantoms-4class-vgg16", storage=optuna_url)
    except KeyError:
        pass

    args = [a for o in [*overrides, f'sweep.storage="{secret_url}"'] for a in ("--set", o)]
    assert cli.main(["bench", *args]) == 0
    assert cli.main(["bench", "--folds", "2", *args]) == 0
    swept = subprocess.run([*worker_command(overrides), "--storage", secret_url], capture_output=True, text=True,
                           env=clean_env(), timeout=600)
    assert swept.returncode == 0, swept.stdout[-2000:] + swept.stderr[-2000:]
    printed = capsys.readouterr()

    study = optuna.load_study(study_name="phantoms-4class-vgg16", storage=optuna_url)
    assert len(study.trials) == 1 and study.user_attrs  # the sweep wrote to the study
    texts = _every_text_in(results, optuna_url)
    texts |= {"bench and CV output": printed.out + printed.err, "sweep output": swept.stdout + swept.stderr}
    assert [where for where, text in texts.items() if PLANTED in text] == []
    configs = [text for where, text in texts.items() if where.endswith("config.toml")]
    assert len(configs) >= 4  # bench, CV parent and fold runs, sweep parent and trial
    masked = redact.mask(secret_url)
    assert all(f'storage = "{masked}"' in text for text in configs)
    assert f"({masked})" in swept.stdout  # the study's line names its storage, masked


def test_the_config_saved_with_a_run_masks_the_password_the_run_still_uses(tmp_path):
    config = load_config(None, [f'sweep.storage="postgresql://u:{PLANTED}@h/db"'])
    assert config.sweep.storage == f"postgresql://u:{PLANTED}@h/db"  # connecting still has it
    assert 'storage = "postgresql://u:***@h/db"' in config.to_toml() and PLANTED not in config.to_toml()
