"""Where an exported int8 model departs from Keras, op by op.

:func:`trace_divergence` runs the exported model in LiteRT with every tensor kept and compares each
op's int8 output with the same tensor of the inference form (:mod:`.inference`: what Keras computes,
in TensorFlow float), quantized to that tensor's scale and zero point. A layer where the share of
values a step or more off *jumps* marks a rounding one side makes and the other does not (a
structural mismatch to fix); a share that grows smoothly layer by layer is the model amplifying
one-step differences (e.g. values a hair from a low-bit rounding boundary).

An op's output is matched to the latest inference-form layer named in its tensor name (the
converter names a fused op's output after every layer it fused; Keras 3 scopes them ``<name>_1``),
and a layer's value is the output of the last op matched to it; the quantized input inside a layer
(its ``input_range`` stand-in) is not that layer's output and is left out, as are outputs that
name no layer and outputs that are not per-tensor int8 tensors. The interpreter runs LiteRT's
builtin kernels (no delegate, which would not keep the intermediate tensors).
"""

import dataclasses

import numpy as np
import tensorflow as tf

from syq_tf.export import inference
from syq_tf.export.runtime import litert_interpreter, quantize_input


@dataclasses.dataclass(frozen=True)
class TraceRow:
    """One op's output against the inference form: the share of int8 values off by at least one
    step and at least two steps, and the largest difference (in steps)."""

    op_index: int
    op: str
    layer: str
    off_by_1: float
    off_by_2: float
    max_steps: int


def trace_divergence(model, buffer, x, max_examples=32):
    """:class:`TraceRow` for every matched op of the int8 TFLite model ``buffer`` exported from
    ``model``, on the first ``max_examples`` examples of ``x`` (float inputs, quantized as the
    model's int8 input; integer inputs such as token ids as they are). A model converted at a fixed
    batch (sequence models) runs one batch at a time."""
    x = np.asarray(x)[:max_examples]
    if len(x) == 0:
        raise ValueError("trace_divergence: x has no examples.")
    interpreter = litert_interpreter(buffer, kernels="builtin", keep_tensors=True)
    inp = interpreter.get_input_details()[0]
    kind = np.dtype(inp["dtype"])
    if kind == np.int8:
        fed = quantize_input(x, *inp["quantization"])
    elif kind.kind == "i":  # token ids: the model's own input
        if x.dtype.kind not in "iu":
            raise ValueError(f"trace_divergence: the model's input is {kind.name} (ids); x is {x.dtype.name}.")
        fed = x.astype(kind)
    else:
        raise ValueError(f"trace_divergence: the model's input is {kind.name}; the trace compares full-integer "
                         "int8 models (target 'litert' or 'tflm') with int8 or integer (token id) inputs.")
    if inp["shape_signature"][0] == -1:
        interpreter.resize_tensor_input(inp["index"], [len(x), *x.shape[1:]])
        batch = len(x)
    else:
        batch = int(inp["shape"][0])
        if len(x) % batch:
            raise ValueError(f"trace_divergence: the model takes batches of {batch}; give a multiple of {batch} "
                             f"examples (got {len(x)}).")
    interpreter.allocate_tensors()

    form = inference.build(model)  # a tfmot model's form is built in its own quantize_scope
    layers = [layer for layer in form.layers[1:] if _single_output(layer)]
    order = {layer.name: i for i, layer in enumerate(layers)}
    keras3 = not type(form).__module__.startswith("tf_keras")
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    matched = []  # (op, its output's details, the latest layer the output names): the int8 outputs compared
    for op in interpreter._get_ops_details():  # noqa: SLF001  (the only listing of ops and their tensors)
        d = details.get(op["outputs"][0]) if op["outputs"] else None
        named = d is not None and _layers_named(d["name"], order, keras3)
        if named and d["dtype"] == np.int8 and d["quantization"][0]:
            matched.append((op, d, max(named, key=order.get)))

    outputs = {d["index"]: [] for _, d, _ in matched}  # kept after every batch: only the compared ones
    for start in range(0, len(x), batch):
        interpreter.set_tensor(inp["index"], fed[start:start + batch])
        interpreter.invoke()
        for index, parts in outputs.items():
            parts.append(interpreter.get_tensor(index).copy())
    values = tf.keras.Model(form.inputs, [layer.output for layer in layers]).predict(x, verbose=0)
    values = dict(zip(order, values if isinstance(values, list) else [values]))
    rows = []
    separate = {layer.name for layer in layers if _activation_apart(layer)}
    for op, d, layer in matched:
        if layer in separate and op["op_name"] not in ACTIVATION_OPS:
            continue  # the kernel op's output is the pre-activation; the layer's value is after it
        scale, zero = d["quantization"]
        runtime = np.concatenate([np.atleast_1d(part) for part in outputs[d["index"]]]).astype(np.int64)
        expected = values[layer]
        if expected.size != runtime.size:
            continue
        reference = np.clip(np.floor(expected.reshape(runtime.shape) / scale + 0.5) + zero, -128, 127)
        steps = np.abs(runtime - reference.astype(np.int64))
        unit = _grid_unit(op, details)
        if unit > 1:  # a low-bit grid held at a finer scale: count its own levels
            steps = np.round(steps / unit).astype(np.int64)
        rows.append(TraceRow(op["index"], op["op_name"], layer, float(np.mean(steps >= 1)),
                             float(np.mean(steps >= 2)), int(steps.max())))
    # a layer's value is the output of the last op named after it (a fused FULLY_CONNECTED + ReLU
    # before the QUANTIZE of a low-bit activation's grid, or the MINIMUM of its clip: that op's output)
    last = {row.layer: row.op_index for row in rows}
    return [row for row in rows if last[row.layer] == row.op_index]


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
