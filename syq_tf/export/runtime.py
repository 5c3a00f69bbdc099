"""Run an exported int8 model with the LiteRT interpreter and compare it with Keras."""

import numpy as np


def litert_predict(buffer, x, batch_size=256, kernels="xnnpack"):
    """Float outputs of a TFLite model: int8 inputs are quantized and int8 outputs dequantized.
    ``kernels``: as :func:`litert_interpreter` ('xnnpack', LiteRT's default; 'builtin' and 'ref'
    requantize as TFLite Micro does, with two roundings where XNNPACK rounds once).

    A model with a fixed batch dimension (recurrent models: the fused LSTM keeps its state in
    variable tensors) is run one batch at a time with its state reset before every batch."""
    interpreter = litert_interpreter(buffer, kernels)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    fixed = inp["shape_signature"][0] != -1
    if fixed:
        batch_size = int(inp["shape"][0])
        interpreter.allocate_tensors()
    x = np.asarray(x)
    x = x.astype(np.float32) if x.dtype.kind == "f" or inp["dtype"] in (np.int8, np.float32) else x
    results = []
    current = None
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        if fixed and len(chunk) != batch_size:
            raise ValueError(f"litert_predict: the model takes batches of exactly {batch_size}; got "
                             f"{len(x)} examples (not a multiple).")
        if not fixed and current != len(chunk):
            interpreter.resize_tensor_input(inp["index"], [len(chunk), *chunk.shape[1:]])
            interpreter.allocate_tensors()
            current = len(chunk)
        if inp["dtype"] == np.int8:
            chunk = quantize_input(chunk, in_scale, in_zero)
        else:
            chunk = chunk.astype(inp["dtype"])
        if fixed:
            interpreter.reset_all_variables()
        interpreter.set_tensor(inp["index"], chunk)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        if out["dtype"] == np.int8:
            y = (y.astype(np.float32) - out_zero) * out_scale
        results.append(y)
    return np.concatenate(results)


def quantize_input(x, scale, zero):
    """Float inputs as a model's int8 input (round half up, as LiteRT's quantize)."""
    return np.clip(np.floor(np.asarray(x, np.float32) / scale + 0.5) + zero, -128, 127).astype(np.int8)


KERNELS = ("xnnpack", "builtin", "ref")


def litert_interpreter(buffer, kernels="xnnpack", num_threads=1, keep_tensors=False):
    """A LiteRT interpreter: ``kernels`` 'xnnpack' (the default XNNPACK CPU delegate where it
    takes the ops, builtin kernels elsewhere), 'builtin' (optimized builtin kernels, no delegate)
    or 'ref' (reference kernels). ``keep_tensors``: keep every intermediate tensor readable after
    ``invoke`` (for tracing; not with a delegate, which does not keep them)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: PLC0415

    resolvers = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                 "ref": OpResolverType.BUILTIN_REF}
    if kernels not in resolvers:
        raise ValueError(f"litert_interpreter: kernels={kernels!r}; allowed: {KERNELS}")
    return Interpreter(model_content=bytes(buffer), num_threads=num_threads,
                       experimental_op_resolver_type=resolvers[kernels],
                       experimental_preserve_all_tensors=keep_tensors)


def litert_int8_outputs(buffer, x_int8, kernels="xnnpack"):
    """Raw int8 outputs, one row per example, of a model with int8 input run on a batch (a model
    with a fixed batch dimension, e.g. target 'tflm' with a TRANSPOSE_CONV, one batch at a time)."""
    interpreter = litert_interpreter(buffer, kernels)
    inp = interpreter.get_input_details()[0]
    x_int8 = np.asarray(x_int8).astype(inp["dtype"])
    batch = int(inp["shape"][0]) if inp["shape_signature"][0] != -1 else len(x_int8)
    if batch != len(x_int8) and len(x_int8) % batch:
        raise ValueError(f"litert_int8_outputs: the model takes batches of exactly {batch}; got {len(x_int8)} "
                         "examples (not a multiple).")
    interpreter.resize_tensor_input(inp["index"], [batch, *x_int8.shape[1:]])
    interpreter.allocate_tensors()
    out = []
    for start in range(0, len(x_int8), max(batch, 1)):
        interpreter.set_tensor(inp["index"], x_int8[start : start + batch])
        interpreter.invoke()
        out.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).reshape(batch, -1))
    return np.concatenate(out) if out else np.zeros((0, 0), np.int8)


def keras_outputs(model, x, batch_size=256):
    """The Keras model's outputs on ``x``, one row per example."""
    return model.predict(x, batch_size=batch_size, verbose=0)


def agreement(keras_outputs, runtime_outputs, labels=None):
    """Top-1 agreement between two models' outputs, and each one's accuracy if labels are given."""
    k = np.argmax(keras_outputs, axis=-1)
    r = np.argmax(runtime_outputs, axis=-1)
    report = {"examples": int(len(k)), "top1_agreement": float(np.mean(k == r)),
              "max_abs_diff": float(np.max(np.abs(np.asarray(keras_outputs, np.float64) - runtime_outputs)))}
    if labels is not None:
        labels = np.asarray(labels).reshape(k.shape)
        report["keras_accuracy"] = float(np.mean(k == labels))
        report["runtime_accuracy"] = float(np.mean(r == labels))
    return report
