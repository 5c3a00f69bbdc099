"""Codebooks as TFLite stores them: levels, bits, scales, exactness, and the integer forms.

A quantized kernel is a *codebook*: per output channel (or per tensor) a few float levels. TFLite
stores a weight tensor as integers ``q`` and a float scale ``s`` per channel, weight ``= q s``. A
codebook survives that exactly when its levels are integer multiples ``k u`` of one step ``u`` per
channel: it is stored as ``q = k m`` with scale ``u / m``, where ``m = max_int // max|k|`` uses the
storage's range (:data:`STORAGE`: int8 ``|q| <= 127``, int4 ``|q| <= 7``, int2 ``|q| <= 1``), and an
int32 bias computed at ``input scale x s`` is re-expressed by ``s_old / s_new``. This module holds
that arithmetic once, for every target, together with the measures the reports give:

* ``bits = ceil(log2(levels))`` (:func:`bits_for_levels`), the quantizer's own ``bits`` where it has
  one (:func:`codebook_bits`), its float scale count (:func:`codebook_scales`), and the theoretical
  minimum ``ceil(bits x weights / 8) + 4 x scales`` (:func:`minimum_bytes`);
* the output-channel axis of a stored weight tensor and the Keras -> TFLite kernel layout;
* :func:`compare`: a stored tensor against the Keras codebook, per channel up to one factor (a
  folded BatchNorm scale), vectorised over channels;
* sub-byte packing (:func:`pack_bits`, :func:`unpack_bits`) of the packed storage forms.
"""

import dataclasses
import math
import typing

import numpy as np

SCALE_BYTES = 4  # one float32 per scale, in the theoretical minimum and in stored bytes


@dataclasses.dataclass(frozen=True)
class StorageForm:
    """A TFLite integer type weights can be stored in: symmetric values in ``[-max_int, max_int]``
    (zero point 0), ``bits`` each, and the ops whose LiteRT kernels take it with the op version that
    announces it (TFLite's op versioning; empty for int8, which every int8 op takes)."""

    name: str
    tflite_type: str
    bits: int
    max_int: int
    op_versions: tuple = ()  # ((op name, version), ...)

    def takes(self, op):
        return not self.op_versions or op in dict(self.op_versions)

    def op_version(self, op):
        return dict(self.op_versions).get(op, 1)

    @property
    def packed(self):
        return self.bits < 8


STORAGE = {
    "int8": StorageForm("int8", "INT8", 8, 127),
    # LiteRT's builtin and reference kernels take INT4 filters with int8 inputs in these ops (not in
    # TRANSPOSE_CONV: LiteRT 2.3 refuses them when preparing, "weights->type != kTfLiteInt8", measured).
    "int4": StorageForm("int4", "INT4", 4, 7, (("CONV_2D", 7), ("DEPTHWISE_CONV_2D", 7), ("FULLY_CONNECTED", 10))),
    # INT2: FULLY_CONNECTED only (LiteRT 2.3 has no INT2 convolution); any version >= 10 loads, as
    # measured (tests/test_export_int2.py); 10 is the one that announces sub-byte filters.
    "int2": StorageForm("int2", "INT2", 2, 1, (("FULLY_CONNECTED", 10),)),
}
SUB_BYTE = {form.tflite_type: form for form in STORAGE.values() if form.packed}


# ---- measures ---------------------------------------------------------------------------------


def bits_for_levels(levels):
    """Bits per weight for a codebook of ``levels`` values: ``ceil(log2(levels))``, at least 1."""
    return max(1, math.ceil(math.log2(max(int(levels), 1))))


def codebook_bits(quantizer, levels):
    """The quantizer's ``bits`` where it has a positive integer one (SYQ, UniQ, LossAware,
    LeastSquares), else :func:`bits_for_levels` of the Keras levels."""
    bits = getattr(quantizer, "bits", None)
    if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool) and bits > 0:
        return int(bits)
    return bits_for_levels(levels)


def codebook_scales(quantizer, default):
    """Float scales of a quantizer's codebook: the sizes of its float variables (SYQ alpha, UniQ
    delta, LossAware alphas), else ``default`` (closed-form or fixed codebooks; the caller counts)."""
    # a variable's dtype: a tf.DType (tf_keras) or its name (Keras 3)
    sizes = [int(np.prod(v.shape)) for v in getattr(quantizer, "weights", [])
             if np.issubdtype(np.dtype(getattr(v.dtype, "as_numpy_dtype", v.dtype)), np.floating)]
    return sum(sizes) if sizes else int(default)


def minimum_bytes(bits, weights, scales):
    """The theoretical minimum of a codebook kernel: bits x weights packed, plus float32 scales."""
    return math.ceil(bits * weights / 8) + SCALE_BYTES * scales


