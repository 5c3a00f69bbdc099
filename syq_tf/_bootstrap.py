"""Keras-2 bootstrap: must run before TensorFlow is first imported.

larq and tensorflow-model-optimization only support Keras 2 (the ``tf_keras`` package). TensorFlow
picks the Keras behind ``tf.keras`` from ``TF_USE_LEGACY_KERAS`` the first time ``tf.keras`` is
resolved, so syq_tf sets that variable itself and refuses to run on top of Keras 3.
"""

import contextlib
import os
import sys
import tempfile

_FIX = (
    "Import syq_tf before TensorFlow or Keras (put `import syq_tf` first), or set the environment "
    "variable TF_USE_LEGACY_KERAS=1 before anything imports TensorFlow."
)


def _keras3_loaded():
    keras = sys.modules.get("keras")
    version = getattr(keras, "__version__", "") if keras is not None else ""
    return version.split(".")[0] == "3"


def ensure_keras2():
    """Select Keras 2 for tf.keras, or raise ImportError saying what to do."""
    flag = os.environ.get("TF_USE_LEGACY_KERAS")
    if flag is not None and flag.strip().lower() not in ("1", "true", "yes"):
        raise ImportError(
            f"syq_tf needs Keras 2 (tf_keras), but TF_USE_LEGACY_KERAS={flag!r} selects Keras 3. "
            "Unset it or set TF_USE_LEGACY_KERAS=1."
        )
    if flag is None and ("tensorflow" in sys.modules or _keras3_loaded()):
        # TensorFlow or Keras 3 came first: tf.keras may already be Keras 3 in user code.
        raise ImportError(
            "syq_tf was imported after Keras 3 / TensorFlow without TF_USE_LEGACY_KERAS=1, so models "
            "built so far use Keras 3, which larq and tfmot do not support. " + _FIX
        )
    os.environ["TF_USE_LEGACY_KERAS"] = "1"

    import tensorflow as tf  # noqa: E402  (deliberately after the variable is set)

    keras_module = tf.keras.layers.Layer.__module__
    if not keras_module.startswith("tf_keras"):
        raise ImportError(
            f"tf.keras resolves to {keras_module or 'Keras 3'}, not tf_keras (Keras 2): it was "
            "resolved before syq_tf was imported. " + _FIX
        )


def _is_command_line():
    return os.path.basename(sys.argv[0] if sys.argv else "") == "syq-tf"


@contextlib.contextmanager
def quiet_native_startup(enabled=None):
    """Hold back what TensorFlow's C++ start-up writes straight to file descriptor 2 while it loads
    (absl's "All log messages before absl::InitializeLog() ..." and the CUDA probe lines, which
    TF_CPP_MIN_LOG_LEVEL does not silence), so the ``syq-tf`` command's errors stay one line. Only
    for the command (``enabled=None``: when the program is ``syq-tf``); if the import fails, what
    was held back is written out before the error propagates."""
    if enabled is None:
        enabled = _is_command_line()
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
