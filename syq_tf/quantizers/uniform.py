"""Symmetric uniform weights on the largest magnitude -- tfmot's default 8-bit weights, which the
whole-model schemes give the first and last layers (the papers keep them at 8 bits).

For a subgroup g (granularity as SYQ's) and ``bits`` b, with n = 2^(b-1) - 1:

    s_g   = max_{j in g} |w_j| / n          (1 for an all-zero subgroup)
    Q(w)  = s_g * round(w / s_g)            (half away from zero; |Q(w) / s_g| <= n)
    dL/dw = g                               (straight-through; every w is inside [-n s_g, n s_g])

With b = 8 the levels are exactly an int8 per-channel tensor (k * s, |k| <= 127), as TFLite stores it.
"""

import tensorflow as tf

from syq_tf.quantizers._common import (
    GRANULARITIES, WeightQuantizer, is_int, owner_name, register, subgroup_reduce_axes,
)


def max_abs_quantize(w, bits=8, reduce_axes=None):
    """Q(w) of the module docstring with a straight-through gradient."""
    if reduce_axes is None:
        reduce_axes = tuple(range(w.shape.rank))
    n = float(2 ** (bits - 1) - 1)
    top = tf.reduce_max(tf.abs(w), axis=reduce_axes, keepdims=True)
    step = tf.where(top > 0, top / n, tf.ones_like(top))
    k = tf.sign(w) * tf.floor(tf.abs(w) / step + 0.5)
    q = tf.clip_by_value(k, -n, n) * step
    return w + tf.stop_gradient(q - w)


@register(alias="syq_max_abs")
class MaxAbsWeight(WeightQuantizer):
    """Symmetric ``bits``-bit weights (2..8) scaled by max|W| per subgroup (``granularity`` layer,
    row, pixel or channel; default channel): tfmot's default 8-bit weight quantization, exact in
    int8 at 8 bits. No trainable state."""

    def __init__(self, bits=8, granularity="channel", depthwise=False, **kwargs):
        owner = owner_name("MaxAbsWeight", kwargs)
        if not is_int(bits) or not 2 <= bits <= 8:
            raise ValueError(f"{owner}: bits={bits!r} is not supported; allowed: integers 2 to 8.")
        if granularity not in GRANULARITIES:
            raise ValueError(f"{owner}: unknown granularity {granularity!r}; allowed: {GRANULARITIES}.")
        super().__init__(**kwargs)
        self.bits = int(bits)
        self.precision = int(bits)
        self.granularity = granularity
        self.depthwise = bool(depthwise)

    def build(self, input_shape):
        self._reduce_axes = subgroup_reduce_axes(self.granularity, input_shape, self.depthwise,
                                                 owner=f"MaxAbsWeight quantizer '{self.name}'")
        super().build(input_shape)

    def call(self, inputs):
        return max_abs_quantize(tf.convert_to_tensor(inputs), self.bits, self._reduce_axes)

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "granularity": self.granularity,
                "depthwise": self.depthwise}
