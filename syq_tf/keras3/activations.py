"""Sigmoid and swish as int8 TFLite computes them, for Keras 3 training.

TFLite's int8 LOGISTIC stores its output at a fixed scale, 1/256 with zero point -128: the levels
``k / 256``, ``k = 0 .. 255``. A swish ``x * sigmoid(x)`` becomes LOGISTIC, then MUL with ``x``, so
its sigmoid is on that grid too. Keras computes both in float. In an EfficientNet (a swish after
every convolution, a sigmoid gate in every squeeze-excite block) that rounding, which Keras never
made, put 9 % of the first swish's int8 outputs one step off TFLite's and 29-75 % of every
squeeze-excite block's (``syq_tf.export.trace_divergence``).

:class:`Int8Sigmoid` makes the same rounding in training, so the model learns with the values int8
TFLite computes::

    int8_sigmoid(x) = min(round(256 * sigmoid(x)), 255) / 256     (round half up, as FakeQuant)
    sigmoid layer:  y = int8_sigmoid(x)
    swish layer:    y = x * int8_sigmoid(x)

    dy/dx (sigmoid) = sigmoid'(x) where sigmoid(x) <= 255/256, else 0       (straight-through)
    dy/dx (swish)   = int8_sigmoid(x) + x * [the sigmoid's gradient above]

The rounding is a FakeQuant on ``[0, 255/256]``: exactly TFLite's scale and zero point, so the
converter takes it as the LOGISTIC's own output quantization (no extra op) when the model is exported.
:func:`syq_tf.keras3.quantize_model` puts it in place of every sigmoid and swish activation.
"""

import keras
import tensorflow as tf

from syq_tf.quantizers._common import int8_unit_grid

KINDS = {"sigmoid": "sigmoid", "swish": "swish", "silu": "swish"}  # activation name -> Int8Sigmoid kind


def int8_sigmoid(x):
    """``sigmoid(x)`` on int8 TFLite's LOGISTIC output grid (module docstring), straight-through
    gradient inside ``[0, 255/256]``."""
    return int8_unit_grid(tf.sigmoid(x))


def sigmoid_kind(layer):
    """``"sigmoid"`` or ``"swish"`` for a layer whose activation is a sigmoid or a swish (silu), else None."""
    activation = getattr(layer, "activation", None)
    return KINDS.get(getattr(activation, "__name__", activation)) if activation is not None else None


@keras.saving.register_keras_serializable(package="syq_tf")
class Int8Sigmoid(keras.layers.Layer):
    """A sigmoid (``activation="sigmoid"``) or swish (``"swish"``, also ``"silu"``) activation with its
    sigmoid on int8 TFLite's LOGISTIC output grid, ``k / 256`` (module docstring); no weights."""

    def __init__(self, activation="sigmoid", **kwargs):
        super().__init__(**kwargs)
        if activation not in KINDS:
            raise ValueError(f"Int8Sigmoid '{self.name}': activation={activation!r}; allowed: 'sigmoid', "
                             "'swish', 'silu'.")
        self.activation = KINDS[activation]

    def call(self, inputs):
        x = tf.convert_to_tensor(inputs)
        s = int8_sigmoid(x)
        return s if self.activation == "sigmoid" else x * s

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "activation": self.activation}
