"""Full-integer int8 TFLite export for LiteRT, keeping learned codebooks exact where int8 can.

Converting the training graph as it is fails at run time (quantizer ops and scale variables give
int8 convolutions with non-zero weight zero points, METHODS.md §5). So export first builds an
inference model: each quantized layer becomes its plain Keras layer with the *quantized* kernel as
its weights, and each activation quantizer becomes a FakeQuant op carrying its exact range, which
the converter turns into the int8 scale/zero point of that tensor. Then it converts, reads the
flatbuffer back and checks what was stored against the Keras codebook.
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from syq_tf.export import flatbuffer
from syq_tf.layers import QuantizedLayerMixin
from syq_tf.models import layer_kernels
from syq_tf.quantizers._common import ActivationQuantizer

# Config keys of larq / syq_tf layers that the plain Keras layer does not take.
_QUANT_KEYS = ("kernel_quantizer", "input_quantizer", "recurrent_quantizer", "depthwise_quantizer",
               "pointwise_quantizer", "metrics")


class _FakeQuantInput(tf.keras.layers.Layer):
    """Inference stand-in for an activation quantizer: an int8 range for the converter, and an
    optional upper clip. With range [0, 255 step] the int8 tensor's scale is the quantizer's step,
    so TFLite itself rounds to the quantizer's levels; the clip at the top level (a MINIMUM op)
    and the int8 floor at 0 give its clipping."""

    def __init__(self, low, high, top=None, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high = float(low), float(high)
        self.top = None if top is None else float(top)

    def call(self, inputs):
        if self.top is not None:
            inputs = tf.minimum(inputs, self.top)
        return tf.quantization.fake_quant_with_min_max_args(
            inputs, min=self.low, max=self.high, num_bits=8, narrow_range=False
        )


class _ExportLayer(tf.keras.layers.Layer):
    """A plain Keras layer (holding the quantized kernel) behind an optional input range."""

    def __init__(self, inner, input_range=None, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.input_fq = None if input_range is None else _FakeQuantInput(*input_range, name="input_range")

    def call(self, inputs):
        if self.input_fq is not None:
            inputs = self.input_fq(inputs)
        return self.inner(inputs)


def _is_quantized(layer):
    if isinstance(layer, QuantizedLayerMixin):
        return True
    return any(q is not None for q, _ in layer_kernels(layer).values()) or (
        getattr(layer, "input_quantizer", None) is not None
    )


def _plain_class(layer):
    for cls in type(layer).__mro__:
        if issubclass(cls, QuantizedLayerMixin) or cls.__module__.startswith("larq"):
            continue
        return cls
    raise TypeError(f"layer '{layer.name}': cannot find the plain Keras class of {type(layer).__name__}")


def _input_range(layer):
    """(low, high, top) of the int8 stand-in for the layer's input quantizer, or None."""
    quantizer = getattr(layer, "input_quantizer", None)
    if quantizer is None:
        return None
    if not isinstance(quantizer, ActivationQuantizer):
        raise ValueError(
            f"layer '{layer.name}': input quantizer {type(quantizer).__name__} has no int8 TFLite "
            "form in target 'litert'; use a syq_tf activation quantizer (e.g. DoReFa) or no input "
            "quantizer."
        )
    grid = quantizer.export_grid()
    if grid is None:
        return (*quantizer.export_range(), None)
    step, levels = grid
    top = (levels - 1) * step
    return 0.0, 255.0 * step, (top if levels < 256 else None)


def _quantized_value(quantizer, variable):
    if quantizer is None:
        return variable.numpy()
    return tf.convert_to_tensor(quantizer(tf.convert_to_tensor(variable))).numpy()


def _leaf(name):
    return name.split("/")[-1]


