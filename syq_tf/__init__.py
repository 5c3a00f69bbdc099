"""syq_tf: low-precision quantization (SYQ and friends) for Keras 2, larq and TFLite.

Importing this package selects Keras 2 (``TF_USE_LEGACY_KERAS=1``) before TensorFlow loads.
"""

from syq_tf._bootstrap import ensure_keras2 as _ensure_keras2
from syq_tf._bootstrap import quiet_native_startup as _quiet_native_startup

with _quiet_native_startup():  # only for the syq-tf command: its errors stay one line
    _ensure_keras2()

    from syq_tf import quantizers  # noqa: E402
    from syq_tf.layers import quantize  # noqa: E402
    from syq_tf.calibration import Calibrate, calibrate  # noqa: E402
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
