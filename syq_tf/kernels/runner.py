"""Whole-model int8 TFLite runner with packed binary/ternary CONV_2D / FULLY_CONNECTED layers.

:func:`packed_layers` reads the binary/ternary CONV_2D and FULLY_CONNECTED layers of an exported
int8 flatbuffer as :class:`~syq_tf.kernels.PackedLayer` (weights, bias, zero points, TFLite's
requantization, fused activation, stride, padding).

:class:`TFLiteRunner` / :func:`run_tflite` execute the first subgraph op by op: codebook layers
with the packed C kernels (1/8 or 1/4 of the int8 weight bytes), every other supported op with an
int8 numpy reference written after LiteRT's ``BUILTIN_REF`` kernels (same integer arithmetic:
gemmlowp double-rounding requantization, TFLite's multiplier derivation), so outputs are
bit-exact with ``OpResolverType.BUILTIN_REF`` except SOFTMAX (float exp here, gemmlowp fixed-point
exp there: at most 1 LSB apart).

The file is untrusted: before any kernel runs, every index (op code, tensor, buffer), every
constant's size against its shape, every scale (finite, > 0), zero point and per-channel array
(bias, scales, multipliers) against the channel count, every stride, dilation, padding and window,
and the shape of every tensor of the graph (shape propagation from the inputs) are checked, and the
bytes a run needs are bounded (``MAX_TENSOR_BYTES`` per array, ``MAX_RUN_BYTES`` per run) before
anything is allocated. A file that fails is refused with
:class:`syq_tf.errors.MalformedModelError` (a ``ValueError``) naming the op (index and name) and the
tensor. A well-formed file with an op, type or option the runner does not implement raises
:class:`UnsupportedOp` (a ``NotImplementedError``, not a ``ValueError``: the file is fine, the
runner lacks the op).
"""

import math

import numpy as np
from syq_tf.export.codebook import unpack_bits
from ai_edge_litert import schema_py_generated as schema

from syq_tf.errors import MalformedModelError
from syq_tf.export import flatbuffer as _flatbuffer

MAX_TENSOR_BYTES = 1 << 28  # 256 MiB: any one tensor or working array an op of the runner allocates
MAX_RUN_BYTES = 1 << 30  # 1 GiB: all tensors of one run plus the largest op's working arrays

_OPS = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
ACTIVATIONS = {v: k for k, v in vars(schema.ActivationFunctionType).items() if not k.startswith("_")}
_TYPES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_DTYPES = {schema.TensorType.INT8: np.int8, schema.TensorType.INT32: np.int32,
           schema.TensorType.FLOAT32: np.float32, schema.TensorType.UINT8: np.uint8,
           schema.TensorType.INT64: np.int64, schema.TensorType.INT16: np.int16,
           schema.TensorType.BOOL: np.bool_}
_QUANTIZED = {schema.TensorType.INT8: (-128, 127), schema.TensorType.UINT8: (0, 255),
              schema.TensorType.INT16: (-32768, 32767), schema.TensorType.INT4: (-8, 7)}
_ERRORS = (ValueError, IndexError, KeyError, TypeError, AttributeError, ZeroDivisionError, OverflowError,
           FloatingPointError)

# op: (fewest inputs, most inputs, outputs, options class the op's builtinOptions must be if present,
#      whether the options are required, input positions that may be -1 (optional))
_SPECS = {
    "CONV_2D": (2, 3, 1, schema.Conv2DOptionsT, True, (2,)),
    "DEPTHWISE_CONV_2D": (2, 3, 1, schema.DepthwiseConv2DOptionsT, True, (2,)),
    "FULLY_CONNECTED": (2, 3, 1, schema.FullyConnectedOptionsT, False, (2,)),
    "MAX_POOL_2D": (1, 1, 1, schema.Pool2DOptionsT, True, ()),
    "AVERAGE_POOL_2D": (1, 1, 1, schema.Pool2DOptionsT, True, ()),
    "RESHAPE": (1, 2, 1, schema.ReshapeOptionsT, False, (1,)),
    "SQUEEZE": (1, 1, 1, schema.SqueezeOptionsT, False, ()),
    "QUANTIZE": (1, 1, 1, schema.QuantizeOptionsT, False, ()),
    "DEQUANTIZE": (1, 1, 1, schema.DequantizeOptionsT, False, ()),
    "MUL": (2, 2, 1, schema.MulOptionsT, False, ()),
    "ADD": (2, 2, 1, schema.AddOptionsT, False, ()),
    "SUB": (2, 2, 1, schema.SubOptionsT, False, ()),
    "MINIMUM": (2, 2, 1, schema.MaximumMinimumOptionsT, False, ()),
    "MAXIMUM": (2, 2, 1, schema.MaximumMinimumOptionsT, False, ()),
    "RELU": (1, 1, 1, None, False, ()),
    "RELU6": (1, 1, 1, None, False, ()),
    "RELU_N1_TO_1": (1, 1, 1, None, False, ()),
    "PAD": (2, 2, 1, schema.PadOptionsT, False, ()),
    "PADV2": (2, 3, 1, schema.PadV2OptionsT, False, (2,)),
    "CONCATENATION": (1, 1 << 16, 1, schema.ConcatenationOptionsT, True, ()),
    "MEAN": (2, 2, 1, schema.ReducerOptionsT, False, ()),
    "SOFTMAX": (1, 1, 1, schema.SoftmaxOptionsT, False, ()),
}


class UnsupportedOp(NotImplementedError):
    """An op (or an op variant, e.g. a dtype) the whole-model runner cannot execute. Distinct from
    :class:`syq_tf.errors.MalformedModelError`: the file is well formed, the runner lacks the op."""


def read_model(buf):
    buf = bytes(buf)
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise MalformedModelError("not a TFLite flatbuffer (file identifier is not 'TFL3')")
    return _flatbuffer.load_object_tree(buf, schema)


def op_name(model, op):
    if not 0 <= op.opcodeIndex < len(model.operatorCodes or []):
        raise MalformedModelError(f"opcode index {op.opcodeIndex} is out of range (the model has "
                                  f"{len(model.operatorCodes or [])} operator codes)")
    code = model.operatorCodes[op.opcodeIndex]
    return _OPS.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")


def _tensor_label(t, j):
    name = t.name.decode(errors="replace") if isinstance(t.name, bytes) else str(t.name)
    return f"tensor {j} {name!r}"


def constant(model, t, j=None):
    """The constant data of tensor ``t`` as an array of its shape, or None (not a constant);
    MalformedModelError when the buffer index is out of range or the data does not fit the shape."""
    label = _tensor_label(t, j)
    if not 0 <= t.buffer < len(model.buffers or []):
        raise MalformedModelError(f"{label}: buffer index {t.buffer} is out of range (the model has "
                                  f"{len(model.buffers or [])} buffers)")
    data = model.buffers[t.buffer].data
    if data is None or len(data) == 0:
        return None
    shape = [] if t.shape is None else [int(d) for d in t.shape]
    if any(d < 0 for d in shape):
        raise MalformedModelError(f"{label}: constant with shape {shape} (a negative dimension)")
    count = math.prod(shape)
    if t.type == schema.TensorType.INT4:  # packed INT4 weights: decoded to the int8 values they hold
        if len(data) != (count + 1) // 2:
            raise MalformedModelError(f"{label}: INT4 data of {len(data)} bytes cannot hold the {count} values of "
                                      f"shape {shape} (needs {(count + 1) // 2})")
        return unpack_bits(np.asarray(data, np.uint8).tobytes(), 4, count).reshape(shape)
    if t.type not in _DTYPES:
        raise UnsupportedOp(f"constant {label} has TFLite type {_TYPES.get(t.type, t.type)}, which run_tflite "
                            "cannot read")
    size = np.dtype(_DTYPES[t.type]).itemsize
    if len(data) != count * size:
        raise MalformedModelError(f"{label}: {len(data)} bytes of data for shape {shape} of "
                                  f"{_TYPES[t.type]} (needs {count * size})")
    return np.frombuffer(np.asarray(data, np.uint8).tobytes(), _DTYPES[t.type]).reshape(shape)