def build_inference_model(model, batch_size=None):
    """A plain Keras model that computes what ``model`` computes at inference, ready to convert
    (``batch_size``: fix the batch dimension of the inputs, which fused recurrent ops need)."""
    plan = {}

    def clone(layer):
        if not _is_quantized(layer):
            return layer.__class__.from_config(layer.get_config())
        config = {k: v for k, v in layer.get_config().items() if k not in _QUANT_KEYS}
        pad = config.pop("pad_values", 0.0)
        if pad not in (0, 0.0):
            raise ValueError(
                f"layer '{layer.name}': pad_values={pad} has no TFLite int8 form; use pad_values=0."
            )
        config["name"] = f"{layer.name}_float"
        inner = _plain_class(layer).from_config(config)
        plan[layer.name] = layer
        return _ExportLayer(inner, _input_range(layer), name=layer.name)

    inputs = None
    if batch_size is not None:
        inputs = [tf.keras.Input(batch_shape=(batch_size, *t.shape[1:]), dtype=t.dtype) for t in model.inputs]
        inputs = inputs[0] if len(inputs) == 1 else inputs
    inference = tf.keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)
    for new in inference.layers:
        old = _find_layer(model, new.name)
        if old is None or not old.weights:
            continue
        if new.name not in plan:
            new.set_weights(old.get_weights())
            continue
        values = {_leaf(v.name): v.numpy() for v in old.weights}
        for attr, (quantizer, variable) in layer_kernels(old).items():
            values[_leaf(variable.name)] = _quantized_value(quantizer, variable)
        for variable in new.inner.weights:
            variable.assign(values[_leaf(variable.name)])
    return inference


def _find_layer(model, name):
    try:
        return model.get_layer(name)
    except ValueError:
        return None


def _samples(data, limit):
    """Single-example float32 batches from an array, a tuple (x, y) or a tf.data.Dataset."""
    if isinstance(data, tf.data.Dataset):
        out = []
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for row in np.asarray(x):
                out.append(row[None].astype(np.float32))
                if len(out) >= limit:
                    return out
        return out
    if isinstance(data, (tuple, list)):
        data = data[0]
    array = np.asarray(data, dtype=np.float32)
    return [array[i : i + 1] for i in range(min(limit, len(array)))]


def convert(inference_model, representative_data, samples=200):
    """Full-integer int8 conversion (int8 inputs and outputs)."""
    reps = _samples(representative_data, samples)
    if not reps:
        raise ValueError("to_tflite: representative_data is empty; give a few hundred input examples.")

    def representative():
        for sample in reps:
            yield [sample]

    converter = tf.lite.TFLiteConverter.from_keras_model(inference_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def recurrent_layers(model):
    """The recurrent layers of ``model``, checked for the fused-LSTM export (clear error otherwise)."""
    found = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.RNN)]
    for layer in found:
        kind = type(layer).__name__
        if not isinstance(layer, tf.keras.layers.LSTM):
            raise ValueError(
                f"to_tflite: layer '{layer.name}' ({kind}) cannot be exported yet: TFLite turns GRU and "
                "SimpleRNN layers into a WHILE loop whose weights syq_tf cannot check, and its int8 "
                "calibration crashes on GRU; recurrent models export with LSTM layers (fused "
                "UNIDIRECTIONAL_SEQUENCE_LSTM)."
            )
        if layer.unroll or layer.stateful or layer.go_backwards:
            raise ValueError(
                f"to_tflite: layer '{layer.name}' ({kind}) has unroll/stateful/go_backwards set; only "
                "the default LSTM (unroll=False, stateful=False, go_backwards=False) converts to the fused "
                "TFLite LSTM op."
            )
    if found:
        for layer in model.layers:
            if getattr(layer, "input_quantizer", None) is not None:
                raise ValueError(
                    f"to_tflite: layer '{layer.name}' has an input (activation) quantizer, but a model with "
                    f"recurrent layers ({', '.join(repr(r.name) for r in found)}) is exported with int8 "
                    "weights and float activations (TFLite's int8 fused LSTM is not usable); remove the "
                    "activation quantizers of recurrent models."
                )
    return found


