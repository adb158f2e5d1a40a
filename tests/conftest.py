import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def pytest_configure(config):
    """Under pytest-xdist every core already runs a worker: TensorFlow in each (and in the commands a
    test starts) uses one thread, as the tiny models gain nothing from more. Two tiny benches side
    by side took 60 s each so, 70-76 s with TensorFlow's default pools (2026-12-08, 2 cores)."""
    if hasattr(config, "workerinput"):  # set before any test module imports TensorFlow
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")


@pytest.fixture
def postgres_turn():
    """The tests that use the PostgreSQL test server take turns: pytest-xdist runs tests side by side,
    and each reads the whole store or study it wrote to."""
    with open(Path(tempfile.gettempdir()) / "tumorbench-postgres-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Phantoms and Keras downloads go to a per-session temporary folder, never $HOME."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("TUMORBENCH_CACHE", str(cache))


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, created once: MLflow builds a new store by running its schema
    migrations, seconds each time, and most tests here start from a new store."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.getbasetemp() / "migrated-mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@pytest.fixture(autouse=True)
def _new_stores_from_the_migrated_one(_migrated_store, monkeypatch):
    """A SQLite store opened in this process that does not exist yet starts as a copy of the migrated
    empty one: the same tables and Default experiment MLflow would create (subprocesses still create theirs)."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    def seeded(init):
        def wrapper(self, db_uri, *args, **kwargs):
            if db_uri.startswith("sqlite:///") and not (path := Path(db_uri.removeprefix("sqlite:///"))).exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(_migrated_store, path)
            init(self, db_uri, *args, **kwargs)
        return wrapper

    for store in (TrackingStore, RegistryStore):
        monkeypatch.setattr(store, "__init__", seeded(store.__init__))


@pytest.fixture(autouse=True)
def _no_serving_rehearsal(request, monkeypatch):
    """MLflow's log_model loads each logged model again and predicts its input example, only to warn
    if that fails: about 5 s a model here, a third of the CV test's time. Tests skip that rehearsal,
    except those marked `serving_rehearsal`, which check that it passes."""
    if request.node.get_closest_marker("serving_rehearsal") is None:
        skip_serving_rehearsal(monkeypatch)


def skip_serving_rehearsal(monkeypatch) -> None:
    """Also for module-scoped fixtures, which run before the function-scoped autouse ones."""
    import mlflow.models.utils

    monkeypatch.setattr(mlflow.models.utils, "_validate_serving_input", lambda model_uri, serving_input: None)


def write_image(path: Path, mode: str = "L", size=(24, 20), seed: int = 0, fmt: str | None = None) -> Path:
    """A small random image of `mode` saved at `path` (format from the suffix unless `fmt`)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 4096, (h, w), dtype=np.uint16)).save(path, format=fmt or "PNG")
        return path
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    image = base.convert(mode) if mode != "P" else base.convert("P", palette=Image.Palette.ADAPTIVE)
    image.save(path, format=fmt)
    return path


def bomb_png(path: Path, side: int = 15000) -> Path:
    """A ~100-byte PNG whose header claims side x side pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def broken_exif_jpeg(path: Path) -> Path:
    """A small JPEG whose EXIF block claims 5 tags and holds 4 bytes: Pillow warns "Corrupt EXIF data"."""
    import struct

    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 5) + b"\x00" * 4
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(path, exif=exif)
    return path


def image_folder(root: Path, classes=("no", "yes"), per_class: int = 4, size=(24, 20)) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"img {i}.png", "L", size, seed=c * 100 + i)
    return root


def clean_env() -> dict:
    """The environment for a spawned tumorbench process: without the MLFLOW_TRACKING_URI that
    mlflow.set_tracking_uri() wrote into this test process."""
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


NAN_BACKBONE = '''
import keras
from backbones import BackboneSpec, register

def build(size, weights):
    inputs = keras.Input((size, size, 3))
    return keras.Model(inputs, keras.layers.Conv2D(4, 3, name="nan_conv")(inputs))

@register
def nan_net():
    return BackboneSpec(name="nan_net", build=build, preprocess=lambda x: x * float("nan"), preprocessing="nan",
                        input_size=32, layer_groups=(("all", ("input", "nan_conv")),), last_conv_layer="nan_conv")
'''


@pytest.fixture
def nan_plugin(tmp_path, monkeypatch):
    """Config overrides for a plugin backbone `nan_net` whose preprocessing turns every input into NaN.

    No hidden ReLU layer in the head: relu(NaN) is 0 on some CPU kernels and would hide the NaN.
    """
    from backbones._registry import _REGISTRY

    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "nan_backbone.py").write_text(NAN_BACKBONE)
    monkeypatch.syspath_prepend(str(folder))
    yield ['plugins=["nan_backbone"]', 'model.backbones=["nan_net"]', "model.head_units=0"]
    _REGISTRY.pop("nan_net", None)
    sys.modules.pop("nan_backbone", None)
