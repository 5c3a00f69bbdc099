"""SYQ — learned symmetric codebook per weight subgroup (Faraone et al., CVPR 2018).

See ../shared/METHODS.md §1. For a subgroup g with trainable scale alpha_g:

    eta        = eta_ratio * max|W|                         (whole tensor, no gradient)
    ternary:   Q(w) = alpha_g * sign(w)  if |w| > eta, else 0
    binary:    Q(w) = alpha_g * sign(w)  for every w         (sign(0) := +1)
    dL/dw        = alpha_g * g  where |w| > eta,  g where w was zeroed   (no clipping window)
    dL/dalpha_g  = sum_{j in g, |w_j| > eta} sign(w_j) * g_j
    init         alpha_g = mean_{j in g} |w_j|
"""

import tensorflow as tf

from syq_tf.quantizers._common import (
    is_int,
    is_real,
    GRANULARITIES,
    LearnedScaleQuantizer,
    owner_name,
    register,
    shown,
    sign_pm1,
    subgroup_reduce_axes,
)


def syq_quantize(w, alpha, eta_ratio=0.05, ternary=True, reduce_axes=None):
    """The SYQ forward/backward pair as a pure function.

    ``alpha`` must broadcast against ``w`` with size 1 on ``reduce_axes`` (the subgroup axes).
    """
    if reduce_axes is None:
        reduce_axes = tuple(range(w.shape.rank))

    @tf.custom_gradient
    def _syq(w, alpha):
        sign = sign_pm1(w)
        if ternary:
            eta = eta_ratio * tf.reduce_max(tf.abs(w))
            above = tf.abs(w) > eta
        else:
            above = tf.ones_like(w, dtype=tf.bool)
        q = tf.where(above, alpha * sign, tf.zeros_like(w))

        def grad(g):
            grad_w = tf.where(above, alpha * g, g)  # scaled straight-through; identity where zeroed
            grad_alpha = tf.reduce_sum(
                tf.where(above, sign * g, tf.zeros_like(g)), axis=reduce_axes, keepdims=True
            )
            return grad_w, tf.reshape(grad_alpha, tf.shape(alpha))

        return q, grad

    return _syq(w, alpha)


def syq_initial_alpha(w, reduce_axes):
    """alpha_g = mean|W| over each subgroup; an all-zero subgroup starts at 1 (any value is exact)."""
    alpha = tf.reduce_mean(tf.abs(w), axis=reduce_axes, keepdims=True)
    return tf.where(alpha > 0, alpha, tf.ones_like(alpha))


@register(alias="syq")
class SYQ(LearnedScaleQuantizer):
    """SYQ weight quantizer: binary (``bits=1``) or ternary (``bits=2``) with one trainable scale per
    subgroup (``granularity`` in ``layer``, ``row``, ``pixel``, ``channel``).

    The scales start at mean|W| of their subgroup the first time the quantizer runs on real values
    (so a float checkpoint loaded before training is used), and can be re-initialised from the
    current float weights with :func:`syq_tf.reinitialize_scales`.

    ``depthwise=True`` marks a DepthwiseConv2D kernel ``[kh, kw, c_in, mult]`` so that ``channel``
    means one scale per (c_in, mult) output channel; ``syq_tf.quantize`` sets it automatically.
    ``transposed=True`` (set the same way) marks a Conv1DTranspose / Conv2DTranspose kernel
    ``[.., c_out, c_in]``: ``channel`` then means one scale per c_out (axis -2).
    """

    SCALE_NAME = "alpha"

    def __init__(self, bits=2, granularity="layer", eta=0.05, depthwise=False, transposed=False, **kwargs):
        owner = owner_name("SYQ", kwargs)
        if not is_int(bits) or bits not in (1, 2):
            raise ValueError(
                f"{owner}: bits={shown(bits)!r} is not supported; allowed: 1 (binary) "
                "or 2 (ternary)."
            )
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"{owner}: unknown granularity {granularity!r}; allowed: "
                f"{GRANULARITIES}."
            )
        if not is_real(eta) or not 0.0 <= float(eta) < 1.0:
            raise ValueError(
                f"{owner}: eta={shown(eta)!r} must be a number in [0, 1) (threshold "
                "as a fraction of max|W|)."
            )
        super().__init__(**kwargs)
        self.bits = int(bits)
        self.precision = int(bits)
        self.granularity = granularity
        self.eta = float(eta)
        self.depthwise = bool(depthwise)
        self.transposed = bool(transposed)

    @property
    def ternary(self):
        """True for 2 bits: codebook {-alpha, 0, +alpha} (1 bit: {-alpha, +alpha})."""
        return self.bits == 2

    def reduce_axes(self, kernel_shape):
        return subgroup_reduce_axes(
            self.granularity, kernel_shape, self.depthwise, owner=f"SYQ quantizer '{self.name}'",
            transposed=self.transposed,
        )

    def initial_scale(self, w):
        return syq_initial_alpha(w, self._reduce_axes)

    def call(self, inputs):
        w = tf.convert_to_tensor(inputs)
        alpha = self.scale_for(w)
        return syq_quantize(w, alpha, self.eta, self.ternary, self._reduce_axes)

    def get_config(self):
        return {
            **super().get_config(),
            "bits": self.bits,
            "granularity": self.granularity,
            "eta": self.eta,
            "depthwise": self.depthwise,
            "transposed": self.transposed,
        }
