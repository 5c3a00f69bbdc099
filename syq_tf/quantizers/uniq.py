"""UniQ — learnable symmetric step, multi-bit and binary (Pham, Abraham, Chung, 2021).

See ../shared/METHODS.md §2. ``b`` bits, ``L = 2^b`` levels, ``c = (L-1)/2``, step ``delta > 0``:

    weights (mid-rise, no zero level):  Q(w) = (round(clip(w/delta + c, 0, L-1)) - c) * delta
                                        levels (i - c) * delta;  b = 1 gives +-delta/2
    activations (unsigned):             Q(a) = round(clip(a/delta, 0, L-1)) * delta

    dQ/dw = 1 inside the clip range, 0 outside                              (straight-through)
    dQ/ddelta, weights, u = w/delta + c:   round(u) - u inside, -c below, +c above
    dQ/ddelta, activations, u = a/delta:   round(u) - u inside, L-1 above, 0 below
    step gradient scaled by 1/sqrt(N * Qp), Qp = max(2^(b-1) - 1, 1)   (weights, N per step)
                       and 1/sqrt(N * (2^b - 1))                       (activations)
    activations, N:   step_grad="per_example" (default): features of one example (numel / batch)
                      step_grad="official": every element of the batch (the authors' x.numel()),
                      a step gradient sqrt(batch) times smaller

    init: delta_w = k_b * std(W),  delta_a = k+_b * max_batches sqrt(2 E[a^2])
          std is the unbiased one, sqrt(sum (w - mean)^2 / (n - 1)), as the authors' torch std()
    (k_b, k+_b: MSE-optimal steps for a unit Gaussian / a rectified unit Gaussian)

Rounding ties: weights round half away from the centre (Q(-w) = -Q(w) exactly); activations round
half up (floor(u + 1/2)), as TFLite rounds non-negative values. Both equal ``round`` except at ties.

In every case dQ/ddelta = Q/delta - (x/delta if inside the clip range else 0), which is how the
backward pass below computes it.
"""

import functools
import math

import tensorflow as tf

from syq_tf.quantizers._common import (
    is_int,
    is_real,
    ActivationQuantizer,
    LearnedScaleQuantizer,
    owner_name,
    register,
    shown,
    subgroup_reduce_axes,
)

BITS = tuple(range(1, 9))
GRANULARITIES = ("layer", "channel")

# MSE-optimal steps from the paper (METHODS.md §2). Other bit widths are computed by
# gaussian_optimal_step, which reproduces these to 1e-4 (tests/test_uniq.py).
K_WEIGHT = {1: 1.59577, 2: 0.99569, 3: 0.58602, 4: 0.33520, 5: 0.18814}
K_ACTIVATION = {1: 1.22399, 2: 0.65077, 3: 0.35341, 4: 0.19325}


def _gaussian_segment(a, b, level):
    """integral_a^b (x - level)^2 phi(x) dx for the unit Gaussian density phi (a, b may be +-inf)."""

    def cdf(x):
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0))) if math.isfinite(x) else float(x > 0)

    def pdf(x):
        return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi) if math.isfinite(x) else 0.0

    def x_pdf(x):
        return x * pdf(x) if math.isfinite(x) else 0.0

    # antiderivatives: x^2 phi -> Phi - x phi,  x phi -> -phi,  phi -> Phi
    return (
        (cdf(b) - x_pdf(b)) - (cdf(a) - x_pdf(a))
        + 2.0 * level * (pdf(b) - pdf(a))
        + level * level * (cdf(b) - cdf(a))
    )


def gaussian_mse(delta, bits, rectified=False):
    """Mean squared error of the UniQ quantizer with step ``delta`` on N(0, 1) data, or on
    max(N(0, 1), 0) with the unsigned activation levels if ``rectified``."""
    levels = 2**bits
    centre = 0.0 if rectified else (levels - 1) / 2.0
    total = 0.0
    for i in range(levels):
        level = (i - centre) * delta
        low = (0.0 if rectified else -math.inf) if i == 0 else level - delta / 2.0
        high = math.inf if i == levels - 1 else level + delta / 2.0
        total += _gaussian_segment(low, high, level)
    return total  # rectified: the negative half maps to 0 exactly and adds nothing


