"""Whole-model int8 TFLite runner with packed binary/ternary CONV_2D / FULLY_CONNECTED layers.

:func:`packed_layers` reads the binary/ternary CONV_2D and FULLY_CONNECTED layers of an exported
int8 flatbuffer as :class:`~syq_tf.kernels.PackedLayer` (weights, bias, zero points, TFLite's
requantization, fused activation, stride, padding).

:class:`TFLiteRunner` / :func:`run_tflite` execute the first subgraph op by op: codebook layers
with the packed C kernels (1/8 or 1/4 of the int8 weight bytes), every other supported op with an
int8 numpy reference written after LiteRT's ``BUILTIN_REF`` kernels (same integer arithmetic:
gemmlowp double-rounding requantization, TFLite's multiplier derivation), so outputs are
bit-exact with ``OpResolverType.BUILTIN_REF`` except SOFTMAX (float exp here, gemmlowp fixed-point
exp there: at most 1 LSB apart).  Unsupported ops raise :class:`UnsupportedOp` naming the op.
"""

import numpy as np
from syq_tf.export import flatbuffer as _flatbuffer
from syq_tf.export.codebook import unpack_bits
from ai_edge_litert import schema_py_generated as schema

_OPS = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_ACTS = {v: k for k, v in vars(schema.ActivationFunctionType).items() if not k.startswith("_")}
_DTYPES = {schema.TensorType.INT8: np.int8, schema.TensorType.INT32: np.int32,
           schema.TensorType.FLOAT32: np.float32, schema.TensorType.UINT8: np.uint8,
           schema.TensorType.INT64: np.int64, schema.TensorType.INT16: np.int16,
           schema.TensorType.BOOL: np.bool_}


class UnsupportedOp(NotImplementedError):
    """An op (or an op variant, e.g. a dtype) the whole-model runner cannot execute."""


def _model(buf):
    buf = bytes(buf)
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (file identifier is not 'TFL3')")
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(buf), 0))


def _op_name(model, op):
    code = model.operatorCodes[op.opcodeIndex]
    return _OPS.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")


def _const(model, t):
    data = model.buffers[t.buffer].data
    if data is None or len(data) == 0:
        return None
    shape = [] if t.shape is None else list(t.shape)
    if t.type == schema.TensorType.INT4:  # packed INT4 weights: decoded to the int8 values they hold
        return unpack_bits(np.asarray(data, np.uint8).tobytes(), 4, int(np.prod(shape))).reshape(shape)
    if t.type not in _DTYPES:
        raise UnsupportedOp(f"constant tensor {t.name!r} has TFLite type {t.type}, which run_tflite cannot read")
    return np.frombuffer(np.asarray(data, np.uint8).tobytes(), _DTYPES[t.type]).reshape(shape)


def _qparams(t):
    q = t.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None, None
    return np.asarray(q.scale, np.float32), np.asarray(q.zeroPoint, np.int64)


def _layer_params(model, sub, op):
    """(w_int8, multiplier, shift, bias, in_zp, out_zp, act_range, stride, padding) of a CONV_2D /
    FULLY_CONNECTED int8 op, or None when it is not int8 with constant weights."""
    from syq_tf import kernels as K

    name = _op_name(model, op)
    x_t, w_t = sub.tensors[op.inputs[0]], sub.tensors[op.inputs[1]]
    y_t = sub.tensors[op.outputs[0]]
    if x_t.type != schema.TensorType.INT8 or w_t.type not in (schema.TensorType.INT8, schema.TensorType.INT4):
        return None
    w = _const(model, w_t)
    if w is None:
        return None
    bias = None
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        bias = _const(model, sub.tensors[op.inputs[2]])
        bias = None if bias is None else bias.astype(np.int32)
    (xs, xz), (ws, _), (ys, yz) = _qparams(x_t), _qparams(w_t), _qparams(y_t)
    opts = op.builtinOptions
    act = _ACTS.get(opts.fusedActivationFunction, "?") if opts is not None else "NONE"
    act_range = K.activation_range(act, ys[0], yz[0])
    out_c = w.shape[0]
    if name == "CONV_2D":
        if opts.dilationHFactor != 1 or opts.dilationWFactor != 1:
            return None
        mult, shift = K.conv_multipliers(xs[0], ws, ys[0], out_c)
        stride = (opts.strideH, opts.strideW)
        padding = "SAME" if opts.padding == schema.Padding.SAME else "VALID"
    else:
        mult, shift = K.fc_multipliers(xs[0], ws, ys[0], out_c)
        stride, padding = (1, 1), "VALID"
    return dict(w=w, multiplier=mult, shift=shift, bias=bias, input_zero_point=int(xz[0]),
                output_zero_point=int(yz[0]), act_range=act_range, stride=stride, padding=padding)


def _packed_layer(model, sub, idx, op):
    from syq_tf import kernels as K

    name = _op_name(model, op)
    if name not in ("CONV_2D", "FULLY_CONNECTED"):
        return None
    prm = _layer_params(model, sub, op)
    if prm is None:
        return None
    if name == "FULLY_CONNECTED" and getattr(op.builtinOptions, "weightsFormat", 0) != 0:
        return None
    try:
        return K.PackedLayer.from_int8(
            "conv" if name == "CONV_2D" else "fc", prm["w"], prm["multiplier"], prm["shift"],
            prm["bias"], prm["input_zero_point"], prm["output_zero_point"], prm["act_range"],
            prm["stride"], prm["padding"], name=f"{name.lower()}_{idx}")
    except ValueError:
        return None  # not a binary/ternary codebook


