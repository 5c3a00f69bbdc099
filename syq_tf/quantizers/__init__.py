"""Quantizers, each a larq ``Quantizer`` (a Keras layer) usable as kernel/input quantizer."""

from syq_tf.quantizers._common import ActivationQuantizer, WeightQuantizer
from syq_tf.quantizers.activations import DoReFa, DoReFaActivation, dorefa_quantize
from syq_tf.quantizers.syq import SYQ, syq_quantize

__all__ = [
    "SYQ",
    "syq_quantize",
    "DoReFa",
    "DoReFaActivation",
    "dorefa_quantize",
    "WeightQuantizer",
    "ActivationQuantizer",
]
