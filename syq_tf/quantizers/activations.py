"""Activation quantizers.

DoReFa (used with SYQ, METHODS.md §1):
    a_q = round(clip(a, 0, 1) * n) / n,   n = 2^k - 1
    da  = g inside [0, 1], 0 outside       (straight-through)
Rounding is half-up (floor(x + 0.5)), as TFLite rounds non-negative values, so an 8-bit DoReFa
activation is bit-identical to an int8 tensor with range [0, 1] after export.
"""

import tensorflow as tf

from syq_tf.quantizers._common import ActivationQuantizer, is_int, owner_name, register, shown


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
            owner = owner_name("DoReFa", kwargs)
            raise ValueError(
                f"{owner}: bits={shown(bits)!r} is not supported; allowed: "
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


def range_quantize(x, low, high, bits=8):
    """Asymmetric ``bits``-bit fake quantization on ``[low, high]`` (TensorFlow's FakeQuant: the range
    nudged so that 0 is a level, round half away from zero, the int8 arithmetic of TFLite), with a
    straight-through gradient inside the range."""
    return tf.quantization.fake_quant_with_min_max_vars(x, low, high, num_bits=bits, narrow_range=False)


@register(alias="syq_moving_average")
class MovingAverageActivation(ActivationQuantizer):
    """``bits``-bit activations on a range learned from data, the 8-bit activations of tfmot's default
    scheme: in training, the range ``[min(0, batch min), max(0, batch max)]`` of the first batch, then
    an exponential moving average (``momentum``) of the batch ranges; in inference the stored range.
    Exported as the int8 range of the tensor (:meth:`export_range`), which TFLite computes with
    exactly (8 bits). ``syq_tf.keras3.quantize_model`` puts it on the inputs of the 8-bit first and
    last layers and, with ``a8`` schemes, of every quantized layer."""

    def __init__(self, bits=8, momentum=0.999, **kwargs):
        owner = owner_name("MovingAverageActivation", kwargs)
        if not is_int(bits) or not 2 <= bits <= 8:
            raise ValueError(f"{owner}: bits={bits!r} is not supported; allowed: integers 2 to 8.")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"{owner}: momentum={momentum!r} must be a number in [0, 1).")
        super().__init__(**kwargs)
        self.bits = int(bits)
        self.precision = int(bits)
        self.momentum = float(momentum)
        self._set_observer(None)

    def _set_observer(self, value):
        # During calibration: a list of (min, max) per batch; transient, never saved.
        object.__setattr__(self, "_observer", value)

    # -- calibration (driven by syq_tf.calibrate): the range starts from the data's
    def start_calibration(self):
        self._set_observer([])

    def cancel_calibration(self):
        self._set_observer(None)

    def finish_calibration(self):
        """Set the range to [min(0, data min), max(0, data max)] over the calibration batches."""
        observed, owner = self._observer, f"MovingAverageActivation '{self.name}'"
        self._set_observer(None)
        if not observed:
            raise ValueError(f"{owner}: calibration saw no inputs; is the quantizer part of the forward pass?")
        low, high = min(0.0, min(lo for lo, _ in observed)), max(0.0, max(hi for _, hi in observed))
        self.low.assign(low)
        self.high.assign(high)
        self.range_initialized.assign(True)
        return high - low

    @property
    def calibrated(self):
        return self.built and bool(tf.convert_to_tensor(self.range_initialized).numpy())

    def exact_in_int8(self):
        return self.bits == 8  # an 8-bit range is an int8 tensor's scale and zero point

    def build(self, input_shape):
        self.low = self.add_weight(name="low", shape=(), initializer="zeros", trainable=False)
        self.high = self.add_weight(name="high", shape=(), initializer="zeros", trainable=False)
        self.range_initialized = self.add_weight(name="range_initialized", shape=(), dtype=tf.bool,
                                                 initializer="zeros", trainable=False)
        super().build(input_shape)

    def call(self, inputs, training=None):
        x = tf.convert_to_tensor(inputs)
        if getattr(self, "_observer", None) is not None:
            if not tf.executing_eagerly():
                raise RuntimeError("syq_tf.calibrate runs the model eagerly; do not trace it.")
            self._observer.append((float(tf.reduce_min(x)), float(tf.reduce_max(x))))
            return x  # float pass-through while calibrating
        if training:
            batch_low = tf.minimum(tf.reduce_min(x), 0.0)
            batch_high = tf.maximum(tf.reduce_max(x), 0.0)
            ready = tf.convert_to_tensor(self.range_initialized)
            m = self.momentum
            low = tf.where(ready, m * self.low + (1.0 - m) * batch_low, batch_low)
            high = tf.where(ready, m * self.high + (1.0 - m) * batch_high, batch_high)
            updates = [self.low.assign(low), self.high.assign(high), self.range_initialized.assign(True)]
            with tf.control_dependencies(updates):
                return range_quantize(x, tf.identity(low), tf.identity(high), self.bits)
        check = tf.debugging.Assert(
            tf.convert_to_tensor(self.range_initialized),
            [f"MovingAverageActivation '{self.name}': no range yet; train the model (or run it with "
             "training=True on data) before inference."])
        with tf.control_dependencies([check]):
            return range_quantize(x, tf.convert_to_tensor(self.low), tf.convert_to_tensor(self.high), self.bits)

    def export_range(self):
        if not self.calibrated:
            raise ValueError(f"MovingAverageActivation '{self.name}': no range yet; train the model before export.")
        return float(self.low.numpy()), float(self.high.numpy())

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "momentum": self.momentum}
