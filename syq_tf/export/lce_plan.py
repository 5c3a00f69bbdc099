"""Which layers target ``lce`` bit-packs, and the inference form its converter turns into
``LceBconv2d`` ops (see :mod:`syq_tf.export.lce` for the arithmetic that makes it exact)."""

import dataclasses

import numpy as np
import tensorflow as tf

from syq_tf.export.inference import Int8Input, QuantizedStandIn, build, plain_class, plain_copy, quantized_value
from syq_tf.models import layer_kernels


@dataclasses.dataclass
class InputForm:
    """How a binary input quantizer's output ``q`` is written for LCE.

    kind "sign": q = b * s, s = sign(x) (b = ``scale``, or per-sample if ``per_sample_clip``).
    kind "step": q in {0, h}: ``index(x)`` in {0, 1} computed by the quantizer's own ops, q = h index.
    """

    kind: str
    scale: float = 1.0
    per_sample_clip: float = None
    index: object = None  # callable x -> {0., 1.} tensor (kind "step")
    description: str = ""

    @property
    def filter_coefficient(self):
        """What the ±1 filter is multiplied by besides alpha: -h/2 (kind "step": the negated kernel),
        1 (per-sample scale, applied after the op) or b (kind "sign")."""
        if self.kind == "step":
            return -self.scale / 2.0
        return 1.0 if self.per_sample_clip is not None else self.scale


def _larq_sign_classes():
    import larq as lq  # noqa: PLC0415

    q = lq.quantizers
    return tuple(getattr(q, n) for n in ("SteSign", "ApproxSign", "SwishSign") if hasattr(q, n))


def binary_input(layer):
    """(InputForm, None) if the layer's input quantizer has two levels LCE can binarize exactly, else
    (None, reason)."""
    import larq as lq  # noqa: PLC0415

    from syq_tf.quantizers import DoReFaActivation, LeastSquaresActivation, UniQActivation  # noqa: PLC0415
    from syq_tf.quantizers.uniq import MIN_STEP  # noqa: PLC0415

    quantizer = getattr(layer, "input_quantizer", None)
    if quantizer is None:
        return None, "no input quantizer: float inputs (LceBconv2d needs binary inputs)"
    name = type(quantizer).__name__
    if isinstance(quantizer, _larq_sign_classes()):
        return InputForm("sign", 1.0, description=f"{name} (±1)"), None
    if isinstance(quantizer, LeastSquaresActivation):
        if quantizer.mode != "ls1":
            return None, f"input quantizer LeastSquaresActivation('{quantizer.mode}') has more than two levels"
        if quantizer.momentum is not None and bool(quantizer.moving_initialized.numpy()):
            v = float(quantizer.moving_scalars.numpy()[0])
            if not v > 0:
                return None, f"input quantizer LeastSquaresActivation('ls1') has moving scalar {v} (not > 0)"
            return InputForm("sign", v, description=f"ls1 (±{v:.6g}, moving scalar)"), None
        return InputForm("sign", per_sample_clip=quantizer.clip,
                         description="ls1 (±v per sample: output multiplied by v)"), None
    if isinstance(quantizer, DoReFaActivation):
        if quantizer.bits != 1:
            return None, f"input quantizer DoReFa({quantizer.bits}) has {2 ** quantizer.bits} levels"
        return InputForm("step", 1.0, index=lambda x: tf.floor(tf.clip_by_value(x, 0.0, 1.0) * 1.0 + 0.5),
                         description="DoReFa(1) ({0, 1})"), None
    if isinstance(quantizer, UniQActivation):
        if quantizer.bits != 1:
            return None, f"input quantizer UniQActivation({quantizer.bits}) has {2 ** quantizer.bits} levels"
        if not quantizer.calibrated:
            raise ValueError(f"to_tflite(target='lce'): layer '{layer.name}': UniQActivation is not "
                             "calibrated; run syq_tf.calibrate(model, data) before export.")
        delta = float(tf.maximum(quantizer.delta, MIN_STEP).numpy())

        def uniq_index(x, delta=delta):
            return tf.minimum(tf.floor(tf.maximum(x / delta, 0.0) + 0.5), 1.0)

        return InputForm("step", delta, index=uniq_index, description=f"UniQActivation(1) ({{0, {delta:.6g}}})"), None
    if isinstance(quantizer, lq.quantizers.SteHeaviside):
        return InputForm("step", 1.0, index=lambda x: tf.sign(tf.nn.relu(x)),
                         description="SteHeaviside ({0, 1})"), None
    if isinstance(quantizer, Int8Input):
        return None, ("int8 inputs (an 8-bit activation range, tfmot's in a quantize_model model): LceBconv2d "
                      "needs binary inputs")
    bits = getattr(quantizer, "bits", getattr(quantizer, "k_bit", None))
    extra = f" ({bits} bits)" if bits else ""
    return None, f"input quantizer {name}{extra} is not a binary quantizer LCE can binarize"


