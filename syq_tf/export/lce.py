"""larq-compute-engine export (``to_tflite(..., target="lce")``): binary layers as bit-packed
``LceBconv2d`` ops, run and verified with LCE's own interpreter.

A Conv2D -- or a Dense on a flat ``[batch, features]`` input, exported as a 1x1 conv on
``[batch, 1, 1, features]`` (LCE has no binary fully-connected op) -- whose quantized kernel is
``±alpha_c`` per output channel (SYQ ``bits=1`` with granularity ``layer`` / ``channel``, UniQ
``bits=1``, least-squares ``ls1``, loss-aware ``binary``, larq ``ste_sign`` ...) and whose input
quantizer has two levels becomes an
``LceBconv2d``: the filter's signs bit-packed 32 input channels per int32 word (bit ``i`` of word
``w`` is input channel ``32 w + i``, set for -1, the last word zero-padded), ``alpha_c`` folded into
the op's per-output-channel float multiplier.

The export first builds an inference model in the form LCE's converter recognises: the input
quantizer becomes ``tf.where(. >= 0, 1., -1.)`` (LceQuantize), the kernel a ``±scale`` constant of
a plain Conv2D. Results are exact, not just close:

* sign inputs ``±b`` (larq ste_sign / approx_sign / swish_sign: ``b = 1``; ``LeastSquaresActivation
  ("ls1")`` with trained moving scalars: ``b = v``) -- ``b`` goes into the multiplier; Keras pads
  the quantized input with zeros, which is LCE's ``pad_values=0`` (``pad_values=1`` for larq layers
  built with ``pad_values=1``).
* per-sample sign inputs ``v_n sign(x)`` (``LeastSquaresActivation("ls1")`` without moving
  scalars, ``v_n`` the per-sample mean |clip(x)|): a per-sample scale cannot be folded into a
  per-channel multiplier, so the LceBconv2d output is multiplied by ``v_n``, computed in float by
  the same ops (then the bias is added).
* ``{0, h}`` inputs (``DoReFa(1)``: h = 1, ``UniQActivation(1)``: h = delta, larq
  ``ste_heaviside``): with ``t = +1`` where the input quantizes to 0 and ``-1`` where to ``h``,
  ``q = h (1 - t) / 2`` and, because the zero padding of ``q`` is ``t = +1`` (LCE's
  ``pad_values=1``), ``conv(q, W) = h/2 sum(W_c) + conv_pad1(t, -h/2 W)``: a Bconv2d with the
  negated kernel and a per-channel bias.

Quantized layers LCE cannot pack (pixel / row scales, ternary or multi-bit kernels, Dense on
rank > 2 inputs, depthwise, non-binary or float inputs) are reported with the reason and, with ``weights="int8"``
(the default), their weights are stored as int8 -- symmetric, one scale per output channel -- and
turned into the float weight by a DEQUANTIZE op that TFLite runs once when the interpreter is
prepared; the op itself computes in float. A codebook whose levels are integer multiples k of one
step per channel (binary, ternary, UniQ, 2-bit least squares, LAQ ...) is stored as k*m with scale
step/m, m = 127 // max|k|: exact. Other codebooks (SYQ ``pixel`` / ``row`` scales: up to one
magnitude per kernel pixel in a channel) are rounded to the nearest of 255 levels and reported
inexact, with a warning naming the layer (``require_exact=True`` raises; ``weights="float32"``
keeps them float32, which holds every codebook exactly). Activations stay float: LCE's converter
has no post-training int8 calibration (it only quantizes graphs that carry FakeQuant ranges on
every tensor), and int8-rounded inputs to a binary layer flip signs near zero, which compounds
through a binary network. Layers without a quantizer stay float32. Stock LiteRT cannot run the
LceQuantize / LceBconv2d custom ops; LCE's interpreter
(``larq_compute_engine.testing.Interpreter``) can.
"""

import dataclasses
import json
import math
import os
import warnings

import numpy as np
import tensorflow as tf

from syq_tf.export import ExportResult, flatbuffer
from syq_tf.export.litert import (
    _QUANT_KEYS,
    integer_unit,
    _describe,
    _find_layer,
    _is_quantized,
    _leaf,
    _match_tensor,
    _plain_class,
    _quantized_value,
    _samples,
    _to_tflite_layout,
)
from syq_tf.export.runtime import agreement
from syq_tf.files import write_all
from syq_tf.models import layer_kernels

BCONV_OP = "LceBconv2d"
QUANTIZE_OP = "LceQuantize"
WORD_BITS = 32
_FLOAT_BYTES = 4


# ---- bit packing (LCE's filter layout, in numpy) ------------------------------------------------