def distinct_magnitudes(kernel):
    """Distinct non-zero magnitudes of a kernel (the scale count of a closed-form codebook)."""
    k = np.abs(np.asarray(kernel))
    return int(np.unique(k[k != 0]).size)


# ---- layouts ----------------------------------------------------------------------------------


def output_channel_axis(op):
    """The output-channel axis of a stored weight tensor (TFLite layout; TRANSPOSE_CONV's
    [c_out, kh, kw, c_in] has it first, as CONV_2D)."""
    return {"DEPTHWISE_CONV_2D": 3, "CONV_3D": 4}.get(op, 0)


def quantization_axis(tensor):
    """The axis a stored tensor's scales run along, None when it has one scale."""
    return int(tensor.quantized_dimension) if tensor.scales.size > 1 else None


def to_tflite_layout(kernel, op, stored_shape, part=None):
    """A Keras kernel in the layout TFLite stores for ``op`` (``part``: the gate of a fused LSTM)."""
    k = np.asarray(kernel, np.float64)
    if op == "UNIDIRECTIONAL_SEQUENCE_LSTM":  # [in, 4 units] -> gate `part` as [units, in]
        units = k.shape[-1] // 4
        return k[:, part * units : (part + 1) * units].T.reshape(stored_shape)
    if op in ("CONV_3D", "GATHER"):  # TensorFlow's layout: [kd, kh, kw, cin, cout]; a table [rows, dim]
        return k.reshape(stored_shape)
    if op == "FULLY_CONNECTED":
        # [in..., out...] -> [out, in]: the leading axes whose size product is the stored input
        # size are the contracted ones (Dense: [in, out]; MultiHeadAttention's EinsumDense
        # projections: [d, heads, key_dim] and [heads, key_dim, d])
        sizes = np.cumprod(k.shape)
        lead = int(np.searchsorted(sizes, stored_shape[-1])) + 1 if stored_shape[-1] in sizes else k.ndim - 1
        k = k.reshape(int(np.prod(k.shape[:lead])), -1).T
    elif op == "DEPTHWISE_CONV_2D":
        k = k.reshape((1,) + k.shape[:-2] + (-1,))  # [kh, kw, cin, m] -> [1, kh, kw, cin*m]
    elif op == "TRANSPOSE_CONV":  # [kh, kw, cout, cin] -> [cout, kh, kw, cin]
        if k.ndim == 3:  # Conv1DTranspose is converted as a 1xk Conv2DTranspose
            k = k[None]
        k = np.transpose(k, (2, 0, 1, 3))
    else:  # CONV_2D: [.., cin, cout] -> [cout, .., cin]
        if k.ndim == 3:  # Conv1D is converted as a 1xk Conv2D
            k = k[None]
        k = np.transpose(k, (3, 0, 1, 2))
    return k.reshape(stored_shape)


def channel_rows(values, axis):
    """The values as a 2-D array, one row per slice along ``axis`` (one row if ``axis`` is None)."""
    values = np.asarray(values)
    if axis is None:
        return values.reshape(1, -1)
    return np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)


def from_rows(rows, shape, axis):
    """Inverse of :func:`channel_rows`."""
    rows = np.asarray(rows)
    if axis is None:
        return rows.reshape(shape)
    moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    return np.moveaxis(rows.reshape(moved), 0, axis)


def channel_levels(rows):
    """Distinct values per row of a 2-D array."""
    if rows.shape[1] == 0:
        return np.zeros(rows.shape[0], np.int64)
    s = np.sort(rows, axis=1)
    return 1 + np.count_nonzero(np.diff(s, axis=1), axis=1)


# ---- exactness ----------------------------------------------------------------------------------


EXACT_TOLERANCE = 1e-5  # the largest relative error of a stored level that still counts as exact


class Comparison(typing.NamedTuple):
    """:func:`compare`'s result."""

    worst: float  # the largest relative error of a stored codebook level
    zeros_ok: bool  # zeros stayed zeros
    stored_levels: int  # the most distinct values of a slice, stored
    keras_levels: int  # and in Keras
    exact_channels: int  # slices holding their codebook exactly (:func:`is_exact`'s test per slice)
    channels: int  # slices

    @property
    def exact(self):
        """The whole tensor holds its codebook (:func:`is_exact`)."""
        return is_exact(self.worst, self.zeros_ok)


