"""Where an exported int8 model departs from Keras, op by op.

:func:`trace_divergence` runs the exported model in LiteRT with every tensor kept and compares each
op's int8 output with the same tensor of the inference form (:mod:`.inference`: what Keras computes,
in TensorFlow float), quantized to that tensor's scale and zero point. A layer where the share of
values a step or more off *jumps* marks a rounding one side makes and the other does not (a
structural mismatch to fix); a share that grows smoothly layer by layer is the model amplifying
one-step differences (e.g. values a hair from a low-bit rounding boundary). The *local* columns tell
the two apart directly: the layer computed by the inference form from the runtime's own values of
the layers it reads (dequantized), so that only that layer's own arithmetic can differ. A structural
mismatch is local; amplification is not (on EfficientNetB0, every convolution was under 1.4 % a
step off locally while 30-80 % were off in all).

An op's output is matched to the latest inference-form layer named in its tensor name (the
converter names a fused op's output after every layer it fused; Keras 3 scopes them ``<name>_1``),
and a layer's value is the output of the last op matched to it; the quantized input inside a layer
(its ``input_range`` stand-in) is not that layer's output and is left out, as are outputs that
name no layer and outputs that are not per-tensor int8 tensors. The int8 model runs with LiteRT's
builtin or reference kernels, or in TFLite Micro (not with XNNPACK, LiteRT's default delegate, which
keeps no intermediate tensors).
"""

import dataclasses

import numpy as np
import tensorflow as tf

from syq_tf.export import flatbuffer, inference
from syq_tf.export.runtime import litert_interpreter, quantize_input


@dataclasses.dataclass(frozen=True)
class TraceRow:
    """One op's output against the inference form: the share of int8 values off by at least one
    step and at least two steps, and the largest difference (in steps); ``local_*``: the same with
    the layer computed from the runtime's values of the layers it reads (None for a layer called more
    than once)."""

    op_index: int
    op: str
    layer: str
    off_by_1: float
    off_by_2: float
    max_steps: int
    local_off_by_1: float = None
    local_max_steps: int = None


TRACE_KERNELS = ("builtin", "ref", "tflm")


def trace_divergence(model, buffer, x, max_examples=32, kernels="builtin"):
    """:class:`TraceRow` for every matched op of the int8 TFLite model ``buffer`` exported from
    ``model``, on the first ``max_examples`` examples of ``x`` (float inputs, quantized as the
    model's int8 input; integer inputs such as token ids as they are). A model converted at a fixed
    batch (sequence models) runs one batch at a time.

    kernels: who computes the int8 model -- ``"builtin"`` (LiteRT's optimized builtin kernels, the
        default), ``"ref"`` (LiteRT's reference kernels) or ``"tflm"`` (TFLite Micro's interpreter
        keeping every tensor; ``buffer`` may then be a target-``tflm`` export with LUT-compressed
        weights). XNNPACK, LiteRT's default delegate, keeps no intermediate tensors."""
    if kernels not in TRACE_KERNELS:
        raise ValueError(f"trace_divergence: kernels={kernels!r}; allowed: {', '.join(map(repr, TRACE_KERNELS))}.")
    x = np.asarray(x)[:max_examples]
    if len(x) == 0:
        raise ValueError("trace_divergence: x has no examples.")
    ops, details, run = _tflm_runner(buffer, x) if kernels == "tflm" else _litert_runner(buffer, x, kernels)
    form = inference.build(model)  # a tfmot model's form is built in its own quantize_scope
    layers = [layer for layer in form.layers[1:] if _single_output(layer)]
    order = {layer.name: i for i, layer in enumerate(layers)}
    keras3 = not type(form).__module__.startswith("tf_keras")
    matched = []  # (op, its output's details, the latest layer the output names): the int8 outputs compared
    for op in ops:
        d = details.get(op["outputs"][0]) if op["outputs"] else None
        named = d is not None and _layers_named(d["name"], order, keras3)
        if named and d["dtype"] == np.int8 and d["quantization"][0]:
            matched.append((op, d, max(named, key=order.get)))

    outputs = run(sorted({d["index"] for _, d, _ in matched}))  # {tensor: [one array per invoke]}
    values = tf.keras.Model(form.inputs, [layer.output for layer in layers]).predict(x, verbose=0)
    values = dict(zip(order, values if isinstance(values, list) else [values]))
    compared = []  # (op, its output's details, layer, the runtime's int8 values)
    separate = {layer.name for layer in layers if _activation_apart(layer)}
    for op, d, layer in matched:
        if layer in separate and op["op_name"] not in ACTIVATION_OPS:
            continue  # the kernel op's output is the pre-activation; the layer's value is after it
        runtime = np.concatenate([np.atleast_1d(part) for part in outputs[d["index"]]]).astype(np.int64)
        if values[layer].size == runtime.size:
            compared.append((op, d, layer, runtime))
    # a layer's value is the output of the last op named after it (a fused FULLY_CONNECTED + ReLU
    # before the QUANTIZE of a low-bit activation's grid, or the MINIMUM of its clip: that op's output)
    last = {layer: op["index"] for op, _, layer, _ in compared}
    compared = [c for c in compared if last[c[2]] == c[0]["index"]]
    seen = {layer: (runtime.astype(np.float32) - d["quantization"][1]) * d["quantization"][0]
            for _, d, layer, runtime in compared}  # the runtime's value of each layer, dequantized
    by_name = {layer.name: layer for layer in form.layers}
    rows = []
    for op, d, layer, runtime in compared:
        unit = _grid_unit(op, details)
        steps = _steps(runtime, values[layer], *d["quantization"], unit)
        local = _local_value(by_name[layer], seen, form, x)
        local_steps = None if local is None else _steps(runtime, local, *d["quantization"], unit)
        rows.append(TraceRow(op["index"], op["op_name"], layer, float(np.mean(steps >= 1)),
                             float(np.mean(steps >= 2)), int(steps.max()),
                             None if local_steps is None else float(np.mean(local_steps >= 1)),
                             None if local_steps is None else int(local_steps.max())))
    return rows


