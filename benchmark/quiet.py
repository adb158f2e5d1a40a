"""TensorFlow's start-up chatter (absl's pre-init warning, oneDNN and CUDA probing lines) kept out of
the user's terminal. Those lines are written by C++ straight to file descriptor 2 before absl logging
is set up, so no environment variable or Python logger reaches them: TensorFlow is imported, and its
devices probed, with descriptor 2 pointed at a temporary file. If that import fails, what it wrote
is shown after all. `tumorbench -v` skips this."""
from __future__ import annotations

import os
import sys
import tempfile


def import_tensorflow(verbose: bool = False) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if verbose:
        import tensorflow as tf

        tf.config.list_physical_devices()
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # CUDA probing ("failed call to cuInit") happens here
            tf.get_logger().setLevel("ERROR")
            import absl.logging

            absl.logging.set_verbosity(absl.logging.ERROR)
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
