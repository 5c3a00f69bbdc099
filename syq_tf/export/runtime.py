"""Run an exported int8 model with the LiteRT interpreter and compare it with Keras."""

import numpy as np


def litert_predict(buffer, x, batch_size=256):
    """Float outputs of an int8 TFLite model on float inputs (quantize in, dequantize out)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(buffer), num_threads=1)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    x = np.asarray(x, np.float32)
    results = []
    current = None
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        if current != len(chunk):
            interpreter.resize_tensor_input(inp["index"], [len(chunk), *chunk.shape[1:]])
            interpreter.allocate_tensors()
            current = len(chunk)
        if inp["dtype"] == np.int8:
            chunk = np.clip(np.floor(chunk / in_scale + 0.5) + in_zero, -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], chunk)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        if out["dtype"] == np.int8:
            y = (y.astype(np.float32) - out_zero) * out_scale
        results.append(y)
    return np.concatenate(results)


def agreement(keras_outputs, runtime_outputs, labels=None):
    """Top-1 agreement between two models' outputs, and each one's accuracy if labels are given."""
    k = np.argmax(keras_outputs, axis=-1)
    r = np.argmax(runtime_outputs, axis=-1)
    report = {"examples": int(len(k)), "top1_agreement": float(np.mean(k == r))}
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        report["keras_accuracy"] = float(np.mean(k == labels))
        report["runtime_accuracy"] = float(np.mean(r == labels))
    return report
