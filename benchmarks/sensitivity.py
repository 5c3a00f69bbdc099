"""A trained model's own sensitivity: how often Keras' top-1 (or decision) changes under
perturbations no larger than those by which any other arithmetic of the same model differs from
TensorFlow's float32. It bounds the agreement a runtime can reach: a model whose answers move when
its BatchNorm variances move by a part in a million cannot be matched by an int8 runtime whose every
pre-activation differs from Keras' by its int32 bias rounding (and float32 by its own rounding).

Frontend-neutral (numpy and the model's variables): used by ``models.py`` (Keras 2) and
``keras3_models.py`` (Keras 3). ``predict`` is a callable from inputs to outputs, one row per example.
"""

import numpy as np

# relative moves of the normalized pre-activations (float32's unit roundoff is 6e-8)
VARIANCE_MOVES = (1e-6, 1e-5, 1e-4)


def input_step_outputs(predict, x, scale, seed=0):
    """Outputs on inputs moved by under half an int8 input step ``scale`` (uniform on +-scale/2):
    what quantizing the input alone may do."""
    noise = np.random.default_rng(seed).uniform(-0.5, 0.5, x.shape).astype(np.float32) * np.float32(scale)
    return predict(x + noise)


def variance_moved_outputs(model, predict, x, relative, seed=0):
    """Outputs with every BatchNormalization's moving variance multiplied, per channel, by
    ``1 + 2 relative u`` (u uniform on [-1, 1]), so that each normalized pre-activation moves by at
    most ``relative`` of itself; the variances are restored afterwards, also on error."""
    variables = [v for v in model.weights if "moving_variance" in v.name]
    if not variables:
        raise ValueError("variance_moved_outputs: the model has no BatchNormalization moving variance")
    saved = [v.numpy() for v in variables]
    rng = np.random.default_rng(seed)
    try:
        for v, s in zip(variables, saved):
            v.assign((s * (1.0 + 2.0 * relative * rng.uniform(-1.0, 1.0, s.shape))).astype(s.dtype))
        return predict(x)
    finally:
        for v, s in zip(variables, saved):
            v.assign(s)


def floor(model, predict, x, reference, agree, buffer):
    """``{name: figure}`` for the int8 flatbuffer ``buffer`` exported from ``model``: the agreement with
    ``reference`` (Keras on ``x``) under each perturbation -- half a step of the flatbuffer's int8 input
    (float inputs quantized to int8) and :data:`VARIANCE_MOVES` (models with BatchNormalization) --
    and the flatbuffer's :func:`bias_rounding`."""
    from syq_tf.export import flatbuffer

    out = {}
    if x.dtype.kind == "f" and flatbuffer.io_type(buffer, "input") == "INT8":
        scale, _ = flatbuffer.io_quantization(buffer, "input")
        out["keras_half_step_input_noise_agreement"] = agree(reference, input_step_outputs(predict, x, scale))
    if any("moving_variance" in v.name for v in model.weights):
        out["keras_bn_variance_moved_agreement"] = {
            f"{r:g}": agree(reference, variance_moved_outputs(model, predict, x, r)) for r in VARIANCE_MOVES}
    out["bias_rounding_output_steps"] = bias_rounding(buffer)
    return out


KERNEL_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D")


def bias_rounding(buffer):
    """What int8 TFLite's own format costs before any kernel runs: per kernel op with an int32 bias
    and an int8 output, the largest rounding of that bias (half its scale, input scale x weight scale,
    per channel) in steps of the op's output. Returns ``{"ops", "median", "max"}`` over the ops' largest
    values (None without such ops). A runtime whose pre-activations differ from Keras' by this much
    flips a level wherever Keras' pre-activation lies nearer a rounding boundary."""
    from syq_tf.export import flatbuffer

    model = flatbuffer.read(bytes(buffer))
    graph = model.subgraphs[0]
    worst = []
    for op in graph.operators:
        name = flatbuffer.op_name(model, op)
        position = flatbuffer.io_positions(name)[1]
        if name not in KERNEL_OPS or len(op.inputs) <= position or op.inputs[position] < 0:
            continue
        bias, out = graph.tensors[op.inputs[position]].quantization, graph.tensors[op.outputs[0]].quantization
        if bias is None or bias.scale is None or out is None or out.scale is None or not len(out.scale):
            continue
        worst.append(0.5 * float(np.max(bias.scale)) / float(out.scale[0]))
    if not worst:
        return None
    return {"ops": len(worst), "median": float(np.median(worst)), "max": float(np.max(worst))}