def binary_kernel(layer):
    """(signs ±1 [kh, kw, c_in, c_out], alpha [c_out], Keras kernel Q) if the layer is a Conv2D
    whose quantized kernel is ±alpha_c per output channel, else (None, None, reason)."""
    dense = plain_class(layer) is tf.keras.layers.Dense
    if dense and len(layer.input_shape) != 2:
        return None, None, (f"Dense layer on a rank-{len(layer.input_shape)} input: only a Dense on a flat "
                            "[batch, features] input becomes a 1x1 LceBconv2d")
    if not dense and plain_class(layer) is not tf.keras.layers.Conv2D:
        kind = plain_class(layer).__name__
        return None, None, f"{kind} layer: LCE bit-packs Conv2D (and flat Dense as a 1x1 conv) only"
    config = layer.get_config()
    if config.get("groups", 1) != 1:
        return None, None, f"grouped convolution (groups={config['groups']}): LceBconv2d has no groups"
    if config.get("data_format", "channels_last") != "channels_last":
        return None, None, "data_format channels_first: LCE takes channels_last"
    kernels = layer_kernels(layer)
    if "kernel" not in kernels or kernels["kernel"][0] is None:
        return None, None, "float kernel (no kernel quantizer)"
    quantizer, variable = kernels["kernel"]
    q = np.asarray(quantized_value(quantizer, variable), np.float32)
    if dense:  # [in, out] -> the 1x1 conv kernel [1, 1, in, out]
        q = q.reshape((1, 1) + q.shape)
    mags = np.abs(q).reshape(-1, q.shape[-1])
    zeros = int(np.count_nonzero(mags == 0))
    granularity = getattr(quantizer, "granularity", None)
    levels = max(np.unique(q[..., c]).size for c in range(q.shape[-1]))
    if zeros and levels <= 3:
        return None, None, (f"kernel has {zeros} zero weights (ternary or pruned codebook): LceBconv2d "
                            "holds ±1 only")
    mixed = [c for c in range(q.shape[-1]) if np.unique(mags[:, c]).size > 1]
    if mixed:
        why = (f"granularity '{granularity}': one scale per {granularity}, so up to {levels} values per "
               "output channel" if granularity in ("pixel", "row") else f"{levels} values per output channel")
        return None, None, f"{why}; LCE's multiplier is one scale per output channel"
    alpha = mags[0].astype(np.float32)
    signs = np.where(q > 0, 1.0, -1.0).astype(np.float32)
    return signs, alpha, q


@dataclasses.dataclass
class LayerPlan:
    layer: object
    signs: np.ndarray = None
    alpha: np.ndarray = None
    keras_kernel: np.ndarray = None
    form: InputForm = None
    pad_values: int = 0
    reason: str = ""

    @property
    def packable(self):
        return self.form is not None


def _pad_value(layer):
    pad = getattr(layer, "pad_values", 0.0)
    try:
        return float(pad)
    except (TypeError, ValueError):
        return float(tf.keras.backend.get_value(pad))


