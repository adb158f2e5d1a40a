"""Typed defaults, TOML file overrides, command-line overrides on top (as timm's train.py).

The merged config is saved with every run, so a result can always be traced to its settings.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .redact import mask


class ConfigError(ValueError):
    """A config file or override that can't be used; names the file or key."""


@dataclass
class DataConfig:
    path: str = ""  # empty: the embedded phantom set
    phantom_mode: str = "4class"
    phantom_per_class: int = 40
    phantom_size: int = 128
    class_names: list[str] = field(default_factory=list)  # empty: sorted folder names
    val_fraction: float = 0.2
    skip_bad: bool = False
    folds: int = 0  # > 1: k-fold cross-validation, the same folds for every backbone (bench --folds)
    # Train and score only these folds (1-based) now, e.g. [1, 2]: a CV too long for one sitting, in
    # parts; the means are then over these folds, and a later run with more (or all: []) reuses them
    only_folds: list[int] = field(default_factory=list)
    # Exact and near duplicates (the audit's groups) stay on one side of every split and fold, and a
    # val/test image that copies a training image is not scored.
    group_duplicates: bool = True
    duplicate_distance: int = 12  # near duplicate: 256-bit perceptual hashes at most this many bits apart
    # Images with an exact or near copy in any of these data sets are left out of this one before it
    # is split, so a model trained here (to start another set's runs from) has seen as few of that
    # set's images as hashes can find. exclude_distance is far above duplicate_distance on purpose:
    # sharpened, contrast-changed or cropped copies between the yes/no and 4-class sets were seen by
    # eye up to 64 bits apart (one likely at 82), while the median nearest image is 82 bits away.
    exclude_copies_of: list[str] = field(default_factory=list)
    exclude_distance: int = 80


@dataclass
class ModelConfig:
    backbones: list[str] = field(default_factory=lambda: ["vgg16", "resnet50", "efficientnetb0"])
    weights: str = "imagenet"  # imagenet | none | hed (vgg16) | path to a weights file | run:<MLflow run id>
    # Tried in order, with a loud warning, when `weights` can't be had, e.g. "imagenet,none"
    weights_fallback: str = ""
    input_size: int = 0  # 0: each backbone's default
    head_units: int = 256
    dropout: float = 0.5


@dataclass
class AugmentConfig:
    enabled: bool = True
    rotation_degrees: float = 15.0
    shift: float = 0.1
    shear: float = 0.1
    zoom: float = 0.1
    horizontal_flip: bool = True
    # Intensity: scanners and the copies spread between public sets differ in contrast, brightness and
    # sharpening, which the geometric ones above leave alone. 0 is off (the committed recipes).
    contrast: float = 0.0  # contrast scaled by a factor in [1 - c, 1 + c]
    brightness: float = 0.0  # brightness shifted by up to +-b of the 0..255 range
    sharpness: float = 0.0  # from blurred by s to sharpened by s (0.5: half blurred .. 1.5x sharpened)


