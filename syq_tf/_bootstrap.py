"""Frontend selection: Keras 2 (``import syq_tf``) or Keras 3 (``import syq_tf.keras3``).

Both must be decided before TensorFlow first resolves ``tf.keras``, and the two never share a
process. larq and tensorflow-model-optimization only support Keras 2 (the ``tf_keras`` package):
TensorFlow picks the Keras behind ``tf.keras`` from ``TF_USE_LEGACY_KERAS`` the first time
``tf.keras`` is resolved. ``import syq_tf`` sets it (:func:`ensure_keras2`) unless the import is on
its way to ``syq_tf.keras3`` (:func:`importing_keras3`), which checks Keras 3 instead
(:func:`ensure_keras3`) and blocks the Keras-2-only packages in its process.
"""

import contextlib
import os
import sys
import tempfile

_FIX = (
    "Import syq_tf before TensorFlow or Keras (put `import syq_tf` first), or set the environment "
    "variable TF_USE_LEGACY_KERAS=1 before anything imports TensorFlow."
)
_KERAS3_HINT = "A Keras 3 program uses `import syq_tf.keras3 as syq` instead."
_TRUE = ("1", "true", "yes")

# The process' frontend once chosen: 2 or 3.
_state = {"frontend": None}


def _keras3_loaded():
    keras = sys.modules.get("keras")
    version = getattr(keras, "__version__", "") if keras is not None else ""
    return version.split(".")[0] == "3"


def importing_keras3():
    """True while ``import syq_tf.keras3`` (or ``importlib.import_module("syq_tf.keras3")``) runs the
    package's ``__init__`` on its way to the subpackage: Python's import machinery, whose frames are
    on the stack, is then loading a module named ``syq_tf.keras3...``. The package must then not
    select Keras 2."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in ("_find_and_load", "_find_and_load_unlocked"):
            name = frame.f_locals.get("name")
            if isinstance(name, str) and (name == "syq_tf.keras3" or name.startswith("syq_tf.keras3.")):
                return True
        frame = frame.f_back
    return False


def frontend():
    """The process' frontend: 3 after ``import syq_tf.keras3``, else Keras 2 (selected now if not yet)."""
    if _state["frontend"] is None:
        ensure_keras2()
    return _state["frontend"]


def ensure_keras2():
    """Select Keras 2 for tf.keras, or raise ImportError saying what to do."""
    if _state["frontend"] == 2:
        return
    if _state["frontend"] == 3:
        raise ImportError(
            "this process uses syq_tf.keras3 (Keras 3); the Keras 2 frontend (syq_tf's own API, larq, "
            "tfmot, LCE) cannot share it: use syq_tf.keras3's API, or run Keras 2 code in another process."
        )
    flag = os.environ.get("TF_USE_LEGACY_KERAS")
    if flag is not None and flag.strip().lower() not in _TRUE:
        raise ImportError(
            f"syq_tf needs Keras 2 (tf_keras), but TF_USE_LEGACY_KERAS={flag!r} selects Keras 3. "
            f"Unset it or set TF_USE_LEGACY_KERAS=1. {_KERAS3_HINT}"
        )
    if flag is None and ("tensorflow" in sys.modules or _keras3_loaded()):
        # TensorFlow or Keras 3 came first: tf.keras may already be Keras 3 in user code.
        raise ImportError(
            "syq_tf was imported after Keras 3 / TensorFlow without TF_USE_LEGACY_KERAS=1, so models "
            f"built so far use Keras 3, which larq and tfmot do not support. {_FIX} {_KERAS3_HINT}"
        )
    os.environ["TF_USE_LEGACY_KERAS"] = "1"

    import tensorflow as tf  # noqa: E402  (deliberately after the variable is set)

    keras_module = tf.keras.layers.Layer.__module__
    if not keras_module.startswith("tf_keras"):
        raise ImportError(
            f"tf.keras resolves to {keras_module or 'Keras 3'}, not tf_keras (Keras 2): it was "
            "resolved before syq_tf was imported. " + _FIX
        )
    _state["frontend"] = 2


def ensure_keras3():
    """Select Keras 3 (TensorFlow backend) for ``syq_tf.keras3``, or raise ImportError saying why."""
    if _state["frontend"] == 3:
        return
    if _state["frontend"] == 2 or "tf_keras" in sys.modules:
        raise ImportError(
            "syq_tf.keras3 needs Keras 3, but this process already uses Keras 2 (syq_tf's Keras 2 API, "
            "larq, tfmot or tf_keras was used): the two frontends never share a process; import "
            "syq_tf.keras3 first, in a process of its own."
        )
    flag = os.environ.get("TF_USE_LEGACY_KERAS")
    if flag is not None and flag.strip().lower() in _TRUE:
        raise ImportError(
            f"syq_tf.keras3 needs Keras 3, but TF_USE_LEGACY_KERAS={flag!r} selects Keras 2 for "
            "tf.keras: unset it (Keras 2 code runs in a process of its own with `import syq_tf`)."
        )
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend != "tensorflow":
        raise ImportError(
            f"syq_tf.keras3 runs on Keras 3's TensorFlow backend; KERAS_BACKEND={backend!r}: set "
            "KERAS_BACKEND=tensorflow (or unset it) before Keras is imported."
        )
    import keras  # noqa: E402

    if keras.__version__.split(".")[0] != "3" or keras.backend.backend() != "tensorflow":
        raise ImportError(
            f"syq_tf.keras3 needs Keras 3 with the TensorFlow backend; got Keras {keras.__version__} "
            f"with the {keras.backend.backend()!r} backend."
        )
    _state["frontend"] = 3
    sys.meta_path.insert(0, _Keras2Only())


class _Keras2Only:
    """Import hook of a Keras 3 process: importing a Keras-2-only package fails at once with one line,
    not deep inside it on Keras 3 classes."""

    PACKAGES = {"larq": "larq", "tensorflow_model_optimization": "tfmot",
                "larq_compute_engine": "larq-compute-engine"}

    def find_spec(self, name, path=None, target=None):
        package = self.PACKAGES.get(name.split(".")[0])
        if package is not None:
            raise ImportError(f"{package} supports Keras 2 only, and this process uses Keras 3 (syq_tf.keras3): "
                              "run Keras 2 code (import syq_tf) in a process of its own.")
        return None


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
