"""LayerNormalization as int8 TFLite computes it, for Keras 3 training.

TensorFlow's converter turns a Keras 3 ``LayerNormalization`` into eleven ops, each holding its
output in int8 (on the range the converter calibrates), and its gamma and beta into int8 constants
(per tensor, on ``[min(0, min), max(0, max)]``)::

    mean     = MEAN(x)                          shift   = MUL(-mean, inv)     (NEG is exact)
    sq       = SQUARED_DIFFERENCE(x, mean)      shifted = ADD(shift, beta)
    variance = MEAN(sq)                         scaled  = MUL(x, inv)
    var_eps  = ADD(variance, epsilon)           y       = ADD(scaled, shifted)
    rsqrt    = RSQRT(var_eps)
    inv      = MUL(rsqrt, gamma)

Keras computes the same formula in float. The normalization scales its input's differences up (by
``gamma / std``), and those roundings on top: in the benchmark's Transformer, 3.6 % of the values
one int8 step off LiteRT's before the first LayerNormalization were 35 % after it.

:class:`Int8LayerNormalization` computes that formula with each of those tensors on an 8-bit
moving-average range (:class:`~syq_tf.quantizers.MovingAverageActivation`, sub-layers
``<layer>_<tensor>_range``) and gamma and beta on their int8 constant grids, so Keras trains on
the values int8 TFLite computes; the export (:class:`LayerNormalizationForm`) computes it with
those ranges as int8 FakeQuants, which the converter takes as the tensors' scales. The output ``y``
gets no range of its own: its reader's range (an output range after the layer) rounds it once.
:func:`syq_tf.keras3.quantize_model` puts it in place of every ``keras.layers.LayerNormalization``
(``rms_scaling=False``).
"""

import keras
import tensorflow as tf

from syq_tf.export.inference import FixedRanges
from syq_tf.layers import InnerRanges

# The tensors of the int8 graph with a range of their own (module docstring).
RANGES = ("mean", "squared_difference", "variance", "variance_epsilon", "rsqrt", "inv", "shift", "shifted",
          "scaled")


def int8_constant(values):
    """A constant operand as the converter stores it: int8 per tensor on ``[min(0, min), max(0, max)]``
    (straight-through gradient inside)."""
    low = tf.minimum(tf.reduce_min(values), 0.0)
    high = tf.maximum(tf.reduce_max(values), 0.0)
    high = tf.where(high > low, high, low + 1e-6)  # all zero: any range holds 0 exactly
    return tf.quantization.fake_quant_with_min_max_vars(values, low, high, num_bits=8, narrow_range=False)


def ranged_layer_normalization(layer, x, ranged):
    """``layer``'s LayerNormalization of ``x`` in int8 TFLite's order (module docstring), each int8
    tensor through ``ranged(name, tensor)``, gamma and beta on their int8 constant grids."""
    x = tf.convert_to_tensor(x)
    axes = sorted(a % x.shape.rank for a in ([layer.axis] if isinstance(layer.axis, int) else layer.axis))
    shape = [1] * x.shape.rank
    for a in axes:
        shape[a] = x.shape[a]
    mean = ranged("mean", tf.reduce_mean(x, axis=axes, keepdims=True))
    variance = ranged("variance", tf.reduce_mean(ranged("squared_difference", tf.math.squared_difference(x, mean)),
                                                 axis=axes, keepdims=True))
    inv = ranged("rsqrt", tf.math.rsqrt(ranged("variance_epsilon", variance + layer.epsilon)))
    if layer.scale:
        inv = ranged("inv", inv * int8_constant(tf.reshape(tf.convert_to_tensor(layer.gamma), shape)))
    shift = ranged("shift", -mean * inv)
    if layer.center:
        shift = ranged("shifted", shift + int8_constant(tf.reshape(tf.convert_to_tensor(layer.beta), shape)))
    return ranged("scaled", x * inv) + shift


def _copy_gamma_beta(layer, source):
    for attr in ("gamma", "beta"):
        if getattr(source, attr, None) is not None:
            getattr(layer, attr).assign(getattr(source, attr))


@keras.saving.register_keras_serializable(package="syq_tf")
class Int8LayerNormalization(InnerRanges, keras.layers.LayerNormalization):
    """Keras 3's LayerNormalization (same weights and config) computing on the int8 values TFLite's
    int8 normalization holds (module docstring). ``rms_scaling`` is not supported (TFLite computes
    it differently)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.rms_scaling:
            raise ValueError(f"Int8LayerNormalization '{self.name}': rms_scaling=True is not supported; allowed: "
                             "rms_scaling=False (use keras.layers.LayerNormalization).")
        self._add_ranges()

    def _range_names(self):
        """The ranges the formula uses (no ``inv`` without gamma, no ``shifted`` without beta)."""
        return tuple(n for n in RANGES if (n != "inv" or self.scale) and (n != "shifted" or self.center))

    def build(self, input_shape):
        super().build(input_shape)
        self._build_ranges()

    def call(self, inputs, training=None):
        return ranged_layer_normalization(self, inputs, self._ranged(training))

    def copy_weights(self, layer):
        """gamma and beta from a ``keras.layers.LayerNormalization``."""
        _copy_gamma_beta(self, layer)

    def inference_form(self):
        """The export's form of this layer (:class:`LayerNormalizationForm`, its ranges fixed)."""
        return LayerNormalizationForm.from_config({**self.get_config(), "ranges": self.int8_ranges()})


class LayerNormalizationForm(FixedRanges, keras.layers.LayerNormalization):
    """The inference form of an :class:`Int8LayerNormalization`: the same formula on its fixed ranges."""

    def call(self, inputs):
        return ranged_layer_normalization(self, inputs, self.ranged)

    def transfer(self, old):
        """gamma and beta from the trained layer (``syq_tf.export.inference.build``)."""
        _copy_gamma_beta(self, old)