def convert_dynamic(inference_model):
    """Dynamic-range conversion: int8 weights (exact codebooks rewritten afterwards), float
    activations; the LSTM stays one fused UNIDIRECTIONAL_SEQUENCE_LSTM op."""
    converter = tf.lite.TFLiteConverter.from_keras_model(inference_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


# ---- what was stored vs what Keras computes ---------------------------------------------------


def _to_tflite_layout(kernel, op, stored_shape, part=None):
    k = np.asarray(kernel, np.float64)
    if op == "UNIDIRECTIONAL_SEQUENCE_LSTM":  # [in, 4 units] -> gate `part` as [units, in]
        units = k.shape[-1] // 4
        return k[:, part * units : (part + 1) * units].T.reshape(stored_shape)
    if op == "FULLY_CONNECTED":
        k = k.reshape(-1, k.shape[-1]).T  # [in, out] -> [out, in]
    elif op == "DEPTHWISE_CONV_2D":
        k = k.reshape((1,) + k.shape[:-2] + (-1,))  # [kh, kw, cin, m] -> [1, kh, kw, cin*m]
    else:  # CONV_2D: [.., cin, cout] -> [cout, .., cin]
        if k.ndim == 3:  # Conv1D is converted as a 1xk Conv2D
            k = k[None]
        k = np.transpose(k, (3, 0, 1, 2))
    return k.reshape(stored_shape)


def codebook_check(expected, tensor):
    """Compare a stored int8 tensor with the Keras quantized kernel (in TFLite layout).

    Per quantization group (channel, or the whole tensor if quantized per tensor), the stored
    values must be the Keras values times one factor (the int8 scale, times a folded BatchNorm
    scale). Returns the largest relative error of a stored codebook level, whether zeros stayed
    zeros, and the number of distinct stored levels per group.
    """
    values = tensor.values.astype(np.float64)
    axis = tensor.quantized_dimension if tensor.scales.size > 1 else None
    if axis is None:
        groups = [(values.ravel(), expected.ravel())]
    else:
        groups = [
            (np.take(values, c, axis=axis).ravel(), np.take(expected, c, axis=axis).ravel())
            for c in range(values.shape[axis])
        ]
    worst, zeros_ok, levels, keras_levels = 0.0, True, 0, 0
    for stored, keras in groups:
        levels = max(levels, np.unique(stored).size)
        keras_levels = max(keras_levels, np.unique(keras).size)
        zeros_ok &= bool(np.array_equal(stored == 0, keras == 0))
        ref = int(np.argmax(np.abs(keras)))
        if keras[ref] == 0:
            continue
        factor = stored[ref] / keras[ref]
        nonzero = keras != 0
        if factor == 0:
            worst = max(worst, 1.0)
            continue
        rel = np.abs(stored[nonzero] / factor - keras[nonzero]) / np.abs(keras[nonzero])
        worst = max(worst, float(rel.max(initial=0.0)))
    return worst, zeros_ok, levels, keras_levels


def _describe(quantizer):
    if quantizer is None:
        return "float"
    cfg = quantizer.get_config() if hasattr(quantizer, "get_config") else {}
    parts = [type(quantizer).__name__ if hasattr(quantizer, "get_config") else getattr(quantizer, "__name__", "?")]
    for key in ("mode", "bits", "granularity"):
        if cfg.get(key) is not None:
            parts.append(f"{key}={cfg[key]}")
    return " ".join(parts)


def _match_tensor(layer, kernel, tensors, used):
    """The stored weight tensor of a Keras kernel: by layer name in the tensor name, else (when the
    converter renamed it, e.g. after folding a BatchNorm) the next unused one of the same size.
    Weight ops are stored in execution order, which follows the model's layer order."""
    size = int(np.prod(kernel.shape))
    free = [t for t in tensors if id(t) not in used and t.values.size == size]
    for t in free:
        if f"/{layer.name}/" in f"/{t.name}/":
            return t
    return free[0] if free else None


@dataclasses.dataclass
class KernelMatch:
    """One stored weight tensor of a Keras kernel (a fused LSTM stores each kernel as 4 gates)."""

    layer: object
    quantizer: object  # None for a float kernel
    variable: object  # the float kernel variable
    tensor: object  # flatbuffer.WeightTensor, or None if not found
    part: int = None  # LSTM gate (0..3: i, f, c, o), None for single-tensor kernels

    def expected(self):
        """The Keras quantized kernel (this part of it) in the stored tensor's layout."""
        return _to_tflite_layout(_quantized_value(self.quantizer, self.variable), self.tensor.op,
                                 self.tensor.values.shape, self.part)


def _lstm_matches(layer, kernels, tensors, used):
    ops = sorted({t.op_index for t in tensors if t.op == "UNIDIRECTIONAL_SEQUENCE_LSTM"
                  and id(t) not in used})
    if not ops:
        return [KernelMatch(layer, q, v, None) for q, v in kernels.values()]
    by_position = {t.position: t for t in tensors if t.op_index == ops[0]}
    out = []
    for first, name in ((1, "kernel"), (5, "recurrent_kernel")):
        quantizer, variable = kernels[name]
        for part in range(4):
            tensor = by_position.get(first + part)
            if tensor is not None:
                used.add(id(tensor))
            out.append(KernelMatch(layer, quantizer, variable, tensor, part))
    return out


def kernel_matches(model, buffer):
    """A :class:`KernelMatch` per stored weight tensor of every kernel of the model."""
    tensors = flatbuffer.weight_tensors(buffer)
    used, out = set(), []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.LSTM):
            kernels = layer_kernels(layer) if _is_quantized(layer) else {
                "kernel": (None, layer.cell.kernel), "recurrent_kernel": (None, layer.cell.recurrent_kernel)}
            out.extend(_lstm_matches(layer, kernels, tensors, used))
            continue
        if _is_quantized(layer):
            kernels = layer_kernels(layer)
        elif getattr(layer, "kernel", None) is not None:
            kernels = {"kernel": (None, layer.kernel)}
        else:
            kernels = {}
        single = [t for t in tensors if t.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
        for quantizer, variable in kernels.values():
            tensor = _match_tensor(layer, variable, single, used)
            if tensor is not None:
                used.add(id(tensor))
            out.append(KernelMatch(layer, quantizer, variable, tensor))
    return out


def _groups(values, tensor):
    axis = tensor.quantized_dimension if tensor.scales.size > 1 else None
    if axis is None:
        return [values.reshape(-1)], None
    return [np.take(values, c, axis=axis).reshape(-1) for c in range(values.shape[axis])], axis


def integer_unit(levels, max_int=127, max_divisor=16):
    """The largest u such that every level is an integer multiple k*u with |k| <= max_int
    (u = smallest |level| / d for the smallest d = 1..max_divisor that works), or None."""
    mags = np.unique(np.abs(levels[levels != 0]))
    if mags.size == 0:
        return None
    for d in range(1, max_divisor + 1):
        unit = mags[0] / d
        ints = mags / unit
        whole = np.round(ints)
        # float32 levels i*delta carry ~1e-7 relative error; allow a few times that, no more
        if whole.max() <= max_int and np.all(np.abs(ints - whole) <= 1e-6 * (1.0 + whole)):
            return unit
    return None


def exact_integer_update(expected, tensor, bias):
    """New int8 values, scales and bias for a weight tensor whose Keras codebook is, per channel,
    integer multiples k*u of a unit u (uniform codebooks: UniQ, 2-bit ls/gf with v1 = 3 v2, ...),
    but whose converter-chosen scale max|w|/127 does not hit those levels. Stores k*m (m =
    127 // max|k|) with scale u*f/m, f the converter's folded factor; the int32 bias is re-expressed
    in the new scale. None if some channel's codebook has no such unit."""
    keras_groups, axis = _groups(expected, tensor)
    stored_groups, _ = _groups(tensor.values.astype(np.float64), tensor)
    new_groups, scales, ratios = [], [], []
    for c, (keras, stored) in enumerate(zip(keras_groups, stored_groups)):
        scale = float(tensor.scales[c])
        unit = integer_unit(keras)
        if unit is None:
            if np.any(keras != 0):
                return None
            new_groups.append(stored)
            scales.append(scale)
            ratios.append(1.0)
            continue
        k = np.round(keras / unit)
        ref = int(np.argmax(np.abs(keras)))
        if stored[ref] == 0:
            return None
        sign = np.sign(stored[ref] * keras[ref])
        m = 127 // int(np.abs(k).max())
        new_scale = scale * abs(stored[ref]) / (m * abs(k[ref]))
        new_groups.append(sign * k * m)
        scales.append(new_scale)
        ratios.append(scale / new_scale)
    values, new_bias = _regrouped(tensor, axis, new_groups, bias, ratios)
    return values, np.asarray(scales, np.float32), new_bias


def _regrouped(tensor, axis, groups, bias, ratios):
    """The per-channel groups (of :func:`_groups`) back in the tensor's shape as int8, and the
    int32 bias rescaled by each channel's ratio old scale / new scale (None without a bias)."""
    if axis is None:
        values = groups[0].reshape(tensor.values.shape)
    else:
        values = np.stack([g.reshape(np.take(tensor.values, 0, axis=axis).shape) for g in groups], axis=axis)
    new_bias = None
    if bias is not None:
        r = np.asarray(ratios if len(ratios) > 1 else ratios[0])
        new_bias = np.clip(np.round(bias.astype(np.float64) * r), -(2**31), 2**31 - 1)
    return values.astype(np.int8), new_bias


def exact_codebooks(model, buffer):
    """Rewrite the int8 weights of quantized layers whose codebook the converter's scale rounded,
    when an exact integer form exists. Returns the new flatbuffer and the rewritten layer names."""
    updates, names = {}, []
    biases = flatbuffer.bias_tensors(buffer)
    for match in kernel_matches(model, buffer):
        tensor = match.tensor
        if match.quantizer is None or tensor is None or tensor.dtype != "INT8":
            continue
        expected = match.expected()
        err, zeros_ok, _, _ = codebook_check(expected, tensor)
        if zeros_ok and err <= 1e-5:
            continue
        update = exact_integer_update(expected, tensor, biases.get(tensor.bias_index))
        if update is not None:
            updates[tensor.tensor_index] = update
            names.append(_kernel_label(match))
    if not updates:
        return buffer, []
    return flatbuffer.rewrite_weights(buffer, updates), names


SCALE_BYTES = 4  # one float32 per scale, in the theoretical minimum and in stored bytes


@dataclasses.dataclass
class LayerReport:
    """What one kernel became in the flatbuffer, against the least it could take.

    ``bits`` is the codebook's ``ceil(log2(levels))`` (the quantizer's ``bits`` where it has one:
    SYQ, UniQ, LossAware, LeastSquares; else from ``keras_levels``; 8 for float kernels),
    ``scales`` the float scales the codebook needs (the quantizer's scale variables -- SYQ alpha,
    UniQ delta, LossAware alpha(s) -- else one per stored TFLite scale), and
    ``min_bytes = ceil(bits * weights / 8) + 4 * scales`` (float32 scales). ``stored_bytes`` is the
    tensor data as stored (``weight_bytes``; LUT indices and tables for target 'tflm') plus 4 bytes
    per float32 TFLite scale; zero points and flatbuffer metadata are not counted."""

    layer: str
    op: str
    quantizer: str
    keras_levels: int  # distinct kernel values per output channel in Keras (max over channels)
    stored_levels: int  # distinct int8 values per channel in the flatbuffer
    max_rel_alpha_error: float  # largest relative error of a stored codebook level
    exact: bool
    weight_bytes: int  # the weight tensor's data (int8: one byte a weight, INT4: two weights a byte)
    note: str = ""
    storage: str = ""  # stored tensor type: int8, int4 (packed), float32, lut (target 'tflm')
    bits: int = 0
    weights: int = 0
    scales: int = 0
    stored_bytes: int = 0
    min_bytes: int = 0


def minimum_bytes(bits, weights, scales):
    """The theoretical minimum of a codebook kernel: bits x weights packed, plus float32 scales."""
    return math.ceil(bits * weights / 8) + SCALE_BYTES * scales


def _codebook_bits(quantizer, keras_levels):
    bits = getattr(quantizer, "bits", None)
    if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool) and bits > 0:
        return int(bits)
    return max(1, math.ceil(math.log2(max(int(keras_levels), 1))))


