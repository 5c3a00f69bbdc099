"""syq_tf: low-precision quantization (SYQ and friends) for Keras, larq and TFLite.

Two frontends over one copy of the quantizer math and one export pipeline, one per process:

- ``import syq_tf`` -- Keras 2 (``tf_keras``, with larq, tfmot and LCE): importing the package
  selects Keras 2 (``TF_USE_LEGACY_KERAS=1``) before TensorFlow loads, and loads the API below.
- ``import syq_tf.keras3 as syq`` -- Keras 3 (``keras``, TensorFlow backend): on the way to that
  subpackage this package selects nothing and loads nothing (:mod:`syq_tf.keras3`).
"""

from syq_tf import _bootstrap

if not _bootstrap.importing_keras3():
    with _bootstrap.quiet_native_startup():  # only for the syq-tf command: its errors stay one line
        _bootstrap.ensure_keras2()

        from syq_tf import quantizers  # noqa: E402
        from syq_tf.layers import quantize  # noqa: E402
        from syq_tf.calibration import Calibrate, calibrate, fit_dorefa_ranges  # noqa: E402
        from syq_tf.models import ReinitializeScales, quantized_kernels, reinitialize_scales  # noqa: E402
        from syq_tf import export  # noqa: E402
        from syq_tf import optimizers  # noqa: E402
        from syq_tf.optimizers import LossAwareAdam  # noqa: E402
        from syq_tf import tfmot  # noqa: E402
        from syq_tf.tfmot import quantize_model  # noqa: E402
        from syq_tf.summary import summary  # noqa: E402
        from syq_tf.callbacks import CheckFinite, QuantizerLogger  # noqa: E402
        from syq_tf.plots import plot_codebooks, plot_training  # noqa: E402  (matplotlib loads on first plot)
        from syq_tf import saving  # noqa: E402
        from syq_tf.saving import load_model, save_model  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "quantizers",
    "quantize",
    "reinitialize_scales",
    "ReinitializeScales",
    "quantized_kernels",
    "calibrate",
    "Calibrate",
    "fit_dorefa_ranges",
    "export",
    "optimizers",
    "LossAwareAdam",
    "tfmot",
    "quantize_model",
    "summary",
    "QuantizerLogger",
    "CheckFinite",
    "plot_codebooks",
    "plot_training",
    "saving",
    "load_model",
    "save_model",
]


def __getattr__(name):
    """Only reached in a syq_tf.keras3 process, where the Keras 2 API above was not loaded."""
    if name in __all__:
        raise AttributeError(f"syq_tf.{name} is the Keras 2 API; this process uses syq_tf.keras3 (Keras 3): "
                             f"use syq_tf.keras3.{name}.")
    raise AttributeError(f"module 'syq_tf' has no attribute {name!r}")