def _fed(x, dtype, quantization):
    """``x`` as the model's input of ``dtype``: float inputs quantized to the int8 input, token ids
    as they are."""
    kind = np.dtype(dtype)
    if kind == np.int8:
        return quantize_input(x, *quantization)
    if kind.kind == "i":  # token ids: the model's own input
        if x.dtype.kind not in "iu":
            raise ValueError(f"trace_divergence: the model's input is {kind.name} (ids); x is {x.dtype.name}.")
        return x.astype(kind)
    raise ValueError(f"trace_divergence: the model's input is {kind.name}; the trace compares full-integer "
                     "int8 models (target 'litert' or 'tflm') with int8 or integer (token id) inputs.")


def _batch(fixed, x):
    """The examples one invoke takes: all of ``x``, or the model's fixed batch ``fixed``."""
    if fixed is None:
        return len(x)
    if len(x) % fixed:
        raise ValueError(f"trace_divergence: the model takes batches of {fixed}; give a multiple of {fixed} "
                         f"examples (got {len(x)}).")
    return fixed


def _litert_runner(buffer, x, kernels):
    """(ops, {tensor index: details}, run) of LiteRT's interpreter with ``kernels`` keeping every
    tensor; ``run(indices)`` invokes it on ``x`` and returns those tensors' values per invoke."""
    if "TFLM_DECODE" in flatbuffer.op_names(bytes(buffer)):
        raise ValueError(f"trace_divergence: the model is a target-'tflm' export (LUT-compressed weights decoded "
                         f"by TFLM_DECODE ops), which LiteRT cannot run: kernels='tflm' traces it (kernels="
                         f"{kernels!r} takes the 'litert' export).")
    interpreter = litert_interpreter(buffer, kernels=kernels, keep_tensors=True)
    inp = interpreter.get_input_details()[0]
    fed = _fed(x, inp["dtype"], inp["quantization"])
    batch = _batch(None if inp["shape_signature"][0] == -1 else int(inp["shape"][0]), x)
    if inp["shape_signature"][0] == -1:
        interpreter.resize_tensor_input(inp["index"], [batch, *x.shape[1:]])
    interpreter.allocate_tensors()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}

    def invoke(values):
        interpreter.set_tensor(inp["index"], values)
        interpreter.invoke()

    run = _batch_runner(fed, batch, invoke, interpreter.get_tensor)
    return interpreter._get_ops_details(), details, run  # noqa: SLF001  (the only listing of ops)


def _tflm_runner(buffer, x):
    """As :func:`_litert_runner`, for TFLite Micro's interpreter keeping every tensor (ops and
    tensors read from the flatbuffer: TFLM lists neither)."""
    from syq_tf.export import tflm  # noqa: PLC0415  (tflite-micro only when asked for)

    model = flatbuffer.read(bytes(buffer))
    graph = model.subgraphs[0]
    details = {}
    for index, tensor in enumerate(graph.tensors):
        q = tensor.quantization
        scales = [] if q is None or q.scale is None else list(q.scale)
        zeros = [] if q is None or q.zeroPoint is None else list(q.zeroPoint)
        per_tensor = len(scales) == 1 and len(zeros) == 1
        details[index] = {"index": index, "name": (tensor.name or b"").decode(errors="replace"),
                          "dtype": flatbuffer.numpy_type(tensor),
                          "quantization": (float(scales[0]), int(zeros[0])) if per_tensor else (0.0, 0),
                          "shape": np.array(tensor.shape if tensor.shape is not None else [], np.int32)}
    ops = [{"index": i, "op_name": flatbuffer.op_name(model, op), "inputs": [int(t) for t in op.inputs],
            "outputs": [int(t) for t in op.outputs]} for i, op in enumerate(graph.operators)]
    inp = details[int(graph.inputs[0])]
    fed = _fed(x, inp["dtype"], inp["quantization"])
    batch = _batch(int(inp["shape"][0]) if len(inp["shape"]) else 1, x)
    interpreter = tflm.tflm_interpreter(buffer, keep_tensors=True)

    def invoke(values):
        interpreter.set_input(values, 0)
        interpreter.invoke()

    run = _batch_runner(fed, batch, invoke, lambda index: interpreter.GetTensor(index, 0)["tensor_data"])
    return ops, details, run


