"""Quantizers, each a larq ``Quantizer`` (a Keras layer) usable as kernel/input quantizer."""

from syq_tf.quantizers._common import ActivationQuantizer, WeightQuantizer, int8_fake_quant
from syq_tf.quantizers.activations import (
    DoReFa,
    DoReFaActivation,
    MovingAverageActivation,
    dorefa_quantize,
    range_quantize,
)
from syq_tf.quantizers.least_squares import (
    LeastSquares,
    LeastSquaresActivation,
    least_squares_quantize,
    least_squares_scalars,
)
from syq_tf.quantizers.loss_aware import LossAware, loss_aware_project
from syq_tf.quantizers.syq import SYQ, syq_quantize
from syq_tf.quantizers.uniform import MaxAbsWeight, max_abs_quantize
from syq_tf.quantizers.uniq import (
    NotCalibratedError,
    UniQ,
    UniQActivation,
    uniq_activation_quantize,
    uniq_weight_quantize,
)

__all__ = [
    "SYQ",
    "syq_quantize",
    "UniQ",
    "UniQActivation",
    "uniq_weight_quantize",
    "uniq_activation_quantize",
    "NotCalibratedError",
    "LeastSquares",
    "LeastSquaresActivation",
    "least_squares_quantize",
    "least_squares_scalars",
    "LossAware",
    "loss_aware_project",
    "DoReFa",
    "DoReFaActivation",
    "dorefa_quantize",
    "MovingAverageActivation",
    "MaxAbsWeight",
    "max_abs_quantize",
    "range_quantize",
    "WeightQuantizer",
    "ActivationQuantizer",
    "int8_fake_quant",
]