def plan_layers(model):
    """A :class:`LayerPlan` per layer with a kernel (packable or with the reason it is not)."""
    plans = []
    for layer in model.layers:
        if not layer_kernels(layer) and getattr(layer, "kernel", None) is None:
            continue
        signs, alpha, q = binary_kernel(layer)
        if signs is None:
            plans.append(LayerPlan(layer, reason=q))
            continue
        form, reason = binary_input(layer)
        if form is None:
            plans.append(LayerPlan(layer, keras_kernel=q, reason=reason))
            continue
        pad = _pad_value(layer)
        pad_values = 0
        if layer.get_config().get("padding") == "same":
            if form.kind == "step":
                if pad != 0.0:
                    plans.append(LayerPlan(layer, keras_kernel=q, reason=(
                        f"pad_values={pad:g} with a {{0, h}} input quantizer has no exact LCE padding")))
                    continue
                pad_values = 1
            elif pad == 0.0:
                pad_values = 0
            elif pad == 1.0 and form.per_sample_clip is None and form.scale == 1.0:
                pad_values = 1
            else:
                plans.append(LayerPlan(layer, keras_kernel=q, reason=(
                    f"pad_values={pad:g}: LCE pads binary inputs with 0 or +1 only")))
                continue
        plans.append(LayerPlan(layer, signs, alpha, q, form, pad_values))
    return plans


# ---- the inference form -------------------------------------------------------------------------


# LCE's converter keeps a conv float when a channel's filter magnitude is <= float32's epsilon
# (1.2e-7: a dead channel, e.g. a UniQ step at its floor); such channels get a ±1 filter and their
# magnitude as a per-channel MUL after the conv, which the converter folds into the multiplier.
TINY_MAGNITUDE = 1e-6