@dataclass
class TrainConfig:
    batch_size: int = 16
    lr1: float = 1e-4
    epochs1: int = 20
    lr2: float = 1e-5
    epochs2: int = 15
    unfreeze: int = 1  # layer groups made trainable in phase 2, counted from the top
    patience: int = 5
    lr_factor: float = 0.2
    lr_patience: int = 3
    min_lr: float = 1e-6
    # Phase 1: "train" fits the head with Adam at lr1 for up to epochs1 epochs; "probe" sets a linear
    # head (model.head_units = 0) to the linear probe's logistic regression, fitted in closed form
    # on the cached features, and skips those epochs (LP-FT: fine-tuning starts from the probe).
    head_init: str = "train"
    weight_decay: float = 0.0  # phase 2: AdamW with this decoupled weight decay (0: Adam)
    # Both phases: the loss aims at 1 - s on the labelled class and s spread over all classes, and
    # validation loss (early stopping, best weights) is scored the same way; 0: plain cross-entropy.
    label_smoothing: float = 0.0
    # Mixup (Zhang et al., ICLR 2018): each training batch is mixed with itself in another order by
    # one weight drawn from Beta(a, a), labels and class weights alike, so the model also learns
    # between examples. It mixes what the trained part is fed: images when streamed, the cached
    # outputs of the frozen groups otherwise (manifold mixup). 0: off.
    mixup: float = 0.0
    # Phase 2 keeps an exponential moving average of the trained weights (Polyak averaging; Keras'
    # use_ema) over about this many last epochs, and scores, keeps and ends on the averaged weights:
    # the last steps' noise on a few hundred images averages out. 0: off, the weights as trained.
    ema_epochs: float = 0.0
    # Pretrained BatchNormalization in the unfrozen groups: "frozen" keeps the ImageNet statistics in
    # inference mode (the Keras guide, safest for small sets); "train" normalises with batch
    # statistics and updates them, adapting them to MRI (a base trained from scratch always trains them).
    batchnorm: str = "frozen"
    schedule2: str = "plateau"  # phase 2 learning rate: plateau (ReduceLROnPlateau) | cosine (decay to 0)
    # The weights a run ends with: "best", those of the epoch with the lowest validation loss (the
    # probe's included), which picks on the images that then score it; "last", phase 2's last epoch,
    # run to the end without early stopping: with head_init = "probe" and schedule2 = "cosine" the
    # validation images then choose nothing.
    keep: str = "best"
    class_weights: bool = True
    verbose: int = 2  # Keras progress display: 0 silent, 1 bar, 2 one line per epoch
    # Frozen layers computed once and cached (0: stream every epoch through the whole model, as the
    # seeds do). Epoch e trains on view e mod views (view 0 the plain images, the others augmented):
    # fewer views are faster to build, more views come closer to fresh augmentation every epoch.
    cache_views: int = 4
    # Models trained per cross-validation fold, member m from training seed `seed + m - 1`
    # (initialisation, shuffling, augmentation; the folds stay those of `seed`). The fold's scores, the
    # out-of-fold predictions and `predict` average the members' probabilities: a seed ensemble, for
    # small sets where one fine-tuning run lands anywhere in a wide range.
    members: int = 1
    mixed_precision: str = "auto"  # auto (on with a GPU) | on | off
    jit_compile: str = "auto"  # XLA: auto (Keras decides; on with a GPU) | on | off
    # Run Keras eagerly, without tracing graphs: for debugging, and for tiny runs (the test suite),
    # where tracing a large backbone's training graph takes longer than the training itself.
    eager: bool = False


@dataclass
class EvaluateConfig:
    # Linear-probe baseline beside every pretrained run: L2 logistic regression on the frozen pooled
    # features of the plain training images, its regularisation chosen by CV on the training images.
    probe: bool = True
    # 2 classes: also choose on validation the threshold reaching this sensitivity and report the
    # specificity it costs (test, if any, is scored with that same threshold); 0 = off.
    target_sensitivity: float = 0.95
    # Also score validation (and test) as `predict --tta` does: each image and its test-time views
    # (pipeline.TTA_VIEWS), probabilities averaged; logged as tta_<split>_* beside the plain figures.
    tta: bool = True
    calibration_bins: int = 10  # equal-width confidence bins for ECE and the reliability diagram
    bootstrap_resamples: int = 2000  # paired bootstrap for the backbone-vs-backbone table
    # Cross-validation also scores (far_oof_*) the out-of-fold images with no training image within
    # this many bits (256-bit perceptual hash): nearer ones are often processed copies of one slice.
    far_distance: int = 64


@dataclass
class TrackingConfig:
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<results_dir>/mlflow.db
    results_dir: str = "results"
    log_model: bool = True


@dataclass
class SweepConfig:
    trials: int = 20  # target number of finished trials per study (complete, pruned or failed)
    metric: str = "macro_f1"  # validation metric: macro_f1, accuracy, roc_auc, loss, ...
    pruner: str = "median"  # median | hyperband | none
    storage: str = ""  # empty: sqlite:///<results_dir>/optuna.db; postgresql://... for many workers
    heartbeat_seconds: int = 30  # a RUNNING trial silent for 2x this is marked failed
    # Each trial in a fresh child process: TF/Keras keep ~100-200 MB per fitted model even after
    # clear_session() (keras-team/keras#17458), so a long in-process study would grow without bound.
    process_per_trial: bool = True
    lr1: list[float] = field(default_factory=lambda: [1e-5, 1e-2])  # log-uniform range
    lr2: list[float] = field(default_factory=lambda: [1e-6, 1e-3])  # log-uniform range
    unfreeze: list[int] = field(default_factory=lambda: [0, -1])  # groups; -1: all of the backbone's
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.7])
    head_units: list[int] = field(default_factory=lambda: [64, 512])