def pack_signs(kernel):
    """Bit-pack the signs of a Keras Conv2D kernel ``[kh, kw, c_in, c_out]`` (values ±x, x > 0) the
    way LceBconv2d stores its filter: int32 ``[c_out, kh, kw, ceil(c_in / 32)]``, bit ``i`` of word
    ``w`` set when input channel ``32 w + i`` is negative; channels past ``c_in`` are zero bits."""
    k = np.asarray(kernel)
    if k.ndim != 4:
        raise ValueError(f"pack_signs: expected a Conv2D kernel [kh, kw, c_in, c_out], got shape {k.shape}")
    if np.any(k == 0) or not np.all(np.isfinite(k)):
        raise ValueError("pack_signs: the kernel has zero or non-finite values; only ±x kernels pack")
    neg = np.transpose(k < 0, (3, 0, 1, 2))  # [c_out, kh, kw, c_in]
    c_in = neg.shape[-1]
    words = -(-c_in // WORD_BITS)
    bits = np.zeros(neg.shape[:-1] + (words * WORD_BITS,), np.uint8)
    bits[..., :c_in] = neg
    packed = np.packbits(bits.reshape(*neg.shape[:-1], words, 4, 8), axis=-1, bitorder="little")
    return packed.reshape(*neg.shape[:-1], words * 4).view("<i4").reshape(*neg.shape[:-1], words)


def unpack_signs(words, c_in):
    """Inverse of :func:`pack_signs`: the ±1 kernel ``[kh, kw, c_in, c_out]`` (float32). Raises if
    the padding bits past ``c_in`` are not zero or the words cannot hold ``c_in`` channels."""
    w = np.ascontiguousarray(np.asarray(words).astype("<i4"))
    if w.ndim != 4 or w.shape[-1] * WORD_BITS < c_in or (w.shape[-1] - 1) * WORD_BITS >= c_in:
        raise ValueError(f"unpack_signs: words of shape {w.shape} do not hold {c_in} input channels")
    bits = np.unpackbits(w.view(np.uint8).reshape(*w.shape, 4), axis=-1, bitorder="little")
    bits = bits.reshape(*w.shape[:-1], -1)
    if bits[..., c_in:].any():
        raise ValueError("unpack_signs: padding bits past the last input channel are set")
    signs = np.where(bits[..., :c_in] == 1, -1.0, 1.0).astype(np.float32)
    return np.transpose(signs, (1, 2, 3, 0))


# ---- which layers pack ----------------------------------------------------------------------------


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
    bits = getattr(quantizer, "bits", getattr(quantizer, "k_bit", None))
    extra = f" ({bits} bits)" if bits else ""
    return None, f"input quantizer {name}{extra} is not a binary quantizer LCE can binarize"


def binary_kernel(layer):
    """(signs ±1 [kh, kw, c_in, c_out], alpha [c_out], Keras kernel Q) if the layer is a Conv2D
    whose quantized kernel is ±alpha_c per output channel, else (None, None, reason)."""
    dense = _plain_class(layer) is tf.keras.layers.Dense
    if dense and len(layer.input_shape) != 2:
        return None, None, (f"Dense layer on a rank-{len(layer.input_shape)} input: only a Dense on a flat "
                            "[batch, features] input becomes a 1x1 LceBconv2d")
    if not dense and _plain_class(layer) is not tf.keras.layers.Conv2D:
        kind = _plain_class(layer).__name__
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
    q = np.asarray(_quantized_value(quantizer, variable), np.float32)
    if dense:  # [in, out] -> the 1x1 conv kernel [1, 1, in, out]
        q = q.reshape((1, 1) + q.shape)
    mags = np.abs(q).reshape(-1, q.shape[-1])
    zeros = int(np.count_nonzero(mags == 0))
    granularity = getattr(quantizer, "granularity", None)
    if zeros:
        return None, None, (f"kernel has {zeros} zero weights (ternary or pruned codebook): LceBconv2d "
                            "holds ±1 only")
    levels = max(np.unique(q[..., c]).size for c in range(q.shape[-1]))
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


# ---- the inference model --------------------------------------------------------------------------


class _LceBinaryConv2D(tf.keras.layers.Layer):
    """Inference form of a packable layer: binarize (sign form LCE recognises), optional explicit
    +1 padding, plain Conv2D with a ±scale kernel, per-sample scale, bias, activation."""

    def __init__(self, conv_config, form, pad_values, bias, activation, **kwargs):
        super().__init__(**kwargs)
        self.form = form
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

    def __init__(self, units, form, bias, activation, **kwargs):
        conv = dict(filters=units, kernel_size=(1, 1), strides=(1, 1), dilation_rate=(1, 1), padding="valid")
        super().__init__(conv, form, 0, bias, activation, **kwargs)

    def build(self, input_shape):
        super().build((input_shape[0], 1, 1, input_shape[-1]))

    def call(self, x):
        y = super().call(tf.reshape(x, [-1, 1, 1, x.shape[-1]]))
        return tf.reshape(y, [-1, self.conv.filters])


class _FloatInputLayer(tf.keras.layers.Layer):
    """A non-packed quantized layer in float: its input quantizer's forward pass, then the plain
    layer holding the quantized kernel."""

    def __init__(self, inner, quantizer, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.quantizer = quantizer

    def call(self, x):
        if self.quantizer is not None:
            x = self.quantizer(x)
        return self.inner(x)


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


def build_lce_model(model, plans):
    """A plain Keras model in the form LCE's converter turns into LceBconv2d ops for the packable
    layers (and float ops for the rest)."""
    by_name = {p.layer.name: p for p in plans}
    made = {}

    def clone(layer):
        plan = by_name.get(layer.name)
        if plan is not None and plan.packable:
            config = layer.get_config()
            bias = None
            if config.get("use_bias", False):
                bias = np.asarray(layer.bias.numpy(), np.float64)
            if plan.form.kind == "step":  # conv(q, W) = h/2 sum(W_c) + conv_pad1(t, -h/2 W)
                extra = plan.form.scale / 2.0 * plan.keras_kernel.astype(np.float64).sum(axis=(0, 1, 2))
                bias = extra if bias is None else bias + extra
            if "units" in config:  # flat Dense: a 1x1 conv
                new = _LceBinaryDense(config["units"], plan.form, bias, config.get("activation"), name=layer.name)
            else:
                new = _LceBinaryConv2D(config, plan.form, plan.pad_values, bias, config.get("activation"),
                                       name=layer.name)
            made[layer.name] = ("binary", plan)
            return new
        if _is_quantized(layer):
            config = {k: v for k, v in layer.get_config().items() if k not in _QUANT_KEYS}
            pad = config.pop("pad_values", 0.0)
            if pad not in (0, 0.0):
                raise ValueError(f"to_tflite(target='lce'): layer '{layer.name}': pad_values={pad} is "
                                 "only supported on layers LCE packs; use pad_values=0.")
            config["name"] = f"{layer.name}_float"
            inner = _plain_class(layer).from_config(config)
            made[layer.name] = ("float", layer)
            return _FloatInputLayer(inner, _input_forward(layer), name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    inference = tf.keras.models.clone_model(model, clone_function=clone)
    for new in inference.layers:
        old = _find_layer(model, new.name)
        if old is None or not old.weights:
            continue
        kind = made.get(new.name, (None, None))[0]
        if kind == "binary":
            plan = made[new.name][1]
            form = plan.form
            coef = (-form.scale / 2.0) if form.kind == "step" else (
                1.0 if form.per_sample_clip is not None else form.scale)
            kernel = plan.signs * (plan.alpha.astype(np.float64) * coef)
            new.conv.kernel.assign(kernel.astype(np.float32))
            if new._bias_value is not None:
                new.bias.assign(new._bias_value)
        elif kind == "float":
            values = {_leaf(v.name): v.numpy() for v in old.weights}
            for _attr, (quantizer, variable) in layer_kernels(old).items():
                values[_leaf(variable.name)] = _quantized_value(quantizer, variable)
            for variable in new.inner.weights:
                variable.assign(values[_leaf(variable.name)])
        else:
            new.set_weights(old.get_weights())
    return inference


# ---- reading the LCE flatbuffer -------------------------------------------------------------------


@dataclasses.dataclass
class Bconv:
    op_index: int
    options: dict
    filter: np.ndarray  # int32 [c_out, kh, kw, words]
    multiplier: np.ndarray
    bias: np.ndarray
    thresholds: np.ndarray = None  # int32 output thresholds when the op writes binary outputs


def bconv_ops(buffer):
    """The LceBconv2d ops of the first subgraph, in execution order, with their constant tensors."""
    from flatbuffers import flexbuffers  # noqa: PLC0415

    model = flatbuffer._load(buffer)
    graph = model.subgraphs[0]

    def const(index, dtype):
        if index < 0:
            return None
        tensor = graph.tensors[index]
        data = model.buffers[tensor.buffer].data
        if data is None:
            return None
        return np.frombuffer(bytes(bytearray(data)), dtype).reshape(tuple(tensor.shape))

    found = []
    for i, op in enumerate(graph.operators):
        if flatbuffer._op_name(model, op) != BCONV_OP:
            continue
        options = dict(flexbuffers.Loads(bytes(bytearray(op.customOptions)))) if op.customOptions is not None else {}
        inputs = [int(t) for t in op.inputs] + [-1] * 5
        found.append(Bconv(i, options, const(inputs[1], "<i4"), const(inputs[2], "<f4"), const(inputs[3], "<f4"),
                           const(inputs[4], "<i4")))
    return found


# ---- report ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class LceLayerReport:
    layer: str
    op: str  # LceBconv2d, or the float op it became
    quantizer: str  # kernel quantizer ("float" for float kernels)
    input_quantizer: str
    packed: bool
    bits: int  # the codebook's bits (the quantizer's ``bits``, else ceil(log2(levels)); 32 for float)
    keras_levels: int  # distinct kernel values per output channel in Keras (max over channels)
    stored_levels: int  # distinct stored values per output channel
    max_rel_alpha_error: float  # packed: multiplier vs alpha (x folded BatchNorm); float: stored vs Keras
    exact: bool
    weights: int
    weight_bytes: int  # packed filter words (packed) / float32 kernel (not packed), as stored
    scale_bytes: int  # LceBconv2d float multiplier (0 for float layers)
    bias_bytes: int  # LceBconv2d float bias (holds the layer's bias and any folded BatchNorm shift)
    stored_bytes: int  # weight_bytes + scale_bytes
    min_bytes: int  # ceil(bits x weights / 8) + 4 x scales (float32 scales)
    pad_values: int = -1
    note: str = ""
    storage: str = ""  # "packed 1-bit (LceBconv2d int32 words)", "int8" (DEQUANTIZE) or "float32"
    scales: int = 0  # float scales the codebook needs (quantizer variables, else distinct magnitudes)
    tensor_index: int = -1  # the stored weight tensor (not packed layers) in the flatbuffer


def _codebook_bits(quantizer, kernel):
    bits = getattr(quantizer, "bits", None)
    if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool) and bits > 0:
        return int(bits)
    k = np.asarray(kernel).reshape(-1, np.shape(kernel)[-1])
    levels = max(np.unique(k[:, c]).size for c in range(k.shape[1]))
    return max(1, math.ceil(math.log2(max(levels, 1))))


def _codebook_scales(quantizer, kernel):
    """The quantizer's float variables (SYQ alpha, UniQ delta, LossAware alpha), else the distinct
    non-zero magnitudes of the Keras kernel (closed-form codebooks: one scale each)."""
    sizes = [int(np.prod(v.shape)) for v in getattr(quantizer, "weights", []) if v.dtype.is_floating]
    if sizes:
        return sum(sizes)
    k = np.abs(np.asarray(kernel))
    return int(np.unique(k[k != 0]).size)


def _weight_axis(op):
    """The output-channel axis of a stored weight tensor (TFLite layout)."""
    return 3 if op == "DEPTHWISE_CONV_2D" else 0


def _float_tensor_check(expected, tensor):
    """(max relative error, zeros kept, stored levels, keras levels) of a float weight tensor, per
    output channel up to one factor (a converter-folded BatchNorm scale)."""
    values = tensor.values.astype(np.float64)
    axis = _weight_axis(tensor.op)
    worst, zeros_ok, levels, keras_levels = 0.0, True, 0, 0
    for c in range(values.shape[axis]):
        stored, keras = np.take(values, c, axis=axis).ravel(), np.take(expected, c, axis=axis).ravel()
        levels, keras_levels = max(levels, np.unique(stored).size), max(keras_levels, np.unique(keras).size)
        zeros_ok &= bool(np.array_equal(stored == 0, keras == 0))
        nz = keras != 0
        if not nz.any():
            continue
        ref = int(np.argmax(np.abs(keras)))
        factor = stored[ref] / keras[ref]
        if factor == 0:
            worst = 1.0
            continue
        worst = max(worst, float(np.max(np.abs(stored[nz] / factor - keras[nz]) / np.abs(keras[nz]))))
    return worst, zeros_ok, levels, keras_levels


def _bn_scale_after(model, layer):
    """Per-channel scale of a BatchNormalization right after ``layer`` (the converter folds it into
    the LceBconv2d multiplier), or None."""
    nodes = getattr(layer, "_outbound_nodes", [])
    if len(nodes) != 1:
        return None
    nxt = nodes[0].outbound_layer
    if not isinstance(nxt, tf.keras.layers.BatchNormalization):
        return None
    gamma = nxt.gamma.numpy() if nxt.scale else 1.0
    return np.asarray(gamma / np.sqrt(nxt.moving_variance.numpy() + nxt.epsilon), np.float64)


def _packed_report(model, plan, bconv):
    layer = plan.layer
    quantizer = layer_kernels(layer)["kernel"][0]
    kh, kw, c_in, c_out = plan.signs.shape
    n = int(plan.signs.size)
    note, exact, err = [], True, float("nan")
    words = bconv.filter
    expected_words = pack_signs(plan.signs * (-1.0 if plan.form.kind == "step" else 1.0))
    if words is None or words.shape != expected_words.shape:
        exact = False
        note.append(f"packed filter of shape {None if words is None else words.shape}, expected "
                    f"{expected_words.shape}")
    else:
        try:
            signs = unpack_signs(words, c_in)
        except ValueError as err_:
            signs, exact = None, False
            note.append(str(err_))
        flip = -1.0 if plan.form.kind == "step" else 1.0
        if signs is not None and not np.array_equal(signs * flip, plan.signs):
            exact = False
            note.append("packed signs differ from the Keras kernel's signs")
    if bconv.options.get("channels_in") != c_in:
        exact = False
        note.append(f"channels_in {bconv.options.get('channels_in')} != {c_in}")
    form = plan.form
    scale = form.scale / 2.0 if form.kind == "step" else (1.0 if form.per_sample_clip is not None else form.scale)
    expected = plan.alpha.astype(np.float64) * scale
    mult = None if bconv.multiplier is None else bconv.multiplier.astype(np.float64).ravel()
    if mult is None and bconv.thresholds is not None and bconv.thresholds.size == c_out:
        note.append("binary output: the next layer's sign is fused into the op, so alpha and the ops "
                    "in between are folded into int32 per-channel output thresholds (checked: signs)")
    elif mult is None or mult.size != c_out:
        exact = False
        note.append("multiplier not found")
    else:
        err = float(np.max(np.abs(mult - expected) / expected))
        if err > 1e-5:
            bn = _bn_scale_after(model, layer)
            err_bn = float("inf") if bn is None else float(np.max(np.abs(mult - expected * bn) / np.abs(expected * bn)))
            if err_bn <= 1e-5:
                err = err_bn
                note.append("multiplier = alpha x the following BatchNorm's scale (folded)")
            else:  # the converter folded more than a BatchNorm (e.g. the next quantizer's 1/step)
                err = float("nan")
                note.append("multiplier = alpha x a per-channel factor the converter folded in from the ops "
                            "that follow (checked: signs)")
    if form.per_sample_clip is not None:
        note.append("output multiplied by the per-sample ls1 scale v (float MUL)")
    if c_in % WORD_BITS:
        note.append(f"{c_in} input channels padded to {words.shape[-1] * WORD_BITS} bits per pixel")
    n_scales = _codebook_scales(quantizer, plan.keras_kernel)
    filt_bytes = 0 if words is None else int(words.nbytes)
    scale_bytes = _FLOAT_BYTES * int(mult.size) if mult is not None else (
        0 if bconv.thresholds is None else int(bconv.thresholds.nbytes))
    bias_bytes = 0 if bconv.bias is None else int(bconv.bias.nbytes)
    levels = max(np.unique(plan.keras_kernel[..., c]).size for c in range(c_out))
    return LceLayerReport(
        layer=layer.name, op=BCONV_OP, quantizer=_describe(quantizer), input_quantizer=form.description,
        packed=True, bits=1, keras_levels=levels, stored_levels=2, max_rel_alpha_error=err, exact=exact,
        weights=n, weight_bytes=filt_bytes, scale_bytes=scale_bytes, bias_bytes=bias_bytes,
        stored_bytes=filt_bytes + scale_bytes, min_bytes=math.ceil(n / 8) + _FLOAT_BYTES * n_scales,
        pad_values=int(bconv.options.get("pad_values", -1)), note="; ".join(note),
        storage="packed 1-bit (LceBconv2d int32 words)", scales=n_scales)


def _dequantized(tensor):
    """The float weights an INT8 tensor stands for (values x per-channel scale)."""
    values = tensor.values.astype(np.float64)
    scales = tensor.scales.astype(np.float64)
    if scales.size > 1:
        shape = [1] * values.ndim
        shape[tensor.quantized_dimension] = scales.size
        scales = scales.reshape(shape)
    return values * scales


def _float_report(plan, tensors, used):
    layer = plan.layer
    kernels = layer_kernels(layer) if _is_quantized(layer) else {"kernel": (None, layer.kernel)}
    quantizer, variable = kernels.get("kernel", next(iter(kernels.values())))
    n = int(np.prod(variable.shape))
    tensor = _match_tensor(layer, variable, tensors, used)
    in_q = getattr(layer, "input_quantizer", None)
    in_desc = "-" if in_q is None else type(in_q).__name__
    if tensor is None:
        return LceLayerReport(layer.name, "?", _describe(quantizer), in_desc, False, 32, 0, 0, float("nan"),
                              False, n, 0, 0, 0, 0, 0,
                              note=f"not packed: {plan.reason}; weight tensor not found in the flatbuffer")
    used.add(id(tensor))
    expected = _to_tflite_layout(_quantized_value(quantizer, variable), tensor.op, tensor.values.shape)
    int8 = tensor.dequantized
    if int8:
        check = dataclasses.replace(tensor, values=_dequantized(tensor))
        kept = ("stored int8, one scale per output channel, dequantized to float when the interpreter "
                "prepares (the op computes in float)")
        scale_bytes = _FLOAT_BYTES * int(tensor.scales.size)
    else:
        check = tensor
        kept = "kept float32"
        scale_bytes = 0
    err, zeros_ok, levels, keras_levels = _float_tensor_check(expected, check)
    exact = zeros_ok and err <= 1e-5 if quantizer is not None else False
    folded = not np.allclose(check.values.astype(np.float64), expected, rtol=1e-6, atol=0)
    note = f"not packed: {plan.reason}; {kept}"
    if quantizer is not None and folded and exact:
        note += ("; stored = Keras kernel x a per-channel factor the converter folded in (a BatchNorm "
                 "scale or the input quantizer's 1/n)")
    if quantizer is not None and int8 and not exact:
        note += (f"; int8 rounds this codebook (max relative error of a level {err:.2g}): it has no "
                 "integer form per channel (weights='float32' keeps it exact)")
    nbytes = int(tensor.stored_bytes)
    if quantizer is None:
        bits, scales, minimum = 32, 0, nbytes + scale_bytes
    else:
        bits, scales = _codebook_bits(quantizer, expected), _codebook_scales(quantizer, expected)
        minimum = math.ceil(bits * n / 8) + _FLOAT_BYTES * scales
    return LceLayerReport(
        layer=layer.name, op=tensor.op, quantizer=_describe(quantizer), input_quantizer=in_desc, packed=False,
        bits=bits, keras_levels=keras_levels, stored_levels=levels,
        max_rel_alpha_error=err if quantizer is not None else float("nan"), exact=exact, weights=n,
        weight_bytes=nbytes, scale_bytes=scale_bytes, bias_bytes=0, stored_bytes=nbytes + scale_bytes,
        min_bytes=minimum, note=note, storage=tensor.dtype.lower(), scales=scales,
        tensor_index=tensor.tensor_index)


def int8_codebook(values, axis):
    """Symmetric int8 per channel (along ``axis``) of float weights: ``(int8 values, float32 scales,
    exact)``. Where a channel's levels are integer multiples k of one step u (|k| <= 127), it stores
    k*m with scale u/m (m = 127 // max|k|), so int8 x scale gives the levels back to float32
    rounding; otherwise scale max|w|/127 and rounding (``exact`` False)."""
    values = np.asarray(values, np.float64)
    moved = np.moveaxis(values, axis, 0)
    out, scales, exact = np.zeros(moved.shape, np.int8), [], True
    for c in range(moved.shape[0]):
        w = moved[c]
        top = float(np.max(np.abs(w)))
        if top == 0:
            scales.append(1.0)
            continue
        unit = integer_unit(w.ravel())
        if unit is not None:
            k = np.round(w / unit)
            m = 127 // int(np.max(np.abs(k)))
            q, scale = k * m, np.float32(unit / m)
            back = q * np.float64(scale)
            if np.max(np.abs(back - w) / top) > 1e-6:  # the unit was too coarse for float32: round
                unit = None
        if unit is None:
            scale = np.float32(top / 127.0)
            q = np.clip(np.round(w / np.float64(scale)), -127, 127)
            exact = exact and np.array_equal(q * np.float64(scale), w)
        out[c] = q.astype(np.int8)
        scales.append(float(scale))
    return np.moveaxis(out, 0, axis), np.asarray(scales, np.float32), exact


def store_int8(buffer, reports):
    """The flatbuffer with the float weights of the not-packed quantized layers stored as int8
    (:func:`int8_codebook`, :func:`syq_tf.export.flatbuffer.dequantize_weights`)."""
    tensors = {t.tensor_index: t for t in flatbuffer.weight_tensors(buffer)}
    updates = {}
    for r in reports:
        if r.packed or r.quantizer == "float" or r.tensor_index not in tensors:
            continue
        tensor = tensors[r.tensor_index]
        if tensor.dtype != "FLOAT32":
            continue
        axis = _weight_axis(tensor.op)
        values, scales, _ = int8_codebook(tensor.values, axis)
        updates[tensor.tensor_index] = (values, scales, axis)
    return flatbuffer.dequantize_weights(buffer, updates) if updates else buffer


def layer_reports(model, plans, buffer):
    """Match the packable layers with the LceBconv2d ops (in order) and the others with their float
    weight tensors; an :class:`LceLayerReport` per layer with a kernel."""
    bconvs = bconv_ops(buffer)
    floats = [t for t in flatbuffer.weight_tensors(buffer)
              if t.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    reports, used, queue = [], set(), list(bconvs)
    for plan in plans:
        if plan.packable:
            shape = (plan.signs.shape[3], plan.signs.shape[0], plan.signs.shape[1],
                     -(-plan.signs.shape[2] // WORD_BITS))
            match = next((b for b in queue if b.filter is not None and b.filter.shape == shape), None)
            if match is not None:
                queue.remove(match)
                reports.append(_packed_report(model, plan, match))
                continue
            plan.reason = "LCE's converter did not turn it into LceBconv2d"
        reports.append(_float_report(plan, floats, used))
    return reports


# ---- running with LCE's interpreter ----------------------------------------------------------------


def lce_predict(buffer, x):
    """Outputs of LCE's interpreter (reference kernels on x86), one example at a time."""
    from larq_compute_engine import testing  # noqa: PLC0415

    interpreter = testing.Interpreter(bytes(buffer), num_threads=1)
    x = np.asarray(x, np.float32)
    if len(x) == 0:
        raise ValueError("lce_predict: no examples")
    return np.asarray(interpreter.predict(x))


# ---- the result -------------------------------------------------------------------------------------


class LceExportResult(ExportResult):
    """:class:`ExportResult` of target ``lce``; ``layers`` are :class:`LceLayerReport` rows."""

    def __init__(self, buffer, layers, notes, ops, verification=None, weights="int8"):
        super().__init__(bytes(buffer), "lce", layers, notes, verification, weights)
        self.ops = ops

    def totals(self):
        packed = [r for r in self.layers if r.packed]
        return {
            "packed_layers": [r.layer for r in packed],
            "not_packed_layers": {r.layer: r.note for r in self.layers if not r.packed},
            "packed_weight_bytes": sum(r.weight_bytes for r in packed),
            "packed_weight_min_bytes": sum(math.ceil(r.weights / 8) for r in packed),
            "packed_stored_bytes": sum(r.stored_bytes for r in packed),
            "packed_min_bytes": sum(r.min_bytes for r in packed),
            "packed_bias_bytes": sum(r.bias_bytes for r in packed),
            "int8_layers": [r.layer for r in self.layers if r.storage == "int8"],
            "float32_layers": [r.layer for r in self.layers if not r.packed and r.storage == "float32"],
        }

    def to_dict(self):
        d = {
            "target": self.target,
            "weights": self.weights,
            "model_bytes": self.model_bytes,
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "notes": list(self.notes),
            "verification": self.verification,
        }
        d["lce"] = {**self.totals(), "ops": self.ops,
                    "runtime": "larq_compute_engine.testing.Interpreter (stock LiteRT cannot run LCE ops)"}
        return d

    def save(self, path):
        """Write ``path`` (.tflite) and its report (``path`` + ``.json``); both are generated before
        anything is written, each goes to a temporary name first and is renamed."""
        path = os.fspath(path)
        report = json.dumps(self.to_dict(), indent=2).encode()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_all([(path, bytes(self.flatbuffer)), (path + ".json", report)])
        return path

    def table(self):
        wl = max([10] + [len(r.layer) + 2 for r in self.layers])
        wq = max([12] + [len(r.quantizer) + 2 for r in self.layers])
        head = (f"{'layer':<{wl}}{'op':<18}{'quantizer':<{wq}}{'stored':>8}{'bits':>5}{'levels':>7}{'exact':>7}"
                f"{'weights':>9}{'weight B':>10}{'scale B':>9}{'bias B':>8}{'stored B':>10}{'minimum B':>11}")
        rows = [head, "-" * len(head)]
        for r in self.layers:
            is_float = r.quantizer == "float"
            exact = "-" if is_float else ("yes" if r.exact else "NO")
            stored = "1-bit" if r.packed else r.storage
            rows.append(f"{r.layer:<{wl}}{r.op:<18}{r.quantizer:<{wq}}{stored:>8}{r.bits:>5}{r.stored_levels:>7}{exact:>7}"
                        f"{r.weights:>9}{r.weight_bytes:>10}{r.scale_bytes:>9}{r.bias_bytes:>8}"
                        f"{r.stored_bytes:>10}{r.min_bytes:>11}")
        for r in self.layers:
            if r.note:
                rows.append(f"  {r.layer}: {r.note}")
        t = self.totals()
        if t["packed_layers"]:
            over = t["packed_stored_bytes"] / max(t["packed_min_bytes"], 1) - 1
            rows.append(f"packed layers: {t['packed_stored_bytes']} bytes stored (filters "
                        f"{t['packed_weight_bytes']} + multipliers) vs minimum {t['packed_min_bytes']} "
                        f"({over:+.1%}); biases {t['packed_bias_bytes']} bytes")
        rows.append(f"model: {self.model_bytes} bytes (lce; ops: {', '.join(self.ops)})")
        rows.extend(f"note: {n}" for n in self.notes)
        if self.verification:
            rows.append("verification (LCE interpreter vs Keras): " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.verification.items()))
        return "\n".join(rows)


# ---- export -----------------------------------------------------------------------------------------


def check_model(model):
    """Refuse what this target cannot export before converting (clear errors naming the layers)."""
    from syq_tf import tfmot as _tfmot  # noqa: PLC0415

    if not isinstance(model, tf.keras.Model):
        raise ValueError(f"to_tflite(target='lce'): expected a tf.keras Model, got {type(model).__name__}")
    wrapped = [layer.name for layer in model.layers if _tfmot.is_wrapper(layer)]
    if wrapped:
        raise ValueError(f"to_tflite(target='lce'): layers {wrapped} are tfmot QAT wrappers; target 'lce' "
                         "exports syq_tf / larq quantized layers. Use target='litert' for tfmot models.")
    recurrent = [layer.name for layer in model.layers if isinstance(layer, tf.keras.layers.RNN)]
    if recurrent:
        raise ValueError(f"to_tflite(target='lce'): layers {recurrent} are recurrent; LCE packs binary "
                         "Conv2D layers only. Use target='litert' for recurrent models.")
    nested = [layer.name for layer in model.layers if isinstance(layer, tf.keras.Model)]
    if nested:
        raise ValueError(f"to_tflite(target='lce'): layers {nested} are nested models; flatten the model "
                         "first.")


def export(model, representative_data, verify_data=None, verify_labels=None, require_exact=False,
           verify_samples=32, weights="int8"):
    """The ``target="lce"`` export (see the module docstring). Raises ValueError naming every layer
    with a kernel and its reason when no layer can be packed (an LCE model with nothing bit-packed is
    only a float model: use target 'litert'). ``weights``: how quantized layers that are not packed
    store their weights, ``"int8"`` (default) or ``"float32"``. Verifies with LCE's interpreter on
    ``verify_data``, else on up to ``verify_samples`` representative examples."""
    if weights not in ("int8", "float32"):
        raise ValueError(f"to_tflite(target='lce'): weights={weights!r}; allowed: 'int8' (default: quantized "
                         "layers LCE cannot pack store int8 weights) or 'float32'.")
    check_model(model)
    plans = plan_layers(model)
    packable = [p for p in plans if p.packable]
    if not packable:
        detail = "; ".join(f"'{p.layer.name}': {p.reason}" for p in plans) or "the model has no kernel layers"
        raise ValueError(
            "to_tflite(target='lce'): no layer can be bit-packed into LceBconv2d (LCE needs a Conv2D "
            "with a ±alpha-per-output-channel kernel and a binary input quantizer): " + detail
        )
    inference = build_lce_model(model, plans)
    import larq_compute_engine as lce  # noqa: PLC0415

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            buffer = bytes(lce.convert_keras_model(inference))
        except Exception as err:
            raise RuntimeError(f"to_tflite(target='lce'): LCE's converter failed: {err}") from err
    reports = layer_reports(model, plans, buffer)
    if weights == "int8":
        buffer = store_int8(buffer, reports)
        reports = layer_reports(model, plans, buffer)  # read back from what was written
    notes = [f"layer '{r.layer}': {r.note}" for r in reports if not r.packed and r.quantizer != "float"]
    fallback = [str(w.message) for w in caught if "falling back" in str(w.message)]
    if fallback:
        notes.append("LCE converter: " + fallback[0])
    lost = [r.layer for r in reports if not r.packed and r.layer in {p.layer.name for p in packable}]
    if lost:
        warnings.warn(f"to_tflite(target='lce'): layers {lost} were expected to become LceBconv2d but "
                      "LCE's converter kept them float", stacklevel=3)
    inexact = [r for r in reports if r.quantizer != "float" and not r.exact]
    if require_exact and inexact:
        raise ValueError("to_tflite(target='lce', require_exact=True): these layers are not stored exactly: "
                         + "; ".join(f"'{r.layer}' ({r.quantizer}): {r.note}" for r in inexact))
    rounded = [r.layer for r in inexact if r.storage == "int8"]
    if rounded:
        warnings.warn(f"to_tflite(target='lce'): the int8 weights of layers {rounded} round their codebooks "
                      "(no integer form per output channel); pass weights='float32' to keep them exact",
                      stacklevel=3)
    ops = sorted(set(flatbuffer.op_names(buffer)))
    result = LceExportResult(buffer, reports, notes, ops, weights=weights)
    if verify_data is not None:
        x, on = np.asarray(verify_data), "verify_data"
    else:
        x, on = np.concatenate(_samples(representative_data, verify_samples) or [np.zeros((0,))]), \
            "representative_data"
        verify_labels = None
    if len(x):
        x = x.astype(np.float32)
        keras_out = model.predict(x, batch_size=256, verbose=0)
        runtime_out = lce_predict(buffer, x)
        result.verification = {"data": on, **agreement(keras_out.reshape(len(x), -1),
                                                        runtime_out.reshape(len(x), -1), verify_labels)}
    return result