def qparams(t):
    q = t.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None, None
    zp = q.zeroPoint if q.zeroPoint is not None and len(q.zeroPoint) else np.zeros(len(q.scale), np.int64)
    return np.asarray(q.scale, np.float32), np.asarray(zp, np.int64)


def _check_scales(where, label, scale, zp, t_type, count=None):
    """Scales finite and > 0, as many zero points as scales and each in the type's range, and
    (``count``) one scale or ``count`` of them."""
    if scale is None:
        raise MalformedModelError(f"{where}: {label} has no quantization scale (an int8 operand needs one)")
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        bad = scale[~(np.isfinite(scale) & (scale > 0))][0]
        raise MalformedModelError(f"{where}: {label} has scale {bad} (scales must be finite and > 0)")
    if zp.size != scale.size:
        raise MalformedModelError(f"{where}: {label} has {scale.size} scales and {zp.size} zero points")
    lo, hi = _QUANTIZED.get(t_type, (-(1 << 31), (1 << 31) - 1))
    if zp.size and (zp.min() < lo or zp.max() > hi):
        raise MalformedModelError(f"{where}: {label} has zero point {int(zp.min() if zp.min() < lo else zp.max())} "
                                  f"outside {lo}..{hi}")
    if count is not None and scale.size not in (1, count):
        raise MalformedModelError(f"{where}: {label} has {scale.size} scales for {count} output channels "
                                  "(1 or one per channel)")


def _check_multipliers(where, mult, shift, real_text):
    if np.asarray(shift).size and int(np.max(shift)) > 31:
        raise MalformedModelError((f"{where}: " if where else "") + f"requantization multiplier {real_text} is "
                                  ">= 2^31 (scales out of any int8 range)")


def layer_params(model, sub, op, idx=None):
    """(w_int8, multiplier, shift, bias, in_zp, out_zp, act_range, stride, padding) of a CONV_2D /
    FULLY_CONNECTED int8 op, or None when it is not int8 with constant weights. Every array is
    checked against the channel count (MalformedModelError naming the op and tensor)."""
    from syq_tf import kernels as K

    name = op_name(model, op)
    where = f"op {idx} {name}"
    n = len(sub.tensors or [])
    ins = [] if op.inputs is None else [int(j) for j in op.inputs]
    outs = [] if op.outputs is None else [int(j) for j in op.outputs]
    if len(ins) < 2 or len(outs) < 1:
        raise MalformedModelError(f"{where}: {len(ins)} inputs and {len(outs)} outputs (needs input, weights "
                                  "[, bias] and one output)")
    for k, j in enumerate(ins[:3] + outs[:1]):
        if not (0 <= j < n or (k == 2 and j == -1)):
            raise MalformedModelError(f"{where}: tensor index {j} is out of range (the subgraph has {n} tensors)")
    x_t, w_t, y_t = sub.tensors[ins[0]], sub.tensors[ins[1]], sub.tensors[outs[0]]
    if x_t.type != schema.TensorType.INT8 or w_t.type not in (schema.TensorType.INT8, schema.TensorType.INT4):
        return None
    w = constant(model, w_t, ins[1])
    if w is None:
        return None
    w_label = _tensor_label(w_t, ins[1])
    rank = 4 if name == "CONV_2D" else 2
    if w.ndim != rank or 0 in w.shape:
        raise MalformedModelError(f"{where}: weights {w_label} have shape {list(w.shape)}; {name} takes "
                                  + ("[out, kh, kw, in]" if rank == 4 else "[out, in]") + " (no zero dimension)")
    out_c = int(w.shape[0])
    bias = None
    if len(ins) > 2 and ins[2] >= 0:
        b_t = sub.tensors[ins[2]]
        bias = constant(model, b_t, ins[2])
        if bias is not None:
            if b_t.type != schema.TensorType.INT32:
                raise UnsupportedOp(f"{where}: bias {_tensor_label(b_t, ins[2])} of type {_TYPES.get(b_t.type)} "
                                    "(int8 layers take INT32 biases)")
            if bias.size != out_c:
                raise MalformedModelError(f"{where}: bias {_tensor_label(b_t, ins[2])} has {bias.size} elements; "
                                          f"the layer has {out_c} output channels")
            bias = bias.reshape(out_c).astype(np.int32)
    (xs, xz), (ws, wz), (ys, yz) = qparams(x_t), qparams(w_t), qparams(y_t)
    _check_scales(where, "input " + _tensor_label(x_t, ins[0]), xs, xz, x_t.type)
    _check_scales(where, "weights " + w_label, ws, wz, w_t.type, out_c)
    _check_scales(where, "output " + _tensor_label(y_t, outs[0]), ys, yz, y_t.type)
    opts = op.builtinOptions
    spec = _SPECS[name]
    if opts is not None and not isinstance(opts, spec[3]) or (opts is None and spec[4]):
        raise MalformedModelError(f"{where}: builtin options {type(opts).__name__} (expected {spec[3].__name__})")
    act_code = opts.fusedActivationFunction if opts is not None else 0
    if act_code not in ACTIVATIONS:
        raise MalformedModelError(f"{where}: fused activation {act_code} is not a TFLite ActivationFunctionType")
    try:
        act_range = K.activation_range(ACTIVATIONS[act_code], ys[0], yz[0])
    except ValueError:
        raise UnsupportedOp(f"{where}: fused activation {ACTIVATIONS[act_code]}") from None
    x_shape = [] if x_t.shape is None else [int(d) for d in x_t.shape]
    if name == "CONV_2D":
        _check_window_options(where, opts, dilation=True)
        if len(x_shape) == 4 and x_shape[3] != w.shape[3] and not (w.shape[3] and x_shape[3] % w.shape[3] == 0):
            raise MalformedModelError(f"{where}: weights {w_label} have depth {w.shape[3]}, the input "
                                      f"{_tensor_label(x_t, ins[0])} has {x_shape[3]} channels")
        if opts.dilationHFactor != 1 or opts.dilationWFactor != 1:
            return None
        mult, shift = K.conv_multipliers(xs[0], ws, ys[0], out_c)
        stride = (opts.strideH, opts.strideW)
        padding = "SAME" if opts.padding == schema.Padding.SAME else "VALID"
    else:
        mult, shift = K.fc_multipliers(xs[0], ws, ys[0], out_c)
        stride, padding = (1, 1), "VALID"
    _check_multipliers(where, mult, shift, f"{float(xs[0])} x {float(np.max(ws))} / {float(ys[0])}")
    return dict(w=w, multiplier=mult, shift=shift, bias=bias, input_zero_point=int(xz[0]),
                output_zero_point=int(yz[0]), act_range=act_range, stride=stride, padding=padding)


