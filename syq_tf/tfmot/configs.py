"""tfmot ``QuantizeConfig``s: a syq_tf weight quantizer on a layer's kernel and / or an activation
quantizer on its output, one config per method, and the scope that deserializes them."""

import tensorflow as tf

from syq_tf.layers import TRANSPOSED
from syq_tf.quantizers import (
    SYQ,
    DoReFaActivation,
    LeastSquares,
    LeastSquaresActivation,
    LossAware,
    UniQ,
    UniQActivation,
)
from syq_tf.tfmot.adapter import TfmotQuantizer, as_tfmot, kernel_attr, register, tq

@register
class QuantizeConfig(tq.QuantizeConfig):
    """Kernel quantized by ``weight_quantizer``, output by ``output_quantizer`` (either may be None).

    Works for Conv1D/Conv2D/DepthwiseConv2D/Dense and Conv1DTranspose/Conv2DTranspose (the kernel
    attribute is found from the layer; a transposed convolution's quantizer gets ``transposed=True``,
    so per-channel scales run along its output channels, the kernel's axis -2).
    A layer's own ``activation`` is left as it is; to quantize after an activation function, put the
    activation in its own layer with an :class:`ActivationConfig`.

    ``output_8bit=True`` (without an ``output_quantizer``): the output (after the layer's activation
    function) gets tfmot's default 8-bit range (a moving-average ``MovingAverageQuantizer`` on the
    activation, as tfmot's own kernel configs; none where tfmot's layout transforms fused a following
    BatchNormalization, which then carries the range). ``quantize_model`` sets it on kernel layers whose output no following layer
    quantizes (a projection shortcut read by an Add): int8 TFLite stores that tensor on an 8-bit
    range anyway, and Keras must compute with the same rounding.
    """

    def __init__(self, weight_quantizer=None, output_quantizer=None, output_8bit=False):
        self.weight_quantizer = as_tfmot(weight_quantizer, "QuantizeConfig weight_quantizer")
        self.output_quantizer = as_tfmot(output_quantizer, "QuantizeConfig output_quantizer")
        self.output_8bit = bool(output_8bit) and self.output_quantizer is None
        if self.weight_quantizer is not None and self.weight_quantizer.role != "weight":
            raise ValueError(
                f"QuantizeConfig: weight_quantizer {type(self.weight_quantizer.quantizer).__name__} "
                "quantizes activations; pass it as output_quantizer."
            )
        if self.output_quantizer is not None and self.output_quantizer.role != "activation":
            raise ValueError(
                f"QuantizeConfig: output_quantizer {type(self.output_quantizer.quantizer).__name__} "
                "quantizes weights; pass it as weight_quantizer."
            )

    def _attr(self, layer):
        attr = kernel_attr(layer)
        if attr is None:
            raise ValueError(
                f"{type(self).__name__}: layer '{layer.name}' ({type(layer).__name__}) has no kernel to "
                "quantize; supported: Conv1D, Conv2D, DepthwiseConv2D, Dense, Conv1DTranspose, Conv2DTranspose "
                "(ActivationConfig quantizes only outputs)."
            )
        return attr

    def get_weights_and_quantizers(self, layer):
        if self.weight_quantizer is None:
            return []
        attr = self._attr(layer)
        kernel = getattr(layer, attr)
        self.weight_quantizer.variable = kernel
        # Kernels whose output channels are not the last axis: DepthwiseConv2D (the last two),
        # Conv1D/2DTranspose (axis -2); quantizers with per-channel scales take a flag for them.
        config = self.weight_quantizer.quantizer.get_config()
        kinds = (("depthwise", tf.keras.layers.DepthwiseConv2D), ("transposed", TRANSPOSED))
        flags = {flag: True for flag, kind in kinds if isinstance(layer, kind) and flag in config}
        if flags:
            self.weight_quantizer.quantizer = type(self.weight_quantizer.quantizer).from_config({**config, **flags})
        return [(kernel, self.weight_quantizer)]

    def get_activations_and_quantizers(self, layer):
        if not self.output_8bit:
            return []
        # as tfmot's own kernel configs: the range is on the layer's activation, which tfmot's layout
        # transforms replace by its NoOpActivation (no range) where a BatchNormalization follows
        return [(layer.activation, tq.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                                                        narrow_range=False))]

    def set_quantize_weights(self, layer, quantize_weights):
        if self.weight_quantizer is not None:
            setattr(layer, self._attr(layer), quantize_weights[0])

    def set_quantize_activations(self, layer, quantize_activations):
        if self.output_8bit:
            layer.activation = quantize_activations[0]

    def get_output_quantizers(self, layer):
        return [self.output_quantizer] if self.output_quantizer is not None else []

    def quantizers(self):
        return [q for q in (self.weight_quantizer, self.output_quantizer) if q is not None]

    def get_config(self):
        config = {
            "weight_quantizer": None if self.weight_quantizer is None else self.weight_quantizer.get_config(),
            "output_quantizer": None if self.output_quantizer is None else self.output_quantizer.get_config(),
        }
        if self.output_8bit:  # only when set: configs saved before the flag existed compare equal
            config["output_8bit"] = True
        return config

    @classmethod
    def from_config(cls, config):
        quantizers = dict(config)
        for key in ("weight_quantizer", "output_quantizer"):
            if isinstance(quantizers.get(key), dict) and "quantizer" in quantizers[key]:
                quantizers[key] = TfmotQuantizer(**quantizers[key])
        # The saved form is the built quantizers, whatever the subclass's own constructor arguments
        # were (SYQConfig(bits=...), ...): restore them through the generic constructor.
        restored = cls.__new__(cls)
        QuantizeConfig.__init__(restored, **quantizers)
        return restored

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