def compare(expected, stored, axis, factor_free=False):
    """A stored tensor (float values: int8 x 1, or dequantized) against the Keras kernel in TFLite
    layout, per slice along ``axis`` (None: the whole tensor), as a :class:`Comparison`.

    Per slice, the stored values must be the Keras values times one factor (the int8 scale, times a
    folded BatchNorm scale). ``factor_free``: the stored values are the weights themselves
    (dequantized; nothing is folded into a lookup table), so the factor must be 1."""
    s = channel_rows(np.asarray(stored, np.float64), axis)
    k = channel_rows(np.asarray(expected, np.float64), axis)
    levels, keras_levels = int(channel_levels(s).max(initial=0)), int(channel_levels(k).max(initial=0))
    worst, zeros_ok = channel_errors(k, s, factor_free)
    return Comparison(float(worst.max(initial=0.0)), bool(zeros_ok.all()), levels, keras_levels,
                      int(np.count_nonzero(zeros_ok & (worst <= EXACT_TOLERANCE))), int(worst.size))


def channel_errors(keras_rows, stored_rows, factor_free=False):
    """Per row of :func:`channel_rows` (one slice each): ``(worst, zeros_ok)``, the largest relative
    error of a stored level after the row's one factor (1 with ``factor_free``; else stored / Keras at
    the row's largest Keras value, 1.0 where that stored value is 0 but the Keras one is not), and
    whether the row's zeros stayed zeros. Vectorised over rows."""
    k, s = keras_rows, stored_rows
    zeros_ok = np.all((s == 0) == (k == 0), axis=1)
    ref = np.argmax(np.abs(k), axis=1)
    rows = np.arange(k.shape[0])
    k_ref, s_ref = k[rows, ref], s[rows, ref]
    worst = np.zeros(k.shape[0])
    live = k_ref != 0
    worst[live & (s_ref == 0)] = 1.0
    use = live & (s_ref != 0)
    if np.any(use):
        factor = 1.0 if factor_free else (s_ref[use] / k_ref[use])[:, None]
        ku, su = k[use], s[use]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(ku != 0, np.abs(su / factor - ku) / np.abs(ku), 0.0)
        worst[use] = rel.max(axis=1, initial=0.0)
    return worst, zeros_ok


def is_exact(worst, zeros_ok, tolerance=EXACT_TOLERANCE):
    return bool(zeros_ok and worst <= tolerance)


def dequantized(tensor):
    """The float weights an integer tensor stands for (values x per-channel scale)."""
    values = tensor.values.astype(np.float64)
    scales = tensor.scales.astype(np.float64)
    if scales.size > 1:
        shape = [1] * values.ndim
        shape[tensor.quantized_dimension] = scales.size
        scales = scales.reshape(shape)
    return values * scales


# ---- integer forms ------------------------------------------------------------------------------


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


def spread(k, max_int):
    """The multiplier ``m = max_int // max|k|`` that stores integer multiples ``k`` as ``k m`` over
    the storage's range (the re-expression every integer form shares)."""
    top = int(np.abs(k).max())
    if top > max_int:
        raise ValueError(f"integer multiples up to {top} do not fit |q| <= {max_int}")
    return max_int // top


def rescaled_bias(bias, ratios):
    """An int32 bias re-expressed per channel by ``ratio = old scale / new scale`` (None if none)."""
    if bias is None:
        return None
    r = np.asarray(ratios if len(ratios) > 1 else ratios[0])
    return np.clip(np.round(bias.astype(np.float64) * r), -(2**31), 2**31 - 1)


def exact_int8(expected, tensor, bias):
    """New int8 values, scales and bias for a stored int8 weight tensor whose Keras codebook is, per
    channel, integer multiples k*u of a unit u (uniform codebooks: UniQ, 2-bit ls/gf with v1 = 3 v2,
    ...), but whose converter-chosen scale max|w|/127 does not hit those levels. Stores k*m with
    scale u*f/m, f the converter's folded factor; the int32 bias is re-expressed in the new scale.

    Channel by channel: a channel whose codebook has no such unit within ``|k| <= 127`` keeps the
    converter's values and scale (e.g. a mid-rise 8-bit UniQ channel whose levels (i - 127.5) delta
    reach beyond 63.5 delta: its unit delta / 2 needs |k| up to 255). None if no channel has one."""
    axis = quantization_axis(tensor)
    keras_rows = channel_rows(expected, axis)
    stored_rows = channel_rows(tensor.values.astype(np.float64), axis)
    new_rows, scales, ratios = [], [], []
    for c, (keras, stored) in enumerate(zip(keras_rows, stored_rows)):
        scale = float(tensor.scales[c])
        unit = integer_unit(keras)
        ref = int(np.argmax(np.abs(keras)))
        if unit is None or stored[ref] == 0:  # no exact form (or no factor to read): the converter's
            new_rows.append(stored)
            scales.append(scale)
            ratios.append(1.0)
            continue
        k = np.round(keras / unit)
        sign = np.sign(stored[ref] * keras[ref])
        m = spread(k, STORAGE["int8"].max_int)
        new_scale = scale * abs(stored[ref]) / (m * abs(k[ref]))
        new_rows.append(sign * k * m)
        scales.append(new_scale)
        ratios.append(scale / new_scale)
    if all(r == 1.0 for r in ratios) and all(np.array_equal(n, s) for n, s in zip(new_rows, stored_rows)):
        return None
    values = from_rows(np.stack(new_rows), tensor.values.shape, axis).astype(np.int8)
    return values, np.asarray(scales, np.float32), rescaled_bias(bias, ratios)