def _codebook_scales(quantizer, stored_scales):
    """Float scales of a quantizer's codebook: its float variables (SYQ alpha, UniQ delta, ...),
    else (closed-form or fixed codebooks) one per stored TFLite scale."""
    sizes = [int(np.prod(v.shape)) for v in getattr(quantizer, "weights", []) if v.dtype.is_floating]
    return sum(sizes) if sizes else int(stored_scales)


def _kernel_label(match):
    """Report name of a kernel: the layer's name, plus the kernel's for layers with several."""
    if isinstance(match.layer, tf.keras.layers.RNN):
        return f"{match.layer.name}/{_leaf(match.variable.name).split(':')[0]}"
    return match.layer.name


def layer_reports(model, buffer, rescaled=(), int4=()):
    """One :class:`LayerReport` per kernel (the gates of a fused LSTM kernel are summed up);
    ``int4``: labels of kernels rewritten to INT4 (for the note)."""
    groups = {}
    for match in kernel_matches(model, buffer):
        groups.setdefault(_kernel_label(match), []).append(match)
    reports = []
    for label, matches in groups.items():
        quantizer = matches[0].quantizer
        if any(m.tensor is None for m in matches):
            reports.append(LayerReport(label, "?", _describe(quantizer), 0, 0, float("nan"), False, 0,
                                       "weight tensor not found in the flatbuffer"))
            continue
        err, zeros_ok, levels, keras_levels, nbytes, dtypes = 0.0, True, 0, 0, 0, set()
        weights, stored_scales = 0, 0
        for m in matches:
            e, z, lv, klv = codebook_check(m.expected(), m.tensor)
            err, zeros_ok = max(err, e), zeros_ok and z
            levels, keras_levels = max(levels, lv), max(keras_levels, klv)
            nbytes += int(m.tensor.stored_bytes or m.tensor.values.nbytes)
            weights += int(m.tensor.values.size)
            stored_scales += int(m.tensor.scales.size)
            dtypes.add(m.tensor.dtype)
        op = matches[0].tensor.op
        storage = "/".join(sorted(dtypes)).lower()
        stored = nbytes + SCALE_BYTES * stored_scales
        if quantizer is None:
            bits = 32 if dtypes == {"FLOAT32"} else 8
            reports.append(LayerReport(label, op, "float", keras_levels, levels, float("nan"), False, nbytes,
                                       f"float weights, stored as ordinary {storage}", storage, bits,
                                       weights, stored_scales, stored, stored))
            continue
        bits = _codebook_bits(quantizer, keras_levels)
        scales = _codebook_scales(quantizer, stored_scales)
        exact = zeros_ok and err <= 1e-5
        note = ""
        tensor = matches[0].tensor
        if not exact:
            note = (f"int8 {'per-channel' if tensor.scales.size > 1 else 'per-tensor'} scales "
                    f"cannot hold this codebook exactly: stored levels off by up to {err:.2%}"
                    + ("" if zeros_ok else "; zero weights were not kept at zero"))
        elif label in int4:
            note = ("codebook stored exactly as packed INT4 integer multiples of its unit step (scales"
                    + (" and int32 bias" if tensor.bias_index >= 0 else "") + " re-expressed)")
        elif label in rescaled:
            note = ("codebook stored exactly as integer multiples of its unit step (int8 scales"
                    + (" and int32 bias" if tensor.bias_index >= 0 else "") + " re-expressed)")
        elif "FLOAT32" in dtypes:
            note = "stored as float32 (the converter keeps small tensors in float), so exact"
        reports.append(LayerReport(label, op, _describe(quantizer), keras_levels, levels, err, exact,
                                   nbytes, note, storage, bits, weights, scales, stored,
                                   minimum_bytes(bits, weights, scales)))
    return reports


