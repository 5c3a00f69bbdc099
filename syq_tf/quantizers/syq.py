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
    GRANULARITIES,
    WeightQuantizer,
    register,
    scale_shape,
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
class SYQ(WeightQuantizer):
    """SYQ weight quantizer: binary (``bits=1``) or ternary (``bits=2``) with one trainable scale per
    subgroup (``granularity`` in ``layer``, ``row``, ``pixel``, ``channel``).

    The scales start at mean|W| of their subgroup the first time the quantizer runs on real values
    (so a float checkpoint loaded before training is used), and can be re-initialised from the
    current float weights with :func:`syq_tf.reinitialize_scales`.

    ``depthwise=True`` marks a DepthwiseConv2D kernel ``[kh, kw, c_in, mult]`` so that ``channel``
    means one scale per (c_in, mult) output channel; ``syq_tf.quantize`` sets it automatically.
    """

    def __init__(self, bits=2, granularity="layer", eta=0.05, depthwise=False, **kwargs):
        if bits not in (1, 2):
            raise ValueError(
                f"SYQ {kwargs.get('name', '')!s}: bits={bits!r} is not supported; allowed: 1 (binary) "
                "or 2 (ternary)."
            )
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"SYQ {kwargs.get('name', '')!s}: unknown granularity {granularity!r}; allowed: "
                f"{GRANULARITIES}."
            )
        if not isinstance(eta, (int, float)) or not 0.0 <= float(eta) < 1.0:
            raise ValueError(
                f"SYQ {kwargs.get('name', '')!s}: eta={eta!r} must be a number in [0, 1) (threshold "
                "as a fraction of max|W|)."
            )
        super().__init__(**kwargs)
        self.bits = int(bits)
        self.precision = int(bits)
        self.granularity = granularity
        self.eta = float(eta)
        self.depthwise = bool(depthwise)

    @property
    def ternary(self):
        return self.bits == 2

    def reduce_axes(self, kernel_shape):
        return subgroup_reduce_axes(
            self.granularity, kernel_shape, self.depthwise, owner=f"SYQ quantizer '{self.name}'"
        )

    def build(self, input_shape):
        self._reduce_axes = self.reduce_axes(input_shape)
        self._kernel_shape = tf.TensorShape(input_shape)
        self.alpha = self.add_weight(
            name="alpha",
            shape=scale_shape(input_shape, self._reduce_axes),
            initializer="ones",
            trainable=True,
        )
        # False until alpha has been set from real weights (first call or reinitialisation).
        self.alpha_initialized = self.add_weight(
            name="alpha_initialized", shape=(), dtype=tf.bool, initializer="zeros", trainable=False
        )
        super().build(input_shape)

    def initialize_from(self, kernel):
        """Set every alpha_g to mean|W| of its subgroup, from the given float kernel."""
        kernel = tf.convert_to_tensor(kernel, dtype=self.alpha.dtype)
        if not self.built:
            self.build(kernel.shape)
        self._check_shape(kernel.shape)
        self.alpha.assign(syq_initial_alpha(kernel, self._reduce_axes))
        self.alpha_initialized.assign(True)

    def _check_shape(self, shape):
        if not self._kernel_shape.is_compatible_with(shape):
            raise ValueError(
                f"SYQ quantizer '{self.name}' was built for a kernel of shape {self._kernel_shape} "
                f"and now got {tf.TensorShape(shape)}: each layer needs its own quantizer instance "
                "(pass a new SYQ(...) per layer, or let syq_tf.quantize copy it)."
            )

    def _lazy_init(self, w):
        def init():
            self.alpha.assign(syq_initial_alpha(w, self._reduce_axes))
            self.alpha_initialized.assign(True)
            return tf.constant(True)

        if tf.executing_eagerly():
            if not bool(self.alpha_initialized.numpy()):
                init()
            return []
        return [tf.cond(self.alpha_initialized, lambda: tf.constant(True), init)]

    def call(self, inputs):
        w = tf.convert_to_tensor(inputs)
        self._check_shape(w.shape)
        with tf.control_dependencies(self._lazy_init(w)):
            alpha = tf.identity(self.alpha)
        return syq_quantize(w, alpha, self.eta, self.ternary, self._reduce_axes)

    def get_config(self):
        return {
            **super().get_config(),
            "bits": self.bits,
            "granularity": self.granularity,
            "eta": self.eta,
            "depthwise": self.depthwise,
        }