# Pure Python, called from quantizer code that autograph converts: keep autograph out (converted,
# the 200-step search over 2^b levels took minutes for 8 bits) and compute each constant once.
@functools.lru_cache(maxsize=None)
@tf.autograph.experimental.do_not_convert
def gaussian_optimal_step(bits, rectified=False):
    """The step minimising :func:`gaussian_mse` (golden-section search on (0, 4])."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    lo, hi = 1e-4, 4.0
    for _ in range(200):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if gaussian_mse(a, bits, rectified) < gaussian_mse(b, bits, rectified):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2.0


@tf.autograph.experimental.do_not_convert
def weight_step_constant(bits):
    """k_b of the weight step delta = k_b * std(W): the MSE-optimal uniform step for N(0, 1) data at
    ``bits`` (the paper's table where it has the value, else :func:`gaussian_optimal_step`)."""
    return K_WEIGHT.get(bits) or gaussian_optimal_step(bits)


@tf.autograph.experimental.do_not_convert
def activation_step_constant(bits):
    """k_b of the activation step: the MSE-optimal step for rectified N(0, 1) data (ReLU inputs)."""
    return K_ACTIVATION.get(bits) or gaussian_optimal_step(bits, rectified=True)


# Smallest step. Adam moves a variable by about its learning rate per update whatever the gradient
# scale, so a small step (an 8-bit activation step is ~0.017 sigma) can be pushed through zero; a
# non-positive step is meaningless (and breaks export), so the variables are constrained to stay
# above this and the forward pass uses max(delta, MIN_STEP).
MIN_STEP = 1e-8


class PositiveStep(tf.keras.constraints.Constraint):
    """Keeps a step variable >= MIN_STEP after every optimizer update."""

    def __call__(self, w):
        return tf.maximum(w, MIN_STEP)


def _check_bits(bits, owner):
    if not is_int(bits) or bits not in BITS:
        raise ValueError(f"{owner}: bits={shown(bits)!r} is not supported; allowed: integers 1 to 8.")


# ---- the math --------------------------------------------------------------------------------


def uniq_weight_quantize(w, delta, bits, reduce_axes=None):
    """UniQ weight quantization; ``delta`` broadcasts against ``w`` with size 1 on ``reduce_axes``
    (the axes one step is shared over)."""
    if reduce_axes is None:
        reduce_axes = tuple(range(w.shape.rank))
    c = (2.0**bits - 1.0) / 2.0
    q_p = max(2.0 ** (bits - 1) - 1.0, 1.0)

    @tf.custom_gradient
    def _uniq(w, delta):
        s = w / delta
        sign = tf.where(s >= 0, tf.ones_like(s), -tf.ones_like(s))
        # |round(u) - c| = floor(|w|/delta) + 1/2, capped at c (ties away from the centre)
        index = sign * tf.minimum(tf.floor(tf.abs(s)) + 0.5, c)  # (Q / delta), in {-c, ..., c}
        inside = tf.abs(s) <= c

        def grad(g):
            n = tf.cast(tf.size(w), w.dtype) / tf.cast(tf.size(delta), w.dtype)  # elements per step
            scale = tf.math.rsqrt(n * q_p)
            d_delta = index - tf.where(inside, s, tf.zeros_like(s))
            grad_delta = tf.reduce_sum(g * d_delta, axis=reduce_axes, keepdims=True) * scale
            return tf.where(inside, g, tf.zeros_like(g)), tf.reshape(grad_delta, tf.shape(delta))

        return index * delta, grad

    return _uniq(w, delta)


STEP_GRADS = ("per_example", "official")


def _check_step_grad(step_grad, owner):
    if step_grad not in STEP_GRADS:
        raise ValueError(
            f"{owner}: step_grad={step_grad!r}; allowed: 'per_example' (1/sqrt(features of one example "
            "* (2^b - 1))) or 'official' (1/sqrt(elements of the whole batch * (2^b - 1)), the authors' code)."
        )


def uniq_activation_quantize(a, delta, bits, step_grad="per_example"):
    """UniQ unsigned activation quantization with a scalar step ``delta``.

    ``step_grad`` chooses N of the step-gradient scale 1/sqrt(N (2^b - 1)): "per_example" (N = the
    features of one example) or "official" (N = every element of the batch, as the authors' code)."""
    _check_step_grad(step_grad, "uniq_activation_quantize")
    top = 2.0**bits - 1.0

    @tf.custom_gradient
    def _uniq_act(a, delta):
        s = a / delta
        index = tf.minimum(tf.floor(tf.maximum(s, 0.0) + 0.5), top)
        inside = tf.logical_and(s >= 0.0, s <= top)

        def grad(g):
            if step_grad == "official":
                features = tf.cast(tf.size(a), a.dtype)
            else:
                features = tf.cast(tf.size(a) // tf.maximum(tf.shape(a)[0], 1), a.dtype)
            scale = tf.math.rsqrt(features * top)
            d_delta = index - tf.where(inside, s, tf.zeros_like(s))
            grad_delta = tf.reduce_sum(g * d_delta) * scale
            return tf.where(inside, g, tf.zeros_like(g)), tf.reshape(grad_delta, tf.shape(delta))

        return index * delta, grad

    return _uniq_act(a, delta)


def uniq_initial_step(w, bits, reduce_axes, unbiased=True):
    """delta = k_b * std(W) per step group; a constant group (std 0) uses 2 mean|W| or 1.

    ``unbiased=True`` (default, the authors' torch ``std()``): std = sqrt(sum (w - mean)^2 / (n - 1));
    ``False``: the biased sqrt(mean (w - mean)^2). A group of one weight uses n in both."""
    k = weight_step_constant(bits)
    # computed on w / max|w| and scaled back: no overflow of the squares for huge weights (1e30)
    top = tf.reduce_max(tf.abs(w), axis=reduce_axes, keepdims=True)
    unit = tf.where(top > 0, top, tf.ones_like(top))
    std = unit * tf.math.reduce_std(w / unit, axis=reduce_axes, keepdims=True)
    if unbiased:
        n = 1
        for axis in reduce_axes:
            n *= int(w.shape[axis])
        if n > 1:
            std = std * math.sqrt(n / (n - 1.0))
    mag = unit * tf.reduce_mean(tf.abs(w / unit), axis=reduce_axes, keepdims=True)
    step = tf.where(std > 0, k * std, tf.where(mag > 0, 2.0 * mag, tf.ones_like(mag)))
    return step


# ---- Keras / larq quantizers -----------------------------------------------------------------


@register(alias="uniq")
class UniQ(LearnedScaleQuantizer):
    """UniQ weight quantizer, ``bits`` 1..8, one learnable step per tensor (``granularity="layer"``)
    or per output channel (``"channel"``; ``depthwise=True`` / ``transposed=True``, set by
    ``syq_tf.quantize``, mark DepthwiseConv2D / transposed-convolution kernels, whose output
    channels are the last two axes / axis -2). Binary (``bits=1``) gives ``+-delta/2``.

    The step starts at ``k_b * std(W)`` the first time the quantizer sees real weights (so a
    float checkpoint loaded before training is used); :func:`syq_tf.reinitialize_scales` sets it
    again from the current float weights.
    """

    SCALE_NAME = "delta"
    SCALE_CONSTRAINT = PositiveStep

    def __init__(self, bits=2, granularity="layer", depthwise=False, transposed=False, **kwargs):
        owner = owner_name("UniQ", kwargs)
        _check_bits(bits, owner)
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"{owner}: unknown granularity {granularity!r}; allowed: {GRANULARITIES}."
            )
        super().__init__(**kwargs)
        self.bits = int(bits)
        self.precision = int(bits)
        self.granularity = granularity
        self.depthwise = bool(depthwise)
        self.transposed = bool(transposed)

    def reduce_axes(self, kernel_shape):
        return subgroup_reduce_axes(
            self.granularity, kernel_shape, self.depthwise, owner=f"UniQ quantizer '{self.name}'",
            transposed=self.transposed,
        )

    def initial_scale(self, w):
        """delta = k_b * std(W) per step group."""
        return uniq_initial_step(w, self.bits, self._reduce_axes)

    def call(self, inputs):
        w = tf.convert_to_tensor(inputs)
        delta = tf.maximum(self.scale_for(w), MIN_STEP)
        return uniq_weight_quantize(w, delta, self.bits, self._reduce_axes)

    def get_config(self):
        return {
            **super().get_config(),
            "bits": self.bits,
            "granularity": self.granularity,
            "depthwise": self.depthwise,
            "transposed": self.transposed,
        }


class NotCalibratedError(RuntimeError):
    """An activation step was used before :func:`syq_tf.calibrate` set it."""


@register(alias="uniq_activation")
class UniQActivation(ActivationQuantizer):
    """UniQ unsigned activation quantizer (use after ReLU), ``bits`` 1..8, one learnable step.

    The step must be set from data before the quantizer is used: run
    ``syq_tf.calibrate(model, dataset)`` (or the ``syq_tf.Calibrate`` callback), or give
    ``initial_step`` explicitly. Using an uncalibrated step raises, in eager and in graph mode.

    ``step_grad``: "per_example" (default) scales the step gradient by 1/sqrt(F (2^b - 1)) with F the
    features of one example; "official" uses every element of the batch (the authors' code), a
    step gradient sqrt(batch) times smaller (README, Fidelity).
    """

    def __init__(self, bits=8, initial_step=None, step_grad="per_example", **kwargs):
        owner = owner_name("UniQActivation", kwargs)
        _check_bits(bits, owner)
        _check_step_grad(step_grad, owner)
        if initial_step is not None and (
            not is_real(initial_step)
            or not math.isfinite(initial_step)
            or initial_step <= 0
        ):
            raise ValueError(f"{owner}: initial_step={shown(initial_step)!r} must be a positive number or None.")
        super().__init__(**kwargs)
        self.bits = int(bits)
        self.precision = int(bits)
        self.initial_step = None if initial_step is None else float(initial_step)
        self.step_grad = step_grad
        self._set_observer(None)

    def _set_observer(self, value):
        # During calibration: a list collecting sqrt(2 E[a^2]) per batch. Set past Keras' attribute
        # tracking: it is transient state, never saved or restored with the model.
        object.__setattr__(self, "_observer", value)

    def build(self, input_shape):
        self.delta = self.add_weight(
            name="delta", shape=(), trainable=True, constraint=PositiveStep(),
            initializer=tf.keras.initializers.Constant(self.initial_step or 1.0),
        )
        self.delta_initialized = self.add_weight(
            name="delta_initialized", shape=(), dtype=tf.bool, trainable=False,
            initializer=tf.keras.initializers.Constant(self.initial_step is not None),
        )
        super().build(input_shape)

    # -- calibration (driven by syq_tf.calibrate) --
    def start_calibration(self):
        self._set_observer([])

    def cancel_calibration(self):
        self._set_observer(None)

    def finish_calibration(self):
        """Set delta = k+_b * max over batches of sqrt(2 E[a^2]). Returns the new step."""
        observed = self._observer
        self._set_observer(None)
        if not observed:
            raise NotCalibratedError(
                f"UniQActivation '{self.name}': calibration saw no inputs; is the quantizer part of "
                "the model's forward pass?"
            )
        sigma = max(observed)
        if not math.isfinite(sigma):
            raise ValueError(f"UniQActivation '{self.name}': calibration inputs contain NaN or Inf.")
        step = activation_step_constant(self.bits) * sigma if sigma > 0 else 1.0
        self.delta.assign(step)
        self.delta_initialized.assign(True)
        return step

    @property
    def calibrated(self):
        return self.built and bool(self.delta_initialized.numpy())

    def call(self, inputs):
        a = tf.convert_to_tensor(inputs)
        if getattr(self, "_observer", None) is not None:
            if not tf.executing_eagerly():
                raise RuntimeError("syq_tf.calibrate runs the model eagerly; do not trace it.")
            self._observer.append(float(tf.sqrt(2.0 * tf.reduce_mean(tf.square(a)))))
            return a  # float pass-through while calibrating
        check = tf.debugging.Assert(
            tf.convert_to_tensor(self.delta_initialized),  # a Keras 3 variable is no bool
            [f"UniQActivation '{self.name}': the activation step was never set; run "
             "syq_tf.calibrate(model, data) (or the syq_tf.Calibrate callback) before training or "
             "inference, or pass initial_step=..."],
        )
        with tf.control_dependencies([check]):
            delta = tf.maximum(self.delta, MIN_STEP)
        return uniq_activation_quantize(a, delta, self.bits, self.step_grad)

    def export_grid(self):
        """Levels {0, delta, ..., (2^b - 1) delta}: exported exactly as an int8 tensor of scale delta."""
        if not self.calibrated:
            raise NotCalibratedError(
                f"UniQActivation '{self.name}': not calibrated; run syq_tf.calibrate(model, data) "
                "before export."
            )
        return float(tf.maximum(self.delta, MIN_STEP).numpy()), 2**self.bits

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "initial_step": self.initial_step,
                "step_grad": self.step_grad}