def low_bit_totals(reports):
    """Stored bytes vs the theoretical minimum, summed over the quantized (non-float) kernels."""
    low = [r for r in reports if r.quantizer != "float" and r.weights]
    stored = sum(r.stored_bytes for r in low)
    minimum = sum(r.min_bytes for r in low)
    return {"layers": len(low), "weights": sum(r.weights for r in low), "stored_bytes": stored,
            "min_bytes": minimum, "stored_over_min": (stored / minimum) if minimum else None}


# ---- packed INT4 weights ---------------------------------------------------------------------

INT4_MAX = 7  # symmetric: the stored values stay in [-7, 7] (zero point 0), like int8's [-127, 127]


def int4_update(tensor, bias):
    """(values in [-7, 7], float32 scales, int32 bias or None) re-expressing an int8 weight
    tensor exactly, or a string saying why it cannot be.

    Per quantization group, the stored int8 values are integer multiples k*g of their greatest
    common divisor g; if every |k| <= 7, they are stored as k*m (m = 7 // max|k|) with scale
    scale*g/m, so value x scale is unchanged (the codebook stays exact), and the int32 bias is
    re-expressed in the new scale (rounded to the nearest integer)."""
    stored_groups, axis = _groups(tensor.values.astype(np.int64), tensor)
    new_groups, scales, ratios = [], [], []
    for c, stored in enumerate(stored_groups):
        scale = float(tensor.scales[c])
        nonzero = np.abs(stored[stored != 0])
        if nonzero.size == 0:
            new_groups.append(stored)
            scales.append(scale)
            ratios.append(1.0)
            continue
        g = int(np.gcd.reduce(nonzero))
        k = stored // g
        top = int(np.abs(k).max())
        if top > INT4_MAX:
            levels = np.unique(stored).size
            return (f"channel {c}: {levels} int8 levels that are not integer multiples k of one step "
                    f"with |k| <= {INT4_MAX} (largest |k| {top})")
        m = INT4_MAX // top
        new_groups.append(k * m)
        scales.append(scale * g / m)
        ratios.append(m / g)
    values, new_bias = _regrouped(tensor, axis, new_groups, bias, ratios)
    return values, np.asarray(scales, np.float32), new_bias