@dataclass
class Config:
    seed: int = 42
    plugins: list[str] = field(default_factory=list)  # modules that register extra backbones
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The config as saved with runs: URL passwords masked (redact.mask)."""
        return mask(to_toml(self.to_dict()))


def _coerce(value, kind, where: str):
    """Check `value` against the field's annotated type; ints are accepted for floats."""
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _merge(target, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(target))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{where}: unknown key {key!r} (known: {known})")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table")
            _merge(current, value, f"{where} [{key}]")
        else:
            setattr(target, key, _coerce(value, hints[key], f"{where}: {key}"))


def _parse_override(text: str) -> tuple[list[str], object]:
    """'train.lr1=3e-4' -> (['train', 'lr1'], 3e-4); values are TOML literals, else plain strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


# Values that can't be meant, per key: (check, what is allowed). Checked after every merge.
def _positive(v):
    return v > 0


def _at_least(n):
    return lambda v: v >= n


def _one_of(*names):
    return (lambda v: v in names), "one of " + ", ".join(repr(n) for n in names)


def _range_pair(v):
    return len(v) == 2 and v[0] <= v[1]


RULES: dict[str, tuple] = {
    "seed": (_at_least(0), ">= 0"),
    "data.phantom_mode": _one_of("4class", "binary"),
    "data.phantom_per_class": (_at_least(2), ">= 2"),
    "data.phantom_size": (_at_least(16), ">= 16"),
    "data.val_fraction": (lambda v: 0 < v < 1, "between 0 and 1, exclusive"),
    "data.folds": (lambda v: v == 0 or v >= 2, "0 (no cross-validation) or >= 2"),
    "data.duplicate_distance": (lambda v: 0 <= v <= 256, "0..256 bits"),
    "data.exclude_distance": (lambda v: 0 <= v <= 256, "0..256 bits"),
    "model.backbones": (lambda v: len(v) > 0, "at least one backbone"),
    "model.input_size": (lambda v: v == 0 or v >= 16, "0 (the backbone's default) or >= 16 pixels"),
    "model.head_units": (_at_least(0), ">= 0 (0: a linear head)"),
    "model.dropout": (lambda v: 0 <= v < 1, "0 <= dropout < 1"),
    "augment.rotation_degrees": (lambda v: 0 <= v <= 180, "0..180 degrees"),
    "augment.shift": (lambda v: 0 <= v < 1, "0 <= shift < 1"),
    "augment.shear": (lambda v: 0 <= v < 1, "0 <= shear < 1"),
    "augment.zoom": (lambda v: 0 <= v < 1, "0 <= zoom < 1"),
    "augment.contrast": (lambda v: 0 <= v < 1, "0 <= contrast < 1"),
    "augment.brightness": (lambda v: 0 <= v < 1, "0 <= brightness < 1"),
    "augment.sharpness": (lambda v: 0 <= v <= 1, "0 <= sharpness <= 1"),
    "train.batch_size": (_positive, "> 0"),
    "train.lr1": (_positive, "> 0"),
    "train.lr2": (_positive, "> 0"),
    "train.epochs1": (_at_least(0), ">= 0"),
    "train.epochs2": (_at_least(0), ">= 0"),
    "train.unfreeze": (_at_least(0), ">= 0 layer groups"),
    "train.patience": (_at_least(1), ">= 1"),
    "train.lr_factor": (lambda v: 0 < v < 1, "between 0 and 1, exclusive"),
    "train.lr_patience": (_at_least(1), ">= 1"),
    "train.min_lr": (_at_least(0), ">= 0"),
    "train.head_init": _one_of("train", "probe"),
    "train.weight_decay": (_at_least(0), ">= 0"),
    "train.label_smoothing": (lambda v: 0 <= v < 1, "0 <= label_smoothing < 1"),
    "train.mixup": (lambda v: 0 <= v <= 10, "0..10 (0: off)"),
    "train.ema_epochs": (lambda v: 0 <= v <= 100, "0..100 epochs (0: off)"),
    "train.schedule2": _one_of("plateau", "cosine"),
    "train.keep": _one_of("best", "last"),
    "train.batchnorm": _one_of("frozen", "train"),
    "train.verbose": _one_of(0, 1, 2),
    "train.cache_views": (_at_least(0), ">= 0 (0: stream)"),
    "train.members": (_at_least(1), ">= 1"),
    "train.mixed_precision": _one_of("auto", "on", "off"),
    "train.jit_compile": _one_of("auto", "on", "off"),
    "evaluate.target_sensitivity": (lambda v: 0 <= v < 1, "0 (off) or a sensitivity below 1"),
    "evaluate.calibration_bins": (_at_least(2), ">= 2"),
    "evaluate.bootstrap_resamples": (_at_least(100), ">= 100"),
    "evaluate.far_distance": (lambda v: 0 <= v <= 256, "0..256 bits"),
    "sweep.trials": (_at_least(1), ">= 1"),
    "sweep.pruner": _one_of("median", "hyperband", "none"),
    "sweep.heartbeat_seconds": (_at_least(1), ">= 1"),
    "sweep.lr1": (lambda v: _range_pair(v) and v[0] > 0, "[low, high] with 0 < low <= high"),
    "sweep.lr2": (lambda v: _range_pair(v) and v[0] > 0, "[low, high] with 0 < low <= high"),
    "sweep.unfreeze": (lambda v: len(v) == 2 and v[0] >= 0 and (v[1] == -1 or v[0] <= v[1]),
                       "[low, high] groups, high = -1 for all"),
    "sweep.dropout": (lambda v: _range_pair(v) and v[0] >= 0 and v[1] < 1, "[low, high] within 0..1"),
    "sweep.head_units": (lambda v: _range_pair(v) and v[0] >= 0, "[low, high] with 0 <= low <= high"),
}


def validate(config: Config) -> Config:
    """Refuse values that can't be meant, naming the key, the value and what is allowed."""
    for key, (check, allowed) in RULES.items():
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if not check(value):
            raise ConfigError(f"{key} = {value!r} is not allowed: {allowed}")
    only = config.data.only_folds
    if only and (len(set(only)) != len(only) or not all(1 <= f <= config.data.folds for f in only)):
        raise ConfigError(f"data.only_folds = {only!r} is not allowed: distinct fold numbers 1..data.folds "
                          f"({config.data.folds}), with cross-validation (data.folds >= 2)")
    if config.train.members > 1 and config.data.folds < 2:
        raise ConfigError(f"train.members = {config.train.members} trains a seed ensemble per cross-validation "
                          f"fold: it needs data.folds >= 2 (got {config.data.folds})")
    if config.train.head_init == "probe" and config.model.head_units:
        raise ConfigError(f"train.head_init = 'probe' sets a linear head to the linear probe: it needs "
                          f"model.head_units = 0 (got {config.model.head_units})")
    return config


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file at `path`, then `overrides` ('section.key=value'); validated."""
    config = Config()
    if path:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
        _merge(config, values, str(path))
    for text in overrides:
        keys, value = _parse_override(text)
        nested: dict = {keys[-1]: value}
        for key in reversed(keys[:-1]):
            nested = {key: nested}
        _merge(config, nested, f"override {text!r}")
    return validate(config)


# Keys that choose which folds, backbones and seed members a run trains, or where its results go,
# not what one backbone's fold computes: left out when a saved fold run's config is matched against
# this one for reuse.
NOT_FOLD_RECIPE = (("data", "only_folds"), ("model", "backbones"), ("train", "members"),
                   ("evaluate", "far_distance"), ("tracking", "uri"), ("tracking", "results_dir"))


def fold_recipe(toml_text: str, own_input_size: int) -> dict | None:
    """A saved (or this) config as the values that decide what one fold's run computes. A key the
    saved config lacks (a setting added since, whose default keeps the old behaviour) counts at its
    default; a saved key that no longer exists makes it match nothing (None). model.input_size = 0
    counts as the size it stands for, the backbone's own (`own_input_size`)."""
    config = Config()
    try:
        _merge(config, tomllib.loads(toml_text), "saved config")
    except (ConfigError, tomllib.TOMLDecodeError):
        return None
    config.model.input_size = config.model.input_size or own_input_size
    values = config.to_dict()
    for section, key in NOT_FOLD_RECIPE:
        values[section].pop(key)
    return values


def to_toml(values: dict, prefix: str = "") -> str:
    """A TOML rendering of a nested dict of str/int/float/bool/list values (enough for Config)."""
    lines, tables = [], []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    text = "\n".join(lines)
    for key, value in tables:
        name = f"{prefix}{key}"
        text += f"\n\n[{name}]\n" + to_toml(value, f"{name}.")
    return text.strip() + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
