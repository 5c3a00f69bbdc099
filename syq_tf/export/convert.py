"""TensorFlow's TFLite converter, called the ways the targets need: full-integer int8 with
calibration on representative data, and dynamic range (int8 weights, float activations) for models
with a fused LSTM."""

import contextlib
import io

import numpy as np
import tensorflow as tf


def samples(data, limit):
    """Single-example batches from an array, a tuple (x, y) or a tf.data.Dataset (float inputs as
    float32; integer inputs, e.g. token ids, keep their type)."""
    if isinstance(data, tf.data.Dataset):
        out = []
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for row in np.asarray(x):
                out.append(_as_input(row[None]))
                if len(out) >= limit:
                    return out
        return out
    if isinstance(data, (tuple, list)):
        data = data[0]
    array = _as_input(np.asarray(data))
    return [array[i : i + 1] for i in range(min(limit, len(array)))]


def _as_input(x):
    return x if x.dtype.kind in "iub" else x.astype(np.float32)


def _convert(converter):
    """``converter.convert()``; for a Keras 3 model TensorFlow saves it first and Keras prints the
    saved signature to stdout, which is held back here."""
    with contextlib.redirect_stdout(io.StringIO()):
        return converter.convert()


def int8(inference_model, representative_data, count=200):
    """Full-integer int8 conversion (int8 inputs and outputs)."""
    reps = samples(representative_data, count)
    if not reps:
        raise ValueError("to_tflite: representative_data is empty; give a few hundred input examples.")

    def representative():
        for sample in reps:
            yield [sample]

    converter = tf.lite.TFLiteConverter.from_keras_model(inference_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return _convert(converter)


def dynamic_range(inference_model):
    """Dynamic-range conversion: int8 weights (exact codebooks rewritten afterwards), float
    activations; an LSTM stays one fused UNIDIRECTIONAL_SEQUENCE_LSTM op."""
    converter = tf.lite.TFLiteConverter.from_keras_model(inference_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return _convert(converter)


def recurrent_layers(model):
    """The recurrent layers of ``model``, checked for the fused-LSTM export (clear error otherwise)."""
    found = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.RNN)]
    for layer in found:
        kind = type(layer).__name__
        if not isinstance(layer, tf.keras.layers.LSTM):
            raise ValueError(
                f"to_tflite: layer '{layer.name}' ({kind}) cannot be exported yet: TFLite turns GRU and "
                "SimpleRNN layers into a WHILE loop whose weights syq_tf cannot check, and its int8 "
                "calibration crashes on GRU; recurrent models export with LSTM layers (fused "
                "UNIDIRECTIONAL_SEQUENCE_LSTM)."
            )
        if layer.unroll or layer.stateful or layer.go_backwards:
            raise ValueError(
                f"to_tflite: layer '{layer.name}' ({kind}) has unroll/stateful/go_backwards set; only "
                "the default LSTM (unroll=False, stateful=False, go_backwards=False) converts to the fused "
                "TFLite LSTM op."
            )
    if found:
        for layer in model.layers:
            if getattr(layer, "input_quantizer", None) is not None:
                raise ValueError(
                    f"to_tflite: layer '{layer.name}' has an input (activation) quantizer, but a model with "
                    f"recurrent layers ({', '.join(repr(r.name) for r in found)}) is exported with int8 "
                    "weights and float activations (TFLite's int8 fused LSTM is not usable); remove the "
                    "activation quantizers of recurrent models."
                )
    return found


def sequence_kernel_layers(model):
    """Names of the layers that multiply a kernel along a sequence (a Dense on an input of rank > 2,
    an EinsumDense, a MultiHeadAttention). With a free batch dimension TensorFlow's converter
    computes the RESHAPE around them at run time and cannot fuse their bias: FULLY_CONNECTED
    without bias, its int8 output rounded, then an int8 ADD of the bias quantized to int8 -- two
    roundings Keras does not make (measured on the Transformer of benchmarks/keras3_models.py,
    syq-w2a8: LiteRT agreement with Keras 0.992 at a free batch, 0.998 at batch 1, the same model)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, (tf.keras.layers.EinsumDense, tf.keras.layers.MultiHeadAttention)):
            found.append(layer.name)
        elif isinstance(layer, tf.keras.layers.Dense):
            ranks = [len(tf.nest.flatten(node.input_tensors)[0].shape)
                     for node in getattr(layer, "_inbound_nodes", []) if tf.nest.flatten(node.input_tensors)]
            if any(rank > 2 for rank in ranks):
                found.append(layer.name)
    return found
