"""A trained model's own sensitivity: how often Keras' top-1 (or decision) changes under
perturbations no larger than those by which any other arithmetic of the same model differs from
TensorFlow's float32. It bounds the agreement a runtime can reach: a model whose answers move when
its BatchNorm variances move by a part in a million cannot be matched by an int8 runtime whose every
pre-activation differs from Keras' by its int32 bias rounding (and float32 by its own rounding).

Beside these, :func:`floor` runs the flatbuffer on LiteRT's builtin kernels: they (and TFLite Micro,
which uses the reference ones) requantize with two roundings where XNNPACK, LiteRT's default, rounds
once (``tests/test_runtime_kernels.py``); a value within about half an accumulator unit -- the bias
rounding figure below -- under a rounding boundary goes up.

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
    the agreement of LiteRT's builtin kernels with ``reference``, and the flatbuffer's :func:`bias_rounding`."""
    from syq_tf.export import flatbuffer
    from syq_tf.export.runtime import litert_predict

    out = {}
    if x.dtype.kind == "f" and flatbuffer.io_type(buffer, "input") == "INT8":
        scale, _ = flatbuffer.io_quantization(buffer, "input")
        out["keras_half_step_input_noise_agreement"] = agree(reference, input_step_outputs(predict, x, scale))
    if any("moving_variance" in v.name for v in model.weights):
        out["keras_bn_variance_moved_agreement"] = {
            f"{r:g}": agree(reference, variance_moved_outputs(model, predict, x, r)) for r in VARIANCE_MOVES}
    out["litert_builtin_kernels_agreement"] = agree(
        reference, litert_predict(buffer, x, kernels="builtin").reshape(reference.shape))
    out["bias_rounding_output_steps"] = bias_rounding(buffer)
    return out


def describe(figures):
    """The :func:`floor` figures present in the dict ``figures`` as one ``"; "``-led phrase."""
    text = ""
    if "keras_half_step_input_noise_agreement" in figures:
        text += f"; Keras vs Keras on inputs moved by under half an input step {figures['keras_half_step_input_noise_agreement']:.4f}"
    if "keras_bn_variance_moved_agreement" in figures:
        text += "; with BatchNorm variances moved by " + ", ".join(
            f"{r}: {a:.4f}" for r, a in figures["keras_bn_variance_moved_agreement"].items())
    if figures.get("litert_builtin_kernels_agreement") is not None:
        text += f"; LiteRT's builtin kernels (two roundings, as TFLM) {figures['litert_builtin_kernels_agreement']:.4f}"
    if figures.get("bias_rounding_output_steps"):
        text += "; int32 bias rounding up to {median:.2g} (median op) / {max:.2g} (worst op) output steps".format(
            **figures["bias_rounding_output_steps"])
    return text


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