def _check_window_options(where, opts, dilation=False, window=False):
    """Strides (and dilations, pool windows) >= 1, padding SAME or VALID."""
    fields = [("stride", opts.strideH, opts.strideW)]
    if dilation:
        fields.append(("dilation", opts.dilationHFactor, opts.dilationWFactor))
    if window:
        fields.append(("filter", opts.filterHeight, opts.filterWidth))
    for what, h, w in fields:
        if h < 1 or w < 1:
            raise MalformedModelError(f"{where}: {what} {h}x{w} (must be >= 1)")
    if opts.padding not in (schema.Padding.SAME, schema.Padding.VALID):
        raise MalformedModelError(f"{where}: padding {opts.padding} is neither SAME (0) nor VALID (1)")


def _packed_layer(model, sub, idx, op):
    from syq_tf import kernels as K

    name = op_name(model, op)
    if name not in ("CONV_2D", "FULLY_CONNECTED"):
        return None
    prm = layer_params(model, sub, op, idx)
    if prm is None:
        return None
    if name == "FULLY_CONNECTED" and getattr(op.builtinOptions, "weightsFormat", 0) != 0:
        return None
    try:
        codes = K.split_codebook(prm["w"])
    except ValueError:
        return None  # not a binary/ternary codebook
    return K.PackedLayer.from_int8(
        "conv" if name == "CONV_2D" else "fc", prm["w"], prm["multiplier"], prm["shift"],
        prm["bias"], prm["input_zero_point"], prm["output_zero_point"], prm["act_range"],
        prm["stride"], prm["padding"], bits=codes[3], granularity=codes[2], name=f"{name.lower()}_{idx}")


@_flatbuffer.reader
def packed_layers(model_bytes):
    """{op index: PackedLayer} for every int8 CONV_2D / FULLY_CONNECTED of the first subgraph
    whose weights are a binary or ternary codebook (layers with other int8 weights are left out).
    A layer whose arrays do not match its shapes raises MalformedModelError."""
    model = read_model(model_bytes)
    if not model.subgraphs:
        raise MalformedModelError("the model has no subgraph")
    sub = model.subgraphs[0]
    layers = {}
    for idx, op in enumerate(sub.operators or []):
        try:
            layer = _packed_layer(model, sub, idx, op)
        except MalformedModelError as err:
            if str(err).startswith(f"op {idx} "):
                raise
            raise MalformedModelError(f"op {idx} {op_name(model, op)}: {err}") from None
        if layer is not None:
            layers[idx] = layer
    return layers


# ---- TFLite integer arithmetic (vectorised, exact in int64) ------------------------------------

def multiply_by_quantized_multiplier(x, multiplier, shift):
    """TFLite MultiplyByQuantizedMultiplier (gemmlowp double rounding) on int arrays."""
    x = np.asarray(x, np.int64)
    m = np.asarray(multiplier, np.int64)
    s = np.asarray(shift, np.int64)
    left, right = np.maximum(s, 0), np.maximum(-s, 0)
    x = np.clip(x << left, -(1 << 31), (1 << 31) - 1)
    ab = x * m
    t = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    hi = np.where(t >= 0, t >> 31, -((-t) >> 31))  # C division: truncation toward zero
    hi = np.where((x == -(1 << 31)) & (m == -(1 << 31)), (1 << 31) - 1, hi)
    mask = (np.int64(1) << right) - 1
    rem = hi & mask
    threshold = (mask >> 1) + (hi < 0)
    return (hi >> right) + (rem > threshold)


def _qm(real):
    """quantize_multiplier of a ratio of scales; MalformedModelError when it is not finite and > 0
    or not below 2^31 (TFLite's int32 multiplier with a shift of at most 31)."""
    from syq_tf import kernels as K

    real = float(real)
    if not (math.isfinite(real) and real > 0):
        raise MalformedModelError(f"requantization multiplier {real} from the tensors' scales (must be finite and > 0)")
    m, s = K.quantize_multiplier(real)
    if s > 31:
        raise MalformedModelError(f"requantization multiplier {real:g} from the tensors' scales is >= 2^31")
    return m, s


