"""Read the binary/ternary CONV_2D and FULLY_CONNECTED layers of an exported int8 TFLite flatbuffer
as packed layers (weights, bias, zero points, TFLite's requantization, fused activation, stride,
padding).  A whole-model runner is not written yet: run each PackedLayer on its int8 input."""

import numpy as np
from ai_edge_litert import schema_py_generated as schema

_OPS = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_ACTS = {v: k for k, v in vars(schema.ActivationFunctionType).items() if not k.startswith("_")}
_DTYPES = {schema.TensorType.INT8: np.int8, schema.TensorType.INT32: np.int32,
           schema.TensorType.FLOAT32: np.float32, schema.TensorType.UINT8: np.uint8,
           schema.TensorType.INT64: np.int64}


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
    return np.frombuffer(np.asarray(data, np.uint8).tobytes(), _DTYPES[t.type]).reshape(t.shape)


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
    if x_t.type != schema.TensorType.INT8 or w_t.type != schema.TensorType.INT8:
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


def packed_layers(model_bytes):
    """{op index: PackedLayer} for every int8 CONV_2D / FULLY_CONNECTED of the first subgraph
    whose weights are a binary or ternary codebook (layers with other int8 weights are left out)."""
    from syq_tf import kernels as K

    model = _model(model_bytes)
    sub = model.subgraphs[0]
    layers = {}
    for idx, op in enumerate(sub.operators):
        name = _op_name(model, op)
        if name not in ("CONV_2D", "FULLY_CONNECTED"):
            continue
        prm = _layer_params(model, sub, op)
        if prm is None:
            continue
        try:
            layers[idx] = K.PackedLayer.from_int8(
                "conv" if name == "CONV_2D" else "fc", prm["w"], prm["multiplier"], prm["shift"],
                prm["bias"], prm["input_zero_point"], prm["output_zero_point"], prm["act_range"],
                prm["stride"], prm["padding"], name=f"{name.lower()}_{idx}")
        except ValueError:
            continue  # not a binary/ternary codebook
    return layers