def _batch_runner(fed, batch, invoke, read):
    """``run(indices)`` -> ``{tensor index: [its values after each invoke]}``: ``invoke`` on each
    ``batch`` of the fed inputs, then a copy of ``read(index)`` of every tensor asked for."""

    def run(indices):
        out = {index: [] for index in indices}
        for start in range(0, len(fed), batch):
            invoke(fed[start:start + batch])
            for index, parts in out.items():
                parts.append(np.array(read(index)))  # a copy: the interpreter reuses its buffers
        return out

    return run


def _steps(runtime, expected, scale, zero, unit):
    """|the runtime's int8 values - ``expected`` quantized to the tensor's scale and zero point|, in
    steps of the grid (``unit``: a low-bit grid held at a finer scale counts its own levels)."""
    reference = np.clip(np.floor(np.reshape(expected, runtime.shape) / scale + 0.5) + zero, -128, 127)
    steps = np.abs(runtime - reference.astype(np.int64))
    return np.round(steps / unit).astype(np.int64) if unit > 1 else steps


def _local_value(layer, seen, form, x):
    """``layer``'s value in the inference form computed from ``seen`` (the runtime's dequantized values
    of the traced layers) where it reads a traced layer -- through the untraced layers in between
    (an output range, a reshape) -- and from ``x`` where it reads the model's input; None for a
    layer called more than once."""
    if len(layer._inbound_nodes) != 1:  # noqa: SLF001  (a layer's calls: Keras 2 and 3 alike)
        return None
    inputs = {id(t) for t in form.inputs}
    frontier, values, stack, visited = [], [], [layer._inbound_nodes[0]], set()  # noqa: SLF001
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        for tensor in tf.nest.flatten(node.input_tensors):  # Keras 2: a lone tensor as such
            source, node_index, _ = tensor._keras_history  # noqa: SLF001  (the call that computed it)
            if id(tensor) in inputs:
                value = x
            elif source.name in seen and source is not layer:
                value = seen[source.name]  # in TFLite's shape: a squeezed (N, C) for Keras's (N, 1, 1, C)
                if None not in tuple(tensor.shape)[1:]:
                    value = value.reshape((len(value), *tuple(tensor.shape)[1:]))
            else:
                stack.append(source._inbound_nodes[node_index])  # noqa: SLF001
                continue
            if all(t is not tensor for t in frontier):
                frontier.append(tensor)
                values.append(value)
    part = tf.keras.Model(frontier, layer.output)  # the form's layers between them, weights shared
    out = part(values, training=False)
    return out.numpy() if hasattr(out, "numpy") else np.asarray(out)


# Activations TFLite fuses into the op before them (no op of their own), and the ops of the others.
FUSED_ACTIVATIONS = ("linear", "relu", "relu6")
ACTIVATION_OPS = ("SOFTMAX", "LOGISTIC", "TANH", "HARD_SWISH", "GELU", "ELU", "LEAKY_RELU", "MUL")


def _activation_apart(layer):
    """True for a layer whose activation TFLite computes as an op of its own after the layer's op (a
    Dense with ``activation="softmax"``): the layer's op then outputs the pre-activation, which its
    value is not (it was compared as such: 98 % of a classifier's logits 'off' its probabilities)."""
    activation = getattr(getattr(layer, "inner", layer), "activation", None)  # a stand-in: its plain layer's
    name = getattr(activation, "__name__", activation)
    return activation is not None and name not in FUSED_ACTIVATIONS


def _grid_unit(op, details):
    """``m`` for a QUANTIZE multiplying an int8 grid by a whole ``m > 1`` onto a finer scale (a low-bit
    activation's levels, :func:`syq_tf.export.flatbuffer.round_to_grids`), else 1."""
    if op["op_name"] != "QUANTIZE" or op["inputs"][0] not in details:
        return 1
    (s_in, z_in), (s_out, z_out) = details[op["inputs"][0]]["quantization"], details[op["outputs"][0]]["quantization"]
    if not s_in or not s_out or z_in != z_out:
        return 1
    m = round(s_in / s_out)
    return m if m > 1 and abs(s_in / s_out - m) < 1e-4 * m else 1


def _layers_named(tensor_name, layers, keras3):
    """The inference-form layers a converted tensor's name mentions. Keras 3 scopes a layer's ops as
    ``<name>_1``; a part inside a layer's input stand-in (``input_range``: the quantized input, not
    the layer's output) names no layer."""
    named = []
    for part in tensor_name.split(";"):
        segments = part.split("/")
        if any(seg.startswith("input_range") for seg in segments):
            continue
        for seg in segments:
            if keras3 and seg.endswith("_1"):
                seg = seg[:-2]
            if seg in layers:
                named.append(seg)
    return named


def _single_output(layer):
    try:
        return not isinstance(layer.output, (list, tuple))
    except (AttributeError, ValueError):
        return False