def _round_half_away(v):
    v = np.asarray(v, np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _out_size(n, k, s, padding, d=1):
    eff = (k - 1) * d + 1
    return (n + s - 1) // s if padding == "SAME" else (n - eff + s) // s


def _pad_amount(n, k, s, out, d=1):
    return max((out - 1) * s + (k - 1) * d + 1 - n, 0) // 2


def _windows(x, kh, kw, sh, sw, dh, dw, padding, fill):
    """x NHWC -> (N, oh, ow, kh*kw, C) windows; out-of-image positions hold ``fill``."""
    n, h, w, c = x.shape
    oh, ow = _out_size(h, kh, sh, padding, dh), _out_size(w, kw, sw, padding, dw)
    pt = _pad_amount(h, kh, sh, oh, dh) if padding == "SAME" else 0
    pl = _pad_amount(w, kw, sw, ow, dw) if padding == "SAME" else 0
    hp = max((oh - 1) * sh + (kh - 1) * dh + 1, h + pt)
    wp = max((ow - 1) * sw + (kw - 1) * dw + 1, w + pl)
    xp = np.full((n, hp, wp, c), fill, x.dtype)
    xp[:, pt:pt + h, pl:pl + w] = x
    cols = [xp[:, ky * dh:ky * dh + (oh - 1) * sh + 1:sh, kx * dw:kx * dw + (ow - 1) * sw + 1:sw]
            for ky in range(kh) for kx in range(kw)]
    return np.stack(cols, axis=3)


def _padding(opts):
    return "SAME" if opts.padding == schema.Padding.SAME else "VALID"


class _Tensor:
    def __init__(self, t, j):
        self.index = j
        self.name = t.name.decode(errors="replace") if isinstance(t.name, bytes) else str(t.name)
        self.label = _tensor_label(t, j)
        if t.type not in _TYPES:
            raise MalformedModelError(f"{self.label}: type {t.type} is not a TFLite TensorType")
        self.type = t.type
        # INT4 weights are decoded to int8 when read (_const): the same arithmetic as int8 weights
        self.dtype = np.int8 if t.type == schema.TensorType.INT4 else _DTYPES.get(t.type)
        self.shape = [] if t.shape is None else [int(d) for d in t.shape]
        if any(d < 0 for d in self.shape):
            raise MalformedModelError(f"{self.label}: shape {self.shape} has a negative dimension")
        s, z = qparams(t)
        self.scale, self.zp = s, z
        self.s = float(s[0]) if s is not None else None
        self.z = int(z[0]) if z is not None and z.size else 0
        self.axis = int(t.quantization.quantizedDimension) if s is not None else 0

    def check_axis(self, where):
        """Per-channel scales lie along an existing dimension with one scale per channel."""
        if self.scale is not None and self.scale.size > 1 and not (
                0 <= self.axis < len(self.shape) and self.shape[self.axis] == self.scale.size):
            raise MalformedModelError(f"{where} {self.label} has {self.scale.size} scales along quantized "
                                      f"dimension {self.axis} of shape {self.shape}")


def _nbytes(shape, dtype):
    return math.prod(shape) * (np.dtype(dtype).itemsize if dtype is not None else 8)


def _broadcast(where, a, b):
    try:
        return tuple(np.broadcast_shapes(tuple(a), tuple(b)))
    except ValueError:
        raise MalformedModelError(f"{where}: input shapes {list(a)} and {list(b)} do not broadcast") from None


def _reshape_target(x_shape, shape):
    shape = list(shape)
    size = math.prod(x_shape)
    if -1 not in shape and math.prod(shape) != size and shape and shape[0] == 1:
        shape[0] = -1  # static batch 1, dynamic batch at run time
    if shape.count(-1) > 1 or any(d < -1 for d in shape):
        raise MalformedModelError(f"new shape {shape} (at most one -1, other dimensions >= 0)")
    known = math.prod(d for d in shape if d != -1)
    if -1 in shape:
        if known == 0 or size % known:
            raise MalformedModelError(f"cannot reshape {list(x_shape)} ({size} elements) to {shape}")
        shape[shape.index(-1)] = size // known
    elif known != size:
        raise MalformedModelError(f"cannot reshape {list(x_shape)} ({size} elements) to {shape}")
    return tuple(shape)


class TFLiteRunner:
    """Execute an int8 TFLite flatbuffer op by op (first subgraph).

    impl: 'opt' (optimized packed kernels), 'ref' or 'portable' for the packed layers; other ops
    always use the numpy int8 reference.  ``packed=False`` runs codebook layers with the numpy
    int8 reference as well (for comparisons).  The constructor checks the whole file (see the
    module docstring) and raises MalformedModelError or UnsupportedOp before anything runs."""

    def __init__(self, tflite_bytes, impl="opt", packed=True):
        if impl not in ("opt", "ref", "portable"):
            raise ValueError(f"impl must be 'opt', 'ref' or 'portable', got {impl!r}")
        self._load(tflite_bytes, impl, packed)

    @_flatbuffer.reader
    def _load(self, tflite_bytes, impl, packed):
        from syq_tf import kernels as K

        self._K = K
        self.impl = impl
        self.model = model = read_model(tflite_bytes)
        if len(model.subgraphs or []) != 1:
            raise UnsupportedOp(f"models with {len(model.subgraphs or [])} subgraphs (control flow) are not supported")
        self.sub = sub = model.subgraphs[0]
        ops = list(sub.operators or [])
        names = []
        for idx, op in enumerate(ops):
            try:
                names.append(op_name(model, op))
            except MalformedModelError as err:
                raise MalformedModelError(f"op {idx}: {err}") from None
        raw_tensors = list(sub.tensors or [])
        n = len(raw_tensors)
        users = {}
        for idx, op in enumerate(ops):
            for j in list(op.inputs if op.inputs is not None else []) + list(op.outputs if op.outputs is not None else []):
                users.setdefault(int(j), f"op {idx} {names[idx]}")
        self._users = users
        self.tensors = []
        for j, t in enumerate(raw_tensors):
            try:
                self.tensors.append(_Tensor(t, j))
            except MalformedModelError as err:
                raise MalformedModelError(f"{users.get(j, 'no op')}: {err}") from None
        self.consts, budget = {}, _flatbuffer.data_budget(tflite_bytes)
        for j, t in enumerate(raw_tensors):
            try:
                c = constant(model, t, j)
            except MalformedModelError as err:
                raise MalformedModelError(f"{users.get(j, 'no op')}: {err}") from None
            if c is not None:
                budget -= c.nbytes
                if budget < 0:
                    raise MalformedModelError(
                        f"{users.get(j, 'no op')}: {self.tensors[j].label}: the constants read so far exceed "
                        f"{_flatbuffer.data_budget(tflite_bytes)} bytes (4 x the file size + 64 MiB; tensors "
                        "sharing one buffer)")
                self.consts[j] = c
        self.inputs = [int(j) for j in (sub.inputs if sub.inputs is not None else [])]
        self.outputs = [int(j) for j in (sub.outputs if sub.outputs is not None else [])]
        for what, lst in (("input", self.inputs), ("output", self.outputs)):
            if not lst:
                raise MalformedModelError(f"the subgraph has no {what}")
            for j in lst:
                if not 0 <= j < n:
                    raise MalformedModelError(f"subgraph {what} tensor index {j} is out of range ({n} tensors)")
        for j in self.inputs:
            if self.tensors[j].dtype is None:
                raise UnsupportedOp(f"model input {self.tensors[j].label} has type {_TYPES[self.tensors[j].type]}")
        supported = sorted(k[4:].upper() for k in dir(self) if k.startswith("_op_"))
        self.ops = []  # (index, name, op, packed layer or None)
        self.packed = {}
        available = set(self.consts) | set(self.inputs)
        for idx, (op, name) in enumerate(zip(ops, names)):
            if not hasattr(self, "_op_" + name.lower()):
                raise UnsupportedOp(f"op {idx} {name} is not supported by syq_tf.kernels.run_tflite (supported: "
                                    + ", ".join(supported) + ")")
            self._check_op(idx, name, op, available)
            self.ops.append((idx, name, op, None))
        for j in self.outputs:
            if j not in available:
                raise MalformedModelError(f"model output {self.tensors[j].label} is computed by no op")
        self.plan_bytes = self._plan([self.tensors[j].shape for j in self.inputs], declared=True)
        for k, (idx, name, op, _) in enumerate(self.ops):
            try:
                layer = _packed_layer(model, sub, idx, op) if packed else None
            except MalformedModelError as err:
                raise MalformedModelError(err if str(err).startswith(f"op {idx} ") else f"op {idx} {name}: {err}") \
                    from None
            if layer is not None and layer.weight_bytes >= int(np.prod(layer.shape)):
                layer = None  # e.g. in_c = 1: every int8 kernel is a "pixel codebook", packing costs more
            if layer is not None:
                self.packed[idx] = layer
                self.ops[k] = (idx, name, op, layer)

    # -- checks --------------------------------------------------------------------------------
    def _check_op(self, idx, name, op, available):
        """Input / output counts and indices, options type, data flow (every input computed before)."""
        where = f"op {idx} {name}"
        lo, hi, n_out, opt_cls, required, optional = _SPECS[name]
        ins = [int(j) for j in (op.inputs if op.inputs is not None else [])]
        outs = [int(j) for j in (op.outputs if op.outputs is not None else [])]
        if not lo <= len(ins) <= hi or len(outs) != n_out:
            raise MalformedModelError(f"{where}: {len(ins)} inputs and {len(outs)} outputs ({name} takes "
                                      f"{lo}" + (f"..{hi}" if hi != lo else "") + f" inputs and {n_out} output)")
        n = len(self.tensors)
        for k, j in enumerate(ins):
            if j == -1 and k in optional:
                continue
            if not 0 <= j < n:
                raise MalformedModelError(f"{where}: input {k} is tensor index {j}, out of range ({n} tensors)")
            if j not in available:
                raise MalformedModelError(f"{where}: input {k} {self.tensors[j].label} is neither a constant, "
                                          "a model input nor the output of an earlier op")
        for j in outs:
            if not 0 <= j < n:
                raise MalformedModelError(f"{where}: output tensor index {j} is out of range ({n} tensors)")
            if j in self.consts:
                raise MalformedModelError(f"{where}: output {self.tensors[j].label} is a constant")
            available.add(j)
        opts = op.builtinOptions
        if (opts is None and required) or (opts is not None and opt_cls is not None and not isinstance(opts, opt_cls)):
            expected = opt_cls.__name__ if opt_cls is not None else "none"
            raise MalformedModelError(f"{where}: builtin options {type(opts).__name__} (expected {expected})")
        act = getattr(opts, "fusedActivationFunction", 0) if opts is not None else 0
        if act not in ACTIVATIONS:
            raise MalformedModelError(f"{where}: fused activation {act} is not a TFLite ActivationFunctionType")
        layer = name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
        roles = [("weights" if layer and k == 1 else "bias" if layer and k == 2 else "input" if k == 0 else f"input {k}", j)
                 for k, j in enumerate(ins)] + [("output", j) for j in outs]
        for role, j in roles:
            t = self.tensors[j] if j >= 0 else None
            if t is None or t.type not in _QUANTIZED or role == "bias":
                continue
            count = None
            if role == "weights" and t.shape:
                count = t.shape[-1] if name == "DEPTHWISE_CONV_2D" else t.shape[0]
            _check_scales(where, f"{role} {t.label}", t.scale, t.zp, t.type, count)
            t.check_axis(f"{where}: {role}")

    def _plan(self, in_shapes, declared=False):
        """Propagate shapes from the inputs through every op, checking each op's shapes, and return
        the bytes a run needs (all tensors plus the largest op's working arrays); beyond
        MAX_TENSOR_BYTES for one array or MAX_RUN_BYTES in all, refuse before allocating."""
        shapes = {j: tuple(c.shape) for j, c in self.consts.items()}
        for j, s in zip(self.inputs, in_shapes):
            shapes[j] = tuple(int(d) for d in s)
        total, work_max = 0, 0
        for idx, name, op, _ in self.ops:
            where = f"op {idx} {name}"
            ins = [int(j) for j in op.inputs]
            xs = [shapes[j] if j >= 0 else None for j in ins]
            for k, s in enumerate(xs):
                if s is not None and 0 in s and ins[k] not in self.consts:
                    raise MalformedModelError(f"{where}: input {k} {self.tensors[ins[k]].label} has shape {list(s)} "
                                              "(a zero dimension)")
            try:
                out, work = self._infer(where, name, op, ins, xs)
            except MalformedModelError as err:
                raise MalformedModelError(err if str(err).startswith(where) else f"{where}: {err}") from None
            y = self.tensors[int(op.outputs[0])]
            out = tuple(int(d) for d in out)
            if any(d <= 0 for d in out):
                raise MalformedModelError(f"{where}: output {y.label} would have shape {list(out)} (the window, "
                                          "stride or padding leaves no element)")
            nbytes = _nbytes(out, y.dtype)
            for what, b in (("output " + y.label, nbytes), ("working arrays", work)):
                if b > MAX_TENSOR_BYTES:
                    raise MalformedModelError(f"{where}: {what} would need {b} bytes (shapes {[list(s) for s in xs if s]} "
                                              f"-> {list(out)}), above MAX_TENSOR_BYTES={MAX_TENSOR_BYTES}")
            shapes[int(op.outputs[0])] = out
            total += nbytes
            work_max = max(work_max, work)
            if total + work_max > MAX_RUN_BYTES:
                raise MalformedModelError(f"{where}: the tensors up to this op need {total + work_max} bytes, above "
                                          f"MAX_RUN_BYTES={MAX_RUN_BYTES}")
        return total + work_max

    def _const_ints(self, where, j, what):
        if j not in self.consts:
            raise UnsupportedOp(f"{where}: {what} {self.tensors[j].label} is not a constant")
        v = self.consts[j]
        if v.dtype.kind not in "iu":
            raise MalformedModelError(f"{where}: {what} {self.tensors[j].label} has type {v.dtype} (integers expected)")
        return [int(a) for a in v.reshape(-1)]

    def _infer(self, where, name, op, ins, xs):
        """(output shape, bytes of the op's working arrays) of one op, checking its shapes."""
        o = op.builtinOptions
        x = xs[0]
        t = [self.tensors[j] if j >= 0 else None for j in ins]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D"):
            if len(x) != 4:
                raise MalformedModelError(f"input {t[0].label} has shape {list(x)}; {name} takes NHWC")
            conv = name in ("CONV_2D", "DEPTHWISE_CONV_2D")
            _check_window_options(where, o, dilation=conv, window=not conv)
            if conv:
                w = xs[1]
                if len(w) != 4 or 0 in w:
                    raise MalformedModelError(f"weights {t[1].label} have shape {list(w)}; {name} takes "
                                              + ("[out, kh, kw, in]" if name == "CONV_2D" else "[1, kh, kw, out]"))
                kh, kw = w[1], w[2]
                dh, dw = o.dilationHFactor, o.dilationWFactor
                oc = w[0] if name == "CONV_2D" else w[3]
                if len(ins) > 2 and ins[2] >= 0 and math.prod(xs[2]) != oc:
                    raise MalformedModelError(f"bias {t[2].label} has {math.prod(xs[2])} elements; the layer has "
                                              f"{oc} output channels")
                if name == "CONV_2D":
                    if x[3] != w[3]:
                        if x[3] % w[3] == 0:
                            raise UnsupportedOp(f"{where}: grouped convolution")
                        raise MalformedModelError(f"weights {t[1].label} have depth {w[3]}, the input {t[0].label} "
                                                  f"has {x[3]} channels")
                elif w[0] != 1 or oc % x[3]:
                    raise MalformedModelError(f"weights {t[1].label} have shape {list(w)}: needs [1, kh, kw, "
                                              f"a multiple of the {x[3]} input channels]")
                depth = x[3] if name == "CONV_2D" else oc
            else:
                kh, kw, dh, dw, oc, depth = o.filterHeight, o.filterWidth, 1, 1, x[3], x[3]
            pad = "SAME" if o.padding == schema.Padding.SAME else "VALID"
            oh, ow = _out_size(x[1], kh, o.strideH, pad, dh), _out_size(x[2], kw, o.strideW, pad, dw)
            if oh <= 0 or ow <= 0:
                raise MalformedModelError(f"a {kh}x{kw} window (dilation {dh}x{dw}) does not fit the {x[1]}x{x[2]} "
                                          f"input {t[0].label} with {pad} padding")
            hp = max((oh - 1) * o.strideH + (kh - 1) * dh + 1, x[1]) + kh * dh
            wp = max((ow - 1) * o.strideW + (kw - 1) * dw + 1, x[2]) + kw * dw
            work = x[0] * oh * ow * kh * kw * depth * 16 + x[0] * hp * wp * x[3] * 8
            return (x[0], oh, ow, oc), work
        if name == "FULLY_CONNECTED":
            w = xs[1]
            if len(w) != 2 or 0 in w:
                raise MalformedModelError(f"weights {t[1].label} have shape {list(w)}; FULLY_CONNECTED takes [out, in]")
            oc, ic = w
            keep = bool(getattr(o, "keepNumDims", False))
            size = math.prod(x)
            if (keep and x[-1:] != (ic,)) or size % ic:
                raise MalformedModelError(f"input {t[0].label} of shape {list(x)} does not split into rows of the "
                                          f"{ic} inputs of weights {t[1].label}")
            if len(ins) > 2 and ins[2] >= 0 and math.prod(xs[2]) != oc:
                raise MalformedModelError(f"bias {t[2].label} has {math.prod(xs[2])} elements; the layer has {oc} "
                                          "output channels")
            out = tuple(x[:-1]) + (oc,) if keep else (size // ic, oc)
            return out, (size + oc * ic + 2 * math.prod(out)) * 8
        if name == "RESHAPE":
            if len(ins) > 1 and ins[1] >= 0:
                shape = self._const_ints(where, ins[1], "shape")
            elif o is not None and o.newShape is not None:
                shape = [int(v) for v in o.newShape]
            else:
                shape = list(self.tensors[int(op.outputs[0])].shape)
            return _reshape_target(x, shape), 0
        if name == "SQUEEZE":
            dims = [] if o is None or o.squeezeDims is None else [int(d) for d in o.squeezeDims]
            if not dims:
                return tuple(d for d in x if d != 1) or (), 0
            for d in dims:
                if not -len(x) <= d < len(x) or x[d] != 1:
                    raise MalformedModelError(f"squeeze dimension {d} of input shape {list(x)} (must be in range "
                                              "and of size 1)")
            drop = {d % len(x) for d in dims}
            return tuple(s for k, s in enumerate(x) if k not in drop), 0
        if name in ("MUL", "ADD", "SUB", "MINIMUM", "MAXIMUM"):
            out = _broadcast(where, x, xs[1])
            return out, 4 * 8 * math.prod(out)
        if name in ("PAD", "PADV2"):
            pads = self._const_ints(where, ins[1], "paddings")
            if len(pads) != 2 * len(x) or min(pads, default=0) < 0:
                raise MalformedModelError(f"paddings {t[1].label} hold {pads[:8]}: needs {len(x)} x 2 values >= 0")
            if len(ins) > 2 and ins[2] >= 0 and math.prod(xs[2]) != 1:
                raise MalformedModelError(f"constant value {t[2].label} has {math.prod(xs[2])} elements (needs 1)")
            return tuple(d + pads[2 * k] + pads[2 * k + 1] for k, d in enumerate(x)), 0
        if name == "CONCATENATION":
            axis = int(o.axis)
            if not -len(x) <= axis < len(x):
                raise MalformedModelError(f"axis {axis} for inputs of rank {len(x)}")
            axis %= len(x)
            for k, s in enumerate(xs):
                if len(s) != len(x) or any(a != b for i, (a, b) in enumerate(zip(s, x)) if i != axis):
                    raise MalformedModelError(f"input {k} {t[k].label} has shape {list(s)}, input 0 has {list(x)}: "
                                              f"only axis {axis} may differ")
            return tuple(x[:axis]) + (sum(s[axis] for s in xs),) + tuple(x[axis + 1:]), 0
        if name == "MEAN":
            axes = self._const_ints(where, ins[1], "axes")
            if not x or any(not -len(x) <= a < len(x) for a in axes):
                raise MalformedModelError(f"axes {axes[:8]} for an input of rank {len(x)}")
            axes = sorted({a % len(x) for a in axes})
            keep = bool(o.keepDims) if o is not None else False
            out = tuple(1 if k in axes else d for k, d in enumerate(x)) if keep else \
                tuple(d for k, d in enumerate(x) if k not in axes)
            return out, 8 * math.prod(x)
        if name == "SOFTMAX":
            beta = float(o.beta) if o is not None else 1.0
            if not math.isfinite(beta):
                raise MalformedModelError(f"beta {beta} (must be finite)")
            if not x:
                raise MalformedModelError(f"input {t[0].label} is a scalar")
            return x, 4 * 8 * math.prod(x)
        return x, 3 * 8 * math.prod(x)  # QUANTIZE, DEQUANTIZE, RELU*: elementwise

    # -- public --------------------------------------------------------------------------------
    def __call__(self, *xs):
        if len(xs) != len(self.inputs):
            raise ValueError(f"model has {len(self.inputs)} inputs, got {len(xs)}")
        env = dict(self.consts)
        arrays = []
        for i, x in zip(self.inputs, xs):
            t = self.tensors[i]
            x = np.asarray(x)
            if x.ndim != len(t.shape) or list(x.shape[1:]) != t.shape[1:] or (x.ndim and x.shape[0] < 1):
                raise ValueError(f"input {t.label} has shape {list(x.shape)}; the model declares {t.shape} "
                                 "(any batch >= 1)")
            if t.dtype is not None and x.dtype != t.dtype:
                if t.dtype == np.int8 and x.dtype.kind in "iu" and x.size and (x.min() < -128 or x.max() > 127):
                    raise ValueError(f"input '{t.name}' is int8; got values outside -128..127")
                x = x.astype(t.dtype)
            env[i] = x
            arrays.append(x)
        shapes = [list(x.shape) for x in arrays]
        if shapes != [self.tensors[i].shape for i in self.inputs]:
            try:
                self._plan(shapes)
            except MalformedModelError as err:  # the file was checked at its declared batch: this is the call's
                raise ValueError(f"inputs of shapes {shapes}: {err}") from None
        for idx, name, op, layer in self.ops:
            ins = [env[j] if j >= 0 else None for j in op.inputs]
            try:
                outs = getattr(self, "_op_" + name.lower())(op, ins, layer)
            except UnsupportedOp as err:
                raise UnsupportedOp(err if str(err).startswith(f"op {idx} ") else f"op {idx} {name}: {err}") from None
            except _ERRORS as err:
                raise MalformedModelError(
                    str(err) if str(err).startswith(f"op {idx} ") else f"op {idx} {name}: {type(err).__name__}: {err}"
                ) from None
            except RuntimeError as err:  # the C kernels refused an argument
                raise MalformedModelError(f"op {idx} {name}: {err}") from None
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            for j, o in zip(op.outputs, outs):
                env[j] = o
        res = [env[j] for j in self.outputs]
        return res[0] if len(res) == 1 else res

    run = __call__

    def weight_report(self):
        """Per packed layer: op index, kind, shape, bits, granularity, packed bytes (codes +
        magnitudes) kept by the runner and the int8 weight bytes of the flatbuffer."""
        rows = []
        for idx, layer in self.packed.items():
            rows.append(dict(op=idx, name=layer.name, kind=layer.kind, shape=layer.shape, bits=layer.bits,
                             granularity=layer.granularity, packed_bytes=layer.weight_bytes,
                             code_bytes=int(layer.codes.nbytes), magnitude_bytes=int(layer.mag.nbytes),
                             int8_bytes=int(np.prod(layer.shape))))
        return rows

    # -- helpers -------------------------------------------------------------------------------
    def _t(self, op, k, out=False):
        j = (op.outputs if out else op.inputs)[k]
        return self.tensors[j]

    def _act_range(self, op, y):
        opts = op.builtinOptions
        act = ACTIVATIONS.get(getattr(opts, "fusedActivationFunction", 0), "?") if opts is not None else "NONE"
        if y.dtype != np.int8:
            if act != "NONE":
                raise UnsupportedOp(f"fused activation {act} on {y.dtype.__name__} output")
            return None
        try:
            return self._K.activation_range(act, y.s, y.z)
        except ValueError:
            raise UnsupportedOp(f"fused activation {act}") from None

    @staticmethod
    def _require_int8(*ts):
        for t in ts:
            if t.dtype != np.int8:
                raise UnsupportedOp(f"{t.label} has type {_TYPES.get(t.type, t.type)}, only INT8 is supported")

    @staticmethod
    def _multipliers(fn, x_t, w_t, y, out_c):
        mult, shift = fn(x_t.s, w_t.scale, y.s, out_c)
        _check_multipliers("", mult, shift, f"{x_t.s} x {float(np.max(w_t.scale))} / {y.s}")
        return mult, shift

    def _requant(self, acc, mult, shift, y, act):
        v = multiply_by_quantized_multiplier(acc, mult, shift) + y.z
        return np.clip(v, act[0], act[1]).astype(np.int8)

    # -- ops -----------------------------------------------------------------------------------
    def _op_conv_2d(self, op, ins, layer):
        if layer is not None:
            return layer(ins[0], impl=self.impl)
        x_t, w_t, y = self._t(op, 0), self._t(op, 1), self._t(op, 0, out=True)
        self._require_int8(x_t, w_t, y)
        o = op.builtinOptions
        w = ins[1].astype(np.float64)  # OHWI
        oc, kh, kw, ic = w.shape
        x = ins[0]
        groups = x.shape[-1] // ic
        if groups != 1:
            raise UnsupportedOp("grouped convolution")
        win = _windows(x.astype(np.int32) - x_t.z, kh, kw, o.strideH, o.strideW, o.dilationHFactor,
                       o.dilationWFactor, _padding(o), 0)
        n, oh, ow = win.shape[:3]
        acc = np.rint(win.reshape(n * oh * ow, -1).astype(np.float64) @ w.reshape(oc, -1).T).astype(np.int64)
        if ins[2] is not None:
            acc += ins[2].astype(np.int64)
        mult, shift = self._multipliers(self._K.conv_multipliers, x_t, w_t, y, oc)
        return self._requant(acc, mult, shift, y, self._act_range(op, y)).reshape(n, oh, ow, oc)

    def _op_depthwise_conv_2d(self, op, ins, layer):
        x_t, w_t, y = self._t(op, 0), self._t(op, 1), self._t(op, 0, out=True)
        self._require_int8(x_t, w_t, y)
        o = op.builtinOptions
        w = ins[1].astype(np.int64)  # 1, kh, kw, out_c
        _, kh, kw, oc = w.shape
        x = ins[0]
        dm = oc // x.shape[-1]
        win = _windows(x.astype(np.int64) - x_t.z, kh, kw, o.strideH, o.strideW, o.dilationHFactor,
                       o.dilationWFactor, _padding(o), 0)
        if dm > 1:
            win = np.repeat(win, dm, axis=-1)
        acc = np.einsum("nhwkc,kc->nhwc", win, w.reshape(kh * kw, oc))
        if ins[2] is not None:
            acc = acc + ins[2].astype(np.int64)
        mult, shift = self._multipliers(self._K.conv_multipliers, x_t, w_t, y, oc)
        return self._requant(acc, mult, shift, y, self._act_range(op, y))

    def _op_fully_connected(self, op, ins, layer):
        o = op.builtinOptions
        keep = bool(getattr(o, "keepNumDims", False))
        x = ins[0]
        w = ins[1]
        out_c, in_c = w.shape
        lead = x.shape[:-1] if keep else (x.size // in_c,)
        if layer is not None:
            return layer(x.reshape(-1, in_c), impl=self.impl).reshape(*lead, out_c)
        x_t, w_t, y = self._t(op, 0), self._t(op, 1), self._t(op, 0, out=True)
        self._require_int8(x_t, w_t, y)
        if getattr(o, "weightsFormat", 0) != 0:
            raise UnsupportedOp("shuffled weights format")
        xw = (x.reshape(-1, in_c).astype(np.float64) - x_t.z)
        acc = np.rint(xw @ (w.astype(np.float64) - w_t.z).T).astype(np.int64)
        if len(ins) > 2 and ins[2] is not None:
            acc += ins[2].astype(np.int64)
        mult, shift = self._multipliers(self._K.fc_multipliers, x_t, w_t, y, out_c)
        return self._requant(acc, mult, shift, y, self._act_range(op, y)).reshape(*lead, out_c)

    def _pool(self, op, ins, kind):
        x_t, y = self._t(op, 0), self._t(op, 0, out=True)
        self._require_int8(x_t, y)
        o = op.builtinOptions
        act = self._act_range(op, y)
        x = ins[0].astype(np.int32)
        if kind == "max":
            win = _windows(x, o.filterHeight, o.filterWidth, o.strideH, o.strideW, 1, 1, _padding(o), -(1 << 20))
            v = win.max(axis=3)
        else:
            win = _windows(x, o.filterHeight, o.filterWidth, o.strideH, o.strideW, 1, 1, _padding(o), 0)
            ones = _windows(np.ones_like(x[..., :1]), o.filterHeight, o.filterWidth, o.strideH, o.strideW,
                            1, 1, _padding(o), 0)
            s, cnt = win.sum(axis=3).astype(np.int64), ones.sum(axis=3).astype(np.int64)
            half = cnt // 2
            num = np.where(s > 0, s + half, s - half)
            v = np.sign(num) * (np.abs(num) // cnt)  # C division truncates toward zero
        return np.clip(v, act[0], act[1]).astype(np.int8)

    def _op_max_pool_2d(self, op, ins, layer):
        return self._pool(op, ins, "max")

    def _op_average_pool_2d(self, op, ins, layer):
        return self._pool(op, ins, "avg")

    def _op_reshape(self, op, ins, layer):
        x = ins[0]
        shape = None
        if len(ins) > 1 and ins[1] is not None:
            shape = [int(v) for v in np.asarray(ins[1]).reshape(-1)]
        elif op.builtinOptions is not None and op.builtinOptions.newShape is not None:
            shape = [int(v) for v in op.builtinOptions.newShape]
        if shape is None:
            shape = list(self._t(op, 0, out=True).shape)
        return x.reshape(_reshape_target(x.shape, shape))

    def _op_squeeze(self, op, ins, layer):
        dims = op.builtinOptions.squeezeDims if op.builtinOptions is not None else None
        x = ins[0]
        if dims is None or len(dims) == 0:
            return np.squeeze(x)
        return np.squeeze(x, axis=tuple(int(d) % x.ndim for d in dims))

    def _op_quantize(self, op, ins, layer):
        x_t, y = self._t(op, 0), self._t(op, 0, out=True)
        self._require_int8(y)
        x = ins[0]
        if x_t.dtype == np.float32:
            q = np.float32(x) / np.float32(y.s)
            v = _round_half_away(q) + y.z
        elif x_t.dtype in (np.int8, np.uint8, np.int16):
            m, s = _qm(np.float64(x_t.s) / np.float64(y.s))
            v = multiply_by_quantized_multiplier(x.astype(np.int64) - x_t.z, m, s) + y.z
        else:
            raise UnsupportedOp(f"input type {x_t.dtype}")
        return np.clip(v, -128, 127).astype(np.int8)

    def _op_dequantize(self, op, ins, layer):
        x_t = self._t(op, 0)
        if x_t.dtype not in (np.int8, np.uint8, np.int16):
            raise UnsupportedOp(f"input type {x_t.dtype}")
        return (np.float64(np.float32(x_t.s)) * (ins[0].astype(np.int64) - x_t.z)).astype(np.float32)

    def _binary_int8(self, op, ins):
        a_t, b_t, y = self._t(op, 0), self._t(op, 1), self._t(op, 0, out=True)
        self._require_int8(a_t, b_t, y)
        return a_t, b_t, y, ins[0].astype(np.int64), ins[1].astype(np.int64)

    def _float_binary(self, op, ins, fn):
        """float32 elementwise op (float islands the converter leaves, e.g. DEQUANTIZE -> ADD ->
        QUANTIZE): one IEEE float32 operation per element, as TFLite's float kernels."""
        ts = [self._t(op, 0), self._t(op, 1), self._t(op, 0, out=True)]
        if any(t.dtype != np.float32 for t in ts):
            return None
        v = fn(np.asarray(ins[0], np.float32), np.asarray(ins[1], np.float32)).astype(np.float32)
        opts = op.builtinOptions
        act = ACTIVATIONS.get(getattr(opts, "fusedActivationFunction", 0), "?") if opts is not None else "NONE"
        lo, hi = {"NONE": (None, None), "RELU": (0, None), "RELU6": (0, 6), "RELU_N1_TO_1": (-1, 1)}.get(act, (1, 0))
        if lo is not None and hi is not None and lo > hi:
            raise UnsupportedOp(f"fused activation {act}")
        if lo is not None or hi is not None:
            v = np.clip(v, lo, hi).astype(np.float32)
        return v

    def _op_mul(self, op, ins, layer):
        v = self._float_binary(op, ins, np.multiply)
        if v is not None:
            return v
        a_t, b_t, y, a, b = self._binary_int8(op, ins)
        m, s = _qm(np.float64(a_t.s) * np.float64(b_t.s) / np.float64(y.s))
        return self._requant((a - a_t.z) * (b - b_t.z), m, s, y, self._act_range(op, y))

    def _add_sub(self, op, ins, sign):
        v = self._float_binary(op, ins, np.add if sign > 0 else np.subtract)
        if v is not None:
            return v
        a_t, b_t, y, a, b = self._binary_int8(op, ins)
        left = 20
        twice = 2.0 * np.float64(max(np.float32(a_t.s), np.float32(b_t.s)))
        m1, s1 = _qm(np.float64(a_t.s) / twice)
        m2, s2 = _qm(np.float64(b_t.s) / twice)
        mo, so = _qm(twice / (np.float64(1 << left) * np.float64(y.s)))
        sa = multiply_by_quantized_multiplier((a - a_t.z) << left, m1, s1)
        sb = multiply_by_quantized_multiplier((b - b_t.z) << left, m2, s2)
        return self._requant(sa + sign * sb, mo, so, y, self._act_range(op, y))

    def _op_add(self, op, ins, layer):
        return self._add_sub(op, ins, 1)

    def _op_sub(self, op, ins, layer):
        return self._add_sub(op, ins, -1)

    def _same_q(self, op, n_in):
        ts = [self._t(op, k) for k in range(n_in)] + [self._t(op, 0, out=True)]
        self._require_int8(*ts)
        if len({(t.s, t.z) for t in ts}) != 1:
            raise UnsupportedOp("inputs and output with different quantization")

    def _op_minimum(self, op, ins, layer):
        v = self._float_binary(op, ins, np.minimum)
        if v is not None:
            return v
        self._same_q(op, 2)
        return np.minimum(ins[0], ins[1]).astype(np.int8)

    def _op_maximum(self, op, ins, layer):
        v = self._float_binary(op, ins, np.maximum)
        if v is not None:
            return v
        self._same_q(op, 2)
        return np.maximum(ins[0], ins[1]).astype(np.int8)

    def _relu(self, op, ins, act):
        x_t, y = self._t(op, 0), self._t(op, 0, out=True)
        self._require_int8(x_t, y)
        m, s = _qm(np.float64(x_t.s) / np.float64(y.s))
        lo, hi = self._K.activation_range(act, y.s, y.z)
        return self._requant(ins[0].astype(np.int64) - x_t.z, m, s, y, (lo, hi))

    def _op_relu(self, op, ins, layer):
        return self._relu(op, ins, "RELU")

    def _op_relu6(self, op, ins, layer):
        return self._relu(op, ins, "RELU6")

    def _op_relu_n1_to_1(self, op, ins, layer):
        return self._relu(op, ins, "RELU_N1_TO_1")

    def _op_pad(self, op, ins, layer):
        y = self._t(op, 0, out=True)
        pads = np.asarray(ins[1]).reshape(-1, 2)
        fill = ins[2].reshape(()) if len(ins) > 2 and ins[2] is not None else (y.z if y.dtype == np.int8 else 0)
        return np.pad(ins[0], [tuple(int(v) for v in p) for p in pads], constant_values=fill)

    _op_padv2 = _op_pad

    def _op_concatenation(self, op, ins, layer):
        self._same_q(op, len(ins))
        x = np.concatenate(ins, axis=op.builtinOptions.axis)
        act = self._act_range(op, self._t(op, 0, out=True))
        return np.clip(x, act[0], act[1]).astype(np.int8)

    def _op_mean(self, op, ins, layer):
        x_t, y = self._t(op, 0), self._t(op, 0, out=True)
        self._require_int8(x_t, y)
        x = ins[0]
        axes = tuple(sorted({int(a) % x.ndim for a in np.asarray(ins[1]).reshape(-1)}))
        keep = bool(op.builtinOptions.keepDims) if op.builtinOptions is not None else False
        n = int(np.prod([x.shape[a] for a in axes]))
        s = (x.astype(np.int64) - x_t.z).sum(axis=axes, keepdims=keep)
        # TFLite: sum of (x - zp_in), one requantization by in_scale / out_scale / n
        m, sh = _qm(np.float64(x_t.s) / np.float64(y.s) / n)
        return np.clip(multiply_by_quantized_multiplier(s, m, sh) + y.z, -128, 127).astype(np.int8)

    def _op_softmax(self, op, ins, layer):
        # float exp instead of gemmlowp's fixed-point exp: at most 1 LSB from BUILTIN_REF.
        x_t, y = self._t(op, 0), self._t(op, 0, out=True)
        self._require_int8(x_t, y)
        beta = float(op.builtinOptions.beta) if op.builtinOptions is not None else 1.0
        x = ins[0].astype(np.float64)
        d = (x - x.max(axis=-1, keepdims=True)) * np.float64(x_t.s) * beta
        e = np.exp(d)
        p = e / e.sum(axis=-1, keepdims=True)
        v = _round_half_away(p / np.float64(y.s)) + y.z
        return np.clip(v, -128, 127).astype(np.int8)


def run_tflite(tflite_bytes, *x, impl="opt"):
    """Run an int8 TFLite model (first subgraph) on ``x`` with the packed kernels for binary /
    ternary CONV_2D / FULLY_CONNECTED layers and numpy int8 references for the other ops.
    Returns the output array (a list for several outputs).  See :class:`TFLiteRunner`."""
    return TFLiteRunner(tflite_bytes, impl=impl)(*x)
