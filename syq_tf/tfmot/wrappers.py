"""What ``quantize_apply`` made: tfmot's wrapper layers and the kernels they quantize."""

import tensorflow as tf

from syq_tf.tfmot.adapter import TfmotQuantizer, kernel_attr, tq
from syq_tf.tfmot.configs import QuantizeConfig

def is_wrapper(layer):
    """True for a tfmot ``QuantizeWrapper`` (what ``quantize_apply`` puts around each layer)."""
    return isinstance(layer, tq.QuantizeWrapper)


def wrapper_kernels(layer):
    """{kernel attr: (syq_tf quantizer or None, float kernel variable)} of a tfmot QuantizeWrapper."""
    out = {}
    config = layer.quantize_config
    for weight, quantizer, _ in getattr(layer, "_weight_vars", []):
        attr = weight.name.split("/")[-1].split(":")[0]
        impl = quantizer.impl if isinstance(quantizer, TfmotQuantizer) else None
        out[attr] = (impl, weight)
    if not out and not isinstance(config, QuantizeConfig):
        attr = kernel_attr(layer.layer)
        if attr is not None and hasattr(layer.layer, attr) and isinstance(getattr(layer.layer, attr), tf.Variable):
            out[attr] = (None, getattr(layer.layer, attr))
    return out