def narrowed(tensor, bias, form, lowered=False):
    """``(values in [-max_int, max_int], float32 scales, int32 bias or None)`` re-expressing an
    int8 weight tensor exactly in a narrower storage ``form`` (int4, int2), or a string saying why
    it cannot be.

    Per channel, the stored int8 values are integer multiples k*g of their greatest common divisor
    g; if every |k| <= max_int they are stored as k*m (:func:`spread`) with scale scale*g/m, so
    value x scale is unchanged (the codebook stays exact), and the int32 bias is re-expressed in the
    new scale (rounded to the nearest integer). ``lowered``: the bias was lowered by one unit for two
    roundings (:func:`~syq_tf.export.flatbuffer.lower_biases_for_two_roundings`); it is re-expressed
    from its value before and lowered by one unit of the new scale (re-expressed, the offset would
    shrink with the scale: to 7/127 of a unit from int8 to int4 ternary weights, then round away)."""
    axis = quantization_axis(tensor)
    rows = channel_rows(tensor.values.astype(np.int64), axis)
    new_rows, scales, ratios = [], [], []
    for c, stored in enumerate(rows):
        scale = float(tensor.scales[c])
        nonzero = np.abs(stored[stored != 0])
        if nonzero.size == 0:
            new_rows.append(stored)
            scales.append(scale)
            ratios.append(1.0)
            continue
        g = int(np.gcd.reduce(nonzero))
        k = stored // g
        top = int(np.abs(k).max())
        if top > form.max_int:
            levels = np.unique(stored).size
            return (f"channel {c}: {levels} int8 levels that are not integer multiples k of one step "
                    f"with |k| <= {form.max_int} (largest |k| {top})")
        m = spread(k, form.max_int)
        new_rows.append(k * m)
        scales.append(scale * g / m)
        ratios.append(m / g)
    values = from_rows(np.stack(new_rows), tensor.values.shape, axis).astype(np.int8)
    if bias is None or not lowered:
        return values, np.asarray(scales, np.float32), rescaled_bias(bias, ratios)
    return values, np.asarray(scales, np.float32), np.maximum(rescaled_bias(bias.astype(np.int64) + 1, ratios) - 1,
                                                              -(2**31))


def int8_from_float(values, axis):
    """Symmetric int8 per channel (along ``axis``) of float weights: ``(int8 values, float32 scales,
    exact)``. Where a channel's levels are integer multiples k of one step u (|k| <= 127), it stores
    k*m with scale u/m (:func:`spread`), so int8 x scale gives the levels back to float32 rounding;
    otherwise scale max|w|/127 and rounding (``exact`` False)."""
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
            m = spread(k, STORAGE["int8"].max_int)
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


# ---- sub-byte packing ---------------------------------------------------------------------------


def pack_bits(values, bits):
    """Sub-byte tensor data as TFLite stores it (INT4, INT2): two's-complement ``bits``-bit fields,
    row-major, ``8 / bits`` per byte, the first value in the lowest bits; a partial last byte is
    zero-padded. (INT2's order was found by experiment: LiteRT decodes it low bits first, as INT4.)"""
    v = np.asarray(values).ravel().astype(np.int64)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if v.size and (v.min() < low or v.max() > high):
        raise ValueError(f"pack_bits: values {int(v.min())}..{int(v.max())} do not fit int{bits} [{low}, {high}]")
    per = 8 // bits
    fields = (v & ((1 << bits) - 1)).astype(np.uint8)
    fields = np.append(fields, np.zeros((-fields.size) % per, np.uint8)).reshape(-1, per)
    shifts = (np.arange(per) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(fields << shifts, axis=1).astype(np.uint8).tobytes()


def unpack_bits(data, bits, count):
    """Inverse of :func:`pack_bits`: ``count`` int8 values."""
    raw = np.frombuffer(bytes(data), np.uint8)
    per = 8 // bits
    if raw.size != -(-count // per):
        raise ValueError(f"INT{bits} data of {raw.size} bytes cannot hold {count} values (needs {-(-count // per)})")
    shifts = (np.arange(per) * bits).astype(np.uint8)
    fields = ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count].astype(np.int8)
    return ((fields << (8 - bits)).astype(np.int8) >> (8 - bits)).astype(np.int8)  # sign-extend