def _output(activation_bits):
    """The paper's activation quantizer for a bit width (None: no output quantizer)."""
    return None if activation_bits is None else DoReFaActivation(activation_bits)


@register
class SYQConfig(QuantizeConfig):
    """SYQ kernel (``bits``, ``granularity``, ``eta``), optional DoReFa output of ``activation_bits``."""

    def __init__(self, bits=2, granularity="layer", eta=0.05, activation_bits=None):
        super().__init__(SYQ(bits, granularity, eta), _output(activation_bits))


@register
class UniQConfig(QuantizeConfig):
    """UniQ kernel (``bits``, ``granularity``), optional UniQActivation output of ``activation_bits``
    (calibrate it with :func:`syq_tf.calibrate`)."""

    def __init__(self, bits=4, granularity="channel", activation_bits=None):
        out = None if activation_bits is None else UniQActivation(activation_bits)
        super().__init__(UniQ(bits, granularity), out)


@register
class LeastSquaresConfig(QuantizeConfig):
    """Least-squares kernel (``mode``), optional least-squares activation output (``activation_mode``)."""

    def __init__(self, mode="ls1", granularity="channel", activation_mode=None):
        out = None if activation_mode is None else LeastSquaresActivation(activation_mode)
        super().__init__(LeastSquares(mode, granularity), out)


@register
class LossAwareConfig(QuantizeConfig):
    """Loss-aware kernel (``mode``, ``bits``; train with :class:`syq_tf.LossAwareAdam`), optional
    DoReFa output of ``activation_bits``."""

    def __init__(self, mode="binary", bits=None, granularity="layer", activation_bits=None):
        super().__init__(LossAware(mode, bits=bits, granularity=granularity), _output(activation_bits))


@register
class ActivationConfig(QuantizeConfig):
    """Only the layer's output, quantized by ``quantizer`` (DoReFaActivation, UniQActivation, ...)."""

    def __init__(self, quantizer=None):
        super().__init__(None, quantizer)


def custom_objects():
    """syq_tf's tfmot classes and quantizers, for ``quantize_scope`` / ``load_model``."""
    classes = [TfmotQuantizer, QuantizeConfig, SYQConfig, UniQConfig, LeastSquaresConfig, LossAwareConfig,
               ActivationConfig]
    return {cls.__name__: cls for cls in classes}


def quantize_scope(*extra):
    """tfmot's ``quantize_scope`` with syq_tf's classes (and any ``extra`` dicts of custom objects)."""
    objects = custom_objects()
    for e in extra:
        objects.update(e)
    return tq.quantize_scope(objects)