class _LceBinaryConv2D(tf.keras.layers.Layer):
    """Inference form of a packable layer: binarize (sign form LCE recognises), optional explicit
    +1 padding, plain Conv2D with a ±scale kernel (± 1 and a MUL for channels of a tiny scale,
    :data:`TINY_MAGNITUDE`), per-sample scale, bias, activation."""

    def __init__(self, plan, conv_config, pad_values, bias, activation, **kwargs):
        super().__init__(**kwargs)
        self.plan = plan
        self.form = plan.form
        coef = plan.form.filter_coefficient
        magnitude = plan.alpha.astype(np.float64) * abs(coef)  # per output channel
        tiny = magnitude <= TINY_MAGNITUDE
        self._filter_scale = np.where(tiny, 1.0, magnitude) * np.sign(coef)  # the kernel: signs x this
        self._rescale = np.where(tiny, magnitude, 1.0).astype(np.float32) if tiny.any() else None
        self.explicit_pad = pad_values == 1 and conv_config["padding"] == "same"
        self.conv = tf.keras.layers.Conv2D(
            filters=conv_config["filters"], kernel_size=conv_config["kernel_size"],
            strides=conv_config["strides"], dilation_rate=conv_config["dilation_rate"],
            padding="valid" if self.explicit_pad else conv_config["padding"], use_bias=False,
            name="binary_conv")
        self._bias_value = None if bias is None else np.asarray(bias, np.float32)
        self.activation = tf.keras.activations.get(activation)

    def build(self, input_shape):
        self.conv.build(input_shape)
        if self._bias_value is not None:
            self.bias = self.add_weight(name="bias", shape=self._bias_value.shape, initializer="zeros",
                                        trainable=False)
        super().build(input_shape)

    def transfer(self, old):
        """The ±scale kernel (signs x alpha x the input form's coefficient) and the bias."""
        self.conv.kernel.assign((self.plan.signs * self._filter_scale).astype(np.float32))
        if self._bias_value is not None:
            self.bias.assign(self._bias_value)

    def _same_pads(self, size, k, stride, dilation):
        k_eff = (k - 1) * dilation + 1
        out = -(-size // stride)
        total = max((out - 1) * stride + k_eff - size, 0)
        return [total // 2, total - total // 2]

    def call(self, x):
        form = self.form
        if form.kind == "sign":
            s = tf.where(x >= 0, 1.0, -1.0)
        else:  # t = +1 where the quantizer gives 0, -1 where it gives h
            s = tf.where(0.5 - form.index(x) >= 0, 1.0, -1.0)
        if self.explicit_pad:
            k, st, dl = self.conv.kernel_size, self.conv.strides, self.conv.dilation_rate
            pads = [[0, 0], self._same_pads(int(x.shape[1]), k[0], st[0], dl[0]),
                    self._same_pads(int(x.shape[2]), k[1], st[1], dl[1]), [0, 0]]
            s = tf.pad(s, pads, constant_values=1.0)
        y = self.conv(s)
        if self._rescale is not None:
            y = y * self._rescale
        if form.per_sample_clip is not None:
            flat = tf.reshape(x, [tf.shape(x)[0], -1])
            v = tf.reduce_mean(tf.abs(tf.clip_by_value(flat, -form.per_sample_clip, form.per_sample_clip)),
                               axis=-1)
            y = y * v[:, None, None, None]
        if self._bias_value is not None:
            y = y + self.bias
        return self.activation(y)


class _LceBinaryDense(_LceBinaryConv2D):
    """Inference form of a packable Dense layer on [batch, features]: a 1x1 binary conv on the input
    reshaped to [batch, 1, 1, features] (LCE has no binary fully-connected op)."""

    def __init__(self, plan, units, bias, activation, **kwargs):
        conv = dict(filters=units, kernel_size=(1, 1), strides=(1, 1), dilation_rate=(1, 1), padding="valid")
        super().__init__(plan, conv, 0, bias, activation, **kwargs)

    def build(self, input_shape):
        super().build((input_shape[0], 1, 1, input_shape[-1]))

    def call(self, x):
        y = super().call(tf.reshape(x, [-1, 1, 1, x.shape[-1]]))
        return tf.reshape(y, [-1, self.conv.filters])


def _input_forward(layer):
    """A float forward pass of the layer's input quantizer for the LCE graph (None if none)."""
    from syq_tf.quantizers import DoReFaActivation, UniQActivation  # noqa: PLC0415
    from syq_tf.quantizers.activations import dorefa_quantize  # noqa: PLC0415
    from syq_tf.quantizers.uniq import MIN_STEP, uniq_activation_quantize  # noqa: PLC0415

    quantizer = getattr(layer, "input_quantizer", None)
    if quantizer is None:
        return None
    if isinstance(quantizer, DoReFaActivation):
        bits = quantizer.bits
        return lambda x: dorefa_quantize(x, bits)
    if isinstance(quantizer, UniQActivation):
        if not quantizer.calibrated:
            raise ValueError(f"to_tflite(target='lce'): layer '{layer.name}': UniQActivation is not "
                             "calibrated; run syq_tf.calibrate(model, data) before export.")
        delta, bits = float(tf.maximum(quantizer.delta, MIN_STEP).numpy()), quantizer.bits
        return lambda x: uniq_activation_quantize(x, tf.constant(delta), bits)
    return quantizer


def _stand_in(plan, layer):
    """The LCE inference form of one quantized layer: the binary stand-in of a packable layer, else
    the plain layer behind its input quantizer's float forward pass."""
    if plan is not None and plan.packable:
        config = layer.get_config()
        bias = None
        if config.get("use_bias", False):
            bias = np.asarray(layer.bias.numpy(), np.float64)
        if plan.form.kind == "step":  # conv(q, W) = h/2 sum(W_c) + conv_pad1(t, -h/2 W)
            extra = plan.form.scale / 2.0 * plan.keras_kernel.astype(np.float64).sum(axis=(0, 1, 2))
            bias = extra if bias is None else bias + extra
        if "units" in config:  # flat Dense: a 1x1 conv
            return _LceBinaryDense(plan, config["units"], bias, config.get("activation"), name=layer.name)
        return _LceBinaryConv2D(plan, config, plan.pad_values, bias, config.get("activation"), name=layer.name)
    inner = plain_copy(layer, owner="to_tflite(target='lce')")
    return QuantizedStandIn(inner, _input_forward(layer), name=layer.name)


def inference_model(model, plans):
    """A plain Keras model in the form LCE's converter turns into LceBconv2d ops for the packable
    layers (and float ops for the rest), built by :func:`syq_tf.export.inference.build`."""
    by_name = {p.layer.name: p for p in plans}
    return build(model, stand_in=lambda layer: _stand_in(by_name.get(layer.name), layer))
