"""syq_tf for Keras 3 (TensorFlow backend): ``import syq_tf.keras3 as syq``.

The same quantizers (one copy of the math and of the quantizer classes, shared with the Keras 2
frontend ``import syq_tf``), layers, training helpers, saving and export, for ``keras`` models.
Import it before anything uses Keras 2 in the process (the two frontends never share one); Keras 3
itself may be imported before or after. larq, tfmot and larq-compute-engine are Keras 2 only.
"""

from syq_tf import _bootstrap

_bootstrap.ensure_keras3()

import syq_tf.quantizers as quantizers  # noqa: E402  (the shared quantizers, on Keras 3 layers)
from syq_tf.layers import quantize  # noqa: E402
from syq_tf.calibration import Calibrate, calibrate, fit_dorefa_ranges  # noqa: E402
from syq_tf.models import ReinitializeScales, quantized_kernels, reinitialize_scales  # noqa: E402
from syq_tf.optimizers import LossAwareAdam  # noqa: E402
from syq_tf.summary import summary  # noqa: E402
from syq_tf.callbacks import CheckFinite, QuantizerLogger  # noqa: E402
from syq_tf.saving import load_model, save_model  # noqa: E402
import syq_tf.export as export  # noqa: E402
from syq_tf.keras3.model import quantize_model  # noqa: E402
from syq_tf.keras3.normalization import FusedBatchNormalization  # noqa: E402
from syq_tf.keras3.activations import Int8Sigmoid  # noqa: E402
from syq_tf.keras3.layer_normalization import Int8LayerNormalization  # noqa: E402

__all__ = [
    "quantizers",
    "quantize",
    "quantize_model",
    "FusedBatchNormalization",
    "Int8Sigmoid",
    "Int8LayerNormalization",
    "calibrate",
    "Calibrate",
    "fit_dorefa_ranges",
    "reinitialize_scales",
    "ReinitializeScales",
    "quantized_kernels",
    "LossAwareAdam",
    "summary",
    "QuantizerLogger",
    "CheckFinite",
    "load_model",
    "save_model",
    "export",
]
