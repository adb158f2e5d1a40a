import tomllib

import pytest

from benchmark import tracking
from benchmark.config import Config, ConfigError, load_config


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('seed = 7\n[train]\nlr1 = 1e-3\nepochs1 = 3\n[model]\nbackbones = ["vgg16"]\n')
    config = load_config(path, ["train.lr1=5e-4", "model.backbones=vgg16,resnet50", 'data.path="/d"'])
    assert config.seed == 7 and config.train.epochs1 == 3  # file
    assert config.train.lr1 == 5e-4 and config.model.backbones == ["vgg16", "resnet50"]  # overrides win
    assert config.data.path == "/d" and config.train.lr2 == Config().train.lr2  # untouched default


def test_merged_config_round_trips_through_toml(tmp_path):
    config = load_config(None, ["augment.enabled=false", "train.lr2=3e-05", 'data.class_names=["b", "a"]'])
    assert load_config(None) != config
    path = tmp_path / "saved.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config
    assert tomllib.loads(config.to_toml())["augment"]["enabled"] is False


@pytest.mark.parametrize("text, message", [
    ("[train]\nlr_one = 1\n", "unknown key 'lr_one'"),
    ("[train]\nepochs1 = 'ten'\n", "epochs1: expected int"),
    ("[train]\nepochs1 = true\n", "epochs1: expected int"),
    ("train = 3\n", "[train] must be a table"),
    ("[train\n", "not valid TOML"),
])
def test_bad_files_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.lr1"])
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml")


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    config = load_config(None, [f'tracking.results_dir="{tmp_path}"'])
    monkeypatch.setattr(tracking, "USER_TRACKING_URI", "")
    assert tracking.tracking_uri(config.tracking) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(tracking, "USER_TRACKING_URI", "http://team-server:5000")
    assert tracking.tracking_uri(config.tracking) == "http://team-server:5000"
    config.tracking.uri = "sqlite:////elsewhere.db"
    assert tracking.tracking_uri(config.tracking) == "sqlite:////elsewhere.db"


@pytest.mark.parametrize("override, message", [
    ("train.epochs1=-3", "train.epochs1 = -3 is not allowed: >= 0"),
    ("train.batch_size=0", "train.batch_size = 0 is not allowed: > 0"),
    ("train.lr1=0", "train.lr1 = 0.0 is not allowed: > 0"),
    ("train.lr2=-1e-5", "train.lr2 = -1e-05 is not allowed: > 0"),
    ("data.val_fraction=1.0", "data.val_fraction = 1.0 is not allowed: between 0 and 1"),
    ("data.val_fraction=0", "data.val_fraction = 0.0 is not allowed"),
    ("data.folds=1", "data.folds = 1 is not allowed: 0 (no cross-validation) or >= 2"),
    ("data.exclude_distance=300", "data.exclude_distance = 300 is not allowed: 0..256 bits"),
    ("evaluate.far_distance=-1", "evaluate.far_distance = -1 is not allowed: 0..256 bits"),
    ("data.only_folds=[2]", "data.only_folds = [2] is not allowed: distinct fold numbers 1..data.folds (0)"),
    ("model.dropout=1.0", "model.dropout = 1.0 is not allowed"),
    ("augment.contrast=1.0", "augment.contrast = 1.0 is not allowed: 0 <= contrast < 1"),
    ("augment.brightness=-0.1", "augment.brightness = -0.1 is not allowed: 0 <= brightness < 1"),
    ("augment.sharpness=1.5", "augment.sharpness = 1.5 is not allowed: 0 <= sharpness <= 1"),
    ("train.schedule2=\"linear\"", "train.schedule2 = 'linear' is not allowed: one of 'plateau', 'cosine'"),
    ("train.batchnorm=\"adapt\"", "train.batchnorm = 'adapt' is not allowed: one of 'frozen', 'train'"),
    ("train.cache_views=-1", "train.cache_views = -1 is not allowed"),
    ("sweep.pruner=\"asha\"", "sweep.pruner = 'asha' is not allowed: one of 'median', 'hyperband', 'none'"),
    ("sweep.lr1=[1e-2, 1e-5]", "sweep.lr1 = [0.01, 1e-05] is not allowed"),
    ("model.backbones=[]", "model.backbones = [] is not allowed: at least one backbone"),
    ("train.head_init=\"probe\"", "needs model.head_units = 0 (got 256)"),
    ("train.members=0", "train.members = 0 is not allowed: >= 1"),
    ("train.label_smoothing=1.0", "train.label_smoothing = 1.0 is not allowed: 0 <= label_smoothing < 1"),
    ("train.members=3", "train.members = 3 trains a seed ensemble per cross-validation fold: it needs data.folds >= 2"),
])
def test_values_that_cant_be_meant_are_refused_by_name(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("folds", ["[1, 1]", "[4]", "[0]"])
def test_only_folds_must_name_distinct_folds_of_the_cross_validation(folds):
    expected = r"data.only_folds = .* is not allowed: distinct fold numbers 1..data.folds \(3\)"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["data.folds=3", f"data.only_folds={folds}"])
    assert load_config(None, ["data.folds=3", "data.only_folds=[3, 1]"]).data.only_folds == [3, 1]


def test_every_shipped_config_is_valid():
    from pathlib import Path
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.toml")):
        load_config(path)


def test_fold_reuse_compares_configs_with_defaults_filled_in():
    """A fold saved before a setting existed matches a config with that setting at its default;
    another value, an unknown key or an unreadable file does not; the fold and backbone lists never
    count (a backbone's folds from a run of several backbones are reused by a run of it alone)."""
    from benchmark.config import fold_recipe, to_toml

    config = load_config(None, ["data.folds=5", "data.only_folds=[2]", "train.lr2=2e-4"])
    saved = tomllib.loads(config.to_toml())
    del saved["train"]["patience"], saved["data"]["only_folds"]  # as an older version wrote it

    assert fold_recipe(to_toml(saved), 224) == fold_recipe(config.to_toml(), 224)
    alone = load_config(None, ["data.folds=5", "train.lr2=2e-4", 'model.backbones=["resnet50"]'])
    assert alone.model.backbones != config.model.backbones
    assert fold_recipe(alone.to_toml(), 224) == fold_recipe(config.to_toml(), 224)
    more = load_config(None, ["data.folds=5", "train.lr2=2e-4", "train.members=3"])  # member 1 of 3 is this fold
    assert fold_recipe(more.to_toml(), 224) == fold_recipe(config.to_toml(), 224)
    elsewhere = load_config(None, ["data.folds=5", "train.lr2=2e-4", 'tracking.uri="sqlite:////else/mlflow.db"',
                                   'tracking.results_dir="/else"', "evaluate.far_distance=40"])  # the parent's scoring
    assert fold_recipe(elsewhere.to_toml(), 224) == fold_recipe(config.to_toml(), 224)
    other_lr = load_config(None, ["data.folds=5", "train.lr2=3e-4"])
    assert fold_recipe(other_lr.to_toml(), 224) != fold_recipe(config.to_toml(), 224)
    # The backbone's own size (model.input_size = 0) and that size named are the same recipe; another is not.
    own, named = (load_config(None, ["data.folds=5", "train.lr2=2e-4", f"model.input_size={size}"]).to_toml()
                  for size in (0, 260))
    assert fold_recipe(own, 260) == fold_recipe(named, 260) != fold_recipe(own, 224)
    saved["train"]["retired_setting"] = 1
    assert fold_recipe(to_toml(saved), 224) is None
    assert fold_recipe("not [valid", 224) is None
