"""tumorbench's engine. A process started by the CLI (and the trial processes it spawns) imports
TensorFlow quietly: see quiet.py."""
import os

if os.environ.get("TUMORBENCH_QUIET_TF") == "1":
    from . import quiet

    quiet.import_tensorflow()
