"""A test plugin backbone, `hold_net`, that lets a test stop a sweep worker at a known point.

Each trial process building it records itself in $HOLD_DIR. `HOLD_MODE=second`: the second trial
to start writes `holding` and blocks until killed (or until `release` appears). `HOLD_MODE=pair`:
every trial waits until trials of two different worker processes have started, so both workers of
a shared study are known to run trials. No wall-clock race: each test waits for a file."""
import os
import time
from pathlib import Path

import keras

from backbones import BackboneSpec, register
from backbones.preprocessing import raw

GIVE_UP_S = 600  # a safety net only; the tests never rely on it


def _wait_for(condition) -> None:
    deadline = time.monotonic() + GIVE_UP_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def _hold() -> None:
    folder = Path(os.environ["HOLD_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    started = len(list(folder.glob("started-*")))
    (folder / f"started-{started}-{os.getppid()}-{os.getpid()}").touch()
    release = folder / "release"
    if os.environ.get("HOLD_MODE") == "second" and started == 1 and not release.exists():
        (folder / "holding").touch()
        _wait_for(release.exists)
    elif os.environ.get("HOLD_MODE") == "pair":
        _wait_for(lambda: len({p.name.split("-")[2] for p in folder.glob("started-*")}) >= 2)


def build(size, weights):
    if "HOLD_DIR" in os.environ:
        _hold()
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, name="hold_low")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(4, 3, name="hold_top")(x))


@register
def hold_net():
    return BackboneSpec(name="hold_net", build=build, preprocess=raw, preprocessing="raw", input_size=32,
                        layer_groups=(("low", ("input", "hold_low")), ("top", ("hold_top",))),
                        last_conv_layer="hold_top")