def int4_weights(model, buffer):
    """Rewrite the int8 weight tensors of quantized CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED
    layers whose codebook fits INT4 (:func:`int4_update`) as packed INT4.

    Returns (INT4 flatbuffer, its int8 twin -- the same integers and scales stored as int8, which
    LiteRT must compute bit-identically --, labels rewritten, {label: why not} for the rest)."""
    biases = flatbuffer.bias_tensors(buffer)
    updates, labels, skipped = {}, [], {}
    for match in kernel_matches(model, buffer):
        tensor, label = match.tensor, _kernel_label(match)
        if match.quantizer is None or tensor is None:
            continue
        if tensor.op not in flatbuffer.INT4_OP_VERSIONS:
            skipped[label] = f"{tensor.op} takes no INT4 weights in LiteRT"
            continue
        if tensor.dtype != "INT8":
            skipped[label] = f"stored as {tensor.dtype.lower()}, not int8"
            continue
        if not np.isfinite(tensor.input_scale):
            skipped[label] = "float input (dynamic-range model): LiteRT's INT4 filters need int8 inputs"
            continue
        if tensor.zero_points.size and np.any(tensor.zero_points != 0):
            skipped[label] = "non-zero weight zero points"
            continue
        update = int4_update(tensor, biases.get(tensor.bias_index))
        if isinstance(update, str):
            skipped[label] = update
            continue
        updates[tensor.tensor_index] = update
        labels.append(label)
    if not updates:
        return buffer, buffer, [], skipped
    return (flatbuffer.rewrite_weights(buffer, updates, int4=set(updates)),
            flatbuffer.rewrite_weights(buffer, updates), labels, skipped)


def activation_notes(model):
    notes = []
    for layer in model.layers:
        quantizer = getattr(layer, "input_quantizer", None)
        if isinstance(quantizer, ActivationQuantizer) and quantizer.export_grid() is None:
            low, high = quantizer.export_range()
            notes.append(
                f"layer '{layer.name}': {type(quantizer).__name__} levels are not a fixed uniform grid, "
                f"which int8 TFLite cannot compute; its input is stored as int8 on [{low:g}, {high:g}] "
                "without the quantizer's levels."
            )
    return notes