@_flatbuffer._reader
def packed_layers(model_bytes):
    """{op index: PackedLayer} for every int8 CONV_2D / FULLY_CONNECTED of the first subgraph
    whose weights are a binary or ternary codebook (layers with other int8 weights are left out)."""
    model = _model(model_bytes)
    sub = model.subgraphs[0]
    layers = {}
    for idx, op in enumerate(sub.operators):
        layer = _packed_layer(model, sub, idx, op)
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
    from syq_tf import kernels as K

    return K.quantize_multiplier(float(real))


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
    def __init__(self, t):
        self.name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        self.type = t.type
        # INT4 weights are decoded to int8 when read (_const): the same arithmetic as int8 weights
        self.dtype = np.int8 if t.type == schema.TensorType.INT4 else _DTYPES.get(t.type)
        self.shape = [] if t.shape is None else [int(d) for d in t.shape]
        s, z = _qparams(t)
        self.scale, self.zp = s, z
        self.s = float(s[0]) if s is not None else None
        self.z = int(z[0]) if z is not None else 0


class TFLiteRunner:
    # (the constructor parses an untrusted file: any inconsistency becomes a ValueError)
    """Execute an int8 TFLite flatbuffer op by op (first subgraph).

    impl: 'opt' (optimized packed kernels), 'ref' or 'portable' for the packed layers; other ops
    always use the numpy int8 reference.  ``packed=False`` runs codebook layers with the numpy
    int8 reference as well (for comparisons)."""

    @_flatbuffer._reader
    def __init__(self, tflite_bytes, impl="opt", packed=True):
        from syq_tf import kernels as K

        self.impl = impl
        self.model = model = _model(tflite_bytes)
        if len(model.subgraphs) != 1:
            raise UnsupportedOp(f"models with {len(model.subgraphs)} subgraphs (control flow) are not supported")
        self.sub = sub = model.subgraphs[0]
        self.tensors = [_Tensor(t) for t in sub.tensors]
        self.consts = {}
        for i, t in enumerate(sub.tensors):
            c = _const(model, t)
            if c is not None:
                self.consts[i] = c
        self.inputs, self.outputs = list(sub.inputs), list(sub.outputs)
        self.ops = []  # (index, name, op, packed layer or None)
        self.packed = {}
        for idx, op in enumerate(sub.operators):
            name = _op_name(model, op)
            if not hasattr(self, "_op_" + name.lower()):
                raise UnsupportedOp(
                    f"op {idx} {name} is not supported by syq_tf.kernels.run_tflite (supported: "
                    + ", ".join(sorted(n[4:].upper() for n in dir(self) if n.startswith("_op_"))) + ")")
            layer = _packed_layer(model, sub, idx, op) if packed else None
            if layer is not None and layer.weight_bytes >= int(np.prod(layer.shape)):
                layer = None  # e.g. in_c = 1: every int8 kernel is a "pixel codebook", packing costs more
            if layer is not None:
                self.packed[idx] = layer
            self.ops.append((idx, name, op, layer))
        self._K = K

    # -- public --------------------------------------------------------------------------------
    def __call__(self, *xs):
        if len(xs) != len(self.inputs):
            raise ValueError(f"model has {len(self.inputs)} inputs, got {len(xs)}")
        env = dict(self.consts)
        for i, x in zip(self.inputs, xs):
            t = self.tensors[i]
            x = np.asarray(x)
            if t.dtype is not None and x.dtype != t.dtype:
                if t.dtype == np.int8 and x.dtype.kind in "iu" and (x.min() < -128 or x.max() > 127):
                    raise ValueError(f"input '{t.name}' is int8; got values outside -128..127")
                x = x.astype(t.dtype)
            env[i] = x
        for idx, name, op, layer in self.ops:
            ins = [env[j] if j >= 0 else None for j in op.inputs]
            try:
                outs = getattr(self, "_op_" + name.lower())(op, ins, layer)
            except UnsupportedOp as err:
                raise UnsupportedOp(f"op {idx} {name}: {err}") from None
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
        act = _ACTS.get(getattr(opts, "fusedActivationFunction", 0), "?") if opts is not None else "NONE"
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
                raise UnsupportedOp(f"tensor '{t.name}' has type {t.dtype}, only int8 is supported")

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
        mult, shift = self._K.conv_multipliers(x_t.s, w_t.scale, y.s, oc)
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
        mult, shift = self._K.conv_multipliers(x_t.s, w_t.scale, y.s, oc)
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
        mult, shift = self._K.fc_multipliers(x_t.s, w_t.scale, y.s, out_c)
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
        if -1 not in shape and int(np.prod(shape)) != x.size and shape and shape[0] == 1:
            shape[0] = -1  # static batch 1, dynamic batch at run time
        return x.reshape(shape)

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
        act = _ACTS.get(getattr(opts, "fusedActivationFunction", 0), "?") if opts is not None else "NONE"
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
        x_t, y = self._t(op, 0), self._t(op, 0, out=True)
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
