"""tfmot integration: syq_tf quantizers as tfmot ``Quantizer``s / ``QuantizeConfig``s, and schemes.

tensorflow-model-optimization splits quantization into *what* (a ``QuantizeConfig`` per layer: which
weights and activations, with which quantizers) and *how* (a ``Quantizer``: build its variables on
the wrapper layer, then quantize a tensor). Here:

- :class:`TfmotQuantizer` puts any syq_tf quantizer behind tfmot's ``Quantizer`` interface. Its
  variables (SYQ alpha, UniQ delta, loss-aware scales, activation steps, ...) are created through the
  wrapper's ``layer.add_weight``, so they are the ``QuantizeWrapperV2``'s weights: trained, saved
  and restored with it; the math is the syq_tf quantizer's own.
- :class:`QuantizeConfig` quantizes a layer's kernel with a weight quantizer and (optionally) its
  output with an activation quantizer; :class:`SYQConfig`, :class:`UniQConfig`,
  :class:`LeastSquaresConfig`, :class:`LossAwareConfig` build one per method and
  :class:`ActivationConfig` quantizes only a layer's output (ReLU, BatchNorm, ...).
- :func:`quantize_model` quantizes a whole float model with a scheme name such as ``"syq-w2a8"``:
  the paper's layers in low precision, the first and last weighted layers with tfmot's default
  8-bit configs, everything else as tfmot's default 8-bit scheme does it (including its BatchNorm
  handling), the user's ``keep_float`` layers and (on request) unsupported ones left in float.
- :func:`quantize_scope` is tfmot's ``quantize_scope`` with syq_tf's classes in it (needed by
  ``quantize_apply`` and for loading tfmot models).

    with syq_tf.tfmot.quantize_scope():
        annotated = tfmot.quantization.keras.quantize_annotate_layer(
            tf.keras.layers.Conv2D(64, 3), quantize_config=syq_tf.tfmot.SYQConfig(bits=2, granularity="pixel"))
        ...
        model = tfmot.quantization.keras.quantize_apply(annotated_model)
    model = syq_tf.quantize_model(float_model, scheme="syq-w2a8")      # or the whole model at once
"""

from syq_tf import _bootstrap

_bootstrap.ensure_keras2()  # tfmot is Keras 2 only: a clear error in a syq_tf.keras3 process

from syq_tf.tfmot.adapter import TfmotQuantizer
from syq_tf.tfmot.configs import (
    ActivationConfig,
    LeastSquaresConfig,
    LossAwareConfig,
    QuantizeConfig,
    SYQConfig,
    UniQConfig,
    custom_objects,
    quantize_scope,
)
from syq_tf.tfmot.model import Unsupported, UnsupportedLayersError, quantize_model
from syq_tf.tfmot.schemes import Scheme, SchemeRegistry, SyqQuantizeScheme, parse_scheme
from syq_tf.tfmot.wrappers import is_wrapper, wrapper_kernels

__all__ = ["TfmotQuantizer", "QuantizeConfig", "SYQConfig", "UniQConfig", "LeastSquaresConfig", "LossAwareConfig",
           "ActivationConfig", "custom_objects", "quantize_scope", "Scheme", "parse_scheme", "SchemeRegistry",
           "SyqQuantizeScheme", "quantize_model", "Unsupported", "UnsupportedLayersError", "is_wrapper",
           "wrapper_kernels"]
