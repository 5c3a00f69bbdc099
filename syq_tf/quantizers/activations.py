"""Activation quantizers.

DoReFa (used with SYQ, METHODS.md §1):
    a_q = round(clip(a, 0, 1) * n) / n,   n = 2^k - 1
    da  = g inside [0, 1], 0 outside       (straight-through)
Rounding is half-up (floor(x + 0.5)), as TFLite rounds non-negative values, so an 8-bit DoReFa
activation is bit-identical to an int8 tensor with range [0, 1] after export.
"""

import tensorflow as tf

from syq_tf.quantizers._common import ActivationQuantizer, is_int, register, shown


def dorefa_quantize(x, bits=8):
    """k-bit DoReFa activation quantization with a straight-through gradient inside [0, 1]."""
    n = float(2**bits - 1)

    @tf.custom_gradient
    def _dorefa(x):
        q = tf.floor(tf.clip_by_value(x, 0.0, 1.0) * n + 0.5) / n

        def grad(g):
            inside = tf.logical_and(x >= 0.0, x <= 1.0)
            return tf.where(inside, g, tf.zeros_like(g))

        return q, grad

    return _dorefa(x)


@register(alias="syq_dorefa")
class DoReFaActivation(ActivationQuantizer):
    """DoReFa k-bit activation quantizer (``bits`` 1..8) on [0, 1]; use as ``input_quantizer``.

    Exported as ``syq_tf.quantizers.DoReFa``; the class name differs from larq's ``DoReFa`` so
    both load from saved models."""

    def __init__(self, bits=8, **kwargs):
        if not is_int(bits) or not 1 <= bits <= 8:
            raise ValueError(
                f"DoReFa {kwargs.get('name', '')!s}: bits={shown(bits)!r} is not supported; allowed: "
                "integers 1 to 8."
            )
        super().__init__(**kwargs)
        self.bits = int(bits)
        self.precision = int(bits)

    def call(self, inputs):
        return dorefa_quantize(inputs, self.bits)

    def export_grid(self):
        return 1.0 / (2**self.bits - 1), 2**self.bits

    def export_range(self):
        return 0.0, 1.0

    def get_config(self):
        return {**super().get_config(), "bits": self.bits}


DoReFa = DoReFaActivation
