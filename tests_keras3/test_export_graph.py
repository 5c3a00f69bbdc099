"""Keras 3 graphs whose export the converter used to leave partly float or TFLite Micro could not run:
a convolution's output read both by a quantized layer (through its input range) and by an Add, and
a Transformer encoder (Embedding, MultiHeadAttention, Dense on a sequence) for target 'tflm'."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import syq_tf.keras3 as syq
from syq_tf.export import convert, flatbuffer, tflm


def shared_output_model():
    """Conv2D -> BatchNormalization (no activation), its output read by a quantized Conv2D and by an
    Add: a MobileNetV2 block_N_project whose output feeds the next block's expand conv and residual."""
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.ReLU(6.0)(keras.layers.Conv2D(8, 3, padding="same", name="first")(inputs))
    y = keras.layers.Conv2D(8, 1, use_bias=False, name="project")(x)
    y = keras.layers.BatchNormalization(name="project_bn")(y)
    z = keras.layers.Conv2D(8, 1, name="expand")(y)
    y = keras.layers.Add(name="add")([y, z])
    outputs = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(y))
    model = keras.Model(inputs, outputs)
    model.get_layer("project_bn").set_weights([np.linspace(0.5, 2.0, 8), np.linspace(-0.3, 0.3, 8),
                                               np.linspace(-0.1, 0.1, 8), np.linspace(0.5, 3.0, 8)])
    return model


def test_conv_bn_output_read_by_quantized_layer_and_add_stays_int8():
    """The expand conv's int8 input range used to sit on a tensor the Add also reads: TensorFlow's
    converter then kept the project conv in float (DEQUANTIZE, CONV_2D with float32 kernel,
    QUANTIZE), and its 2-bit codebook was reported inexact. The range now sits at the producer."""
    x = np.random.default_rng(0).uniform(0, 1, (32, 8, 8, 4)).astype(np.float32)
    q = syq.quantize_model(shared_output_model(), scheme="syq-w2a8")
    syq.calibrate(q, x)
    result = syq.export.to_tflite(q, x, target="litert", verify_data=x)
    ops = flatbuffer.op_names(bytes(result))
    assert "DEQUANTIZE" not in ops and "QUANTIZE" not in ops, ops
    assert ops.count("CONV_2D") == 3
    reports = {r.layer: r for r in result.layers}
    assert all(r.exact for r in reports.values()), {k: r.note for k, r in reports.items()}
    project = next(t for t in flatbuffer.weight_tensors(bytes(result)) if "project" in t.name)
    assert project.dtype == "INT8" and project.scales.size == 8  # per output channel
    assert reports["project"].bits == 2 and reports["project"].stored_levels <= 3  # ternary SYQ
    assert result.verification["top1_agreement"] == 1.0


def transformer(vocab=30, length=12, dim=16):
    tokens = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(vocab, dim, name="embed")(tokens)
    a = keras.layers.MultiHeadAttention(2, dim // 2, name="mha")(x, x)
    x = keras.layers.LayerNormalization(name="ln1")(keras.layers.Add()([x, a]))
    h = keras.layers.Dense(2 * dim, activation="relu", name="ff1")(x)
    x = keras.layers.LayerNormalization(name="ln2")(keras.layers.Add()([x, keras.layers.Dense(dim, name="ff2")(h)]))
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(tokens, out)


def test_transformer_encoder_exports_for_tflm():
    """At a free batch size the converter computes the RESHAPE around a Dense on a sequence at run
    time (SHAPE, GATHER, REDUCE_PROD) and Keras 3's Embedding wraps negative ids (LESS, SELECT):
    TFLite Micro has neither REDUCE_PROD nor SELECT and failed to allocate tensors. Target 'tflm'
    converts at batch 1 and looks tables up with a plain GATHER."""
    data = np.random.default_rng(0).integers(0, 30, (16, 12)).astype(np.int32)
    q = syq.quantize_model(transformer(), scheme="syq-w2a8")
    syq.calibrate(q, data)
    result = syq.export.to_tflite(q, data, target="tflm", verify_data=data)
    ops = set(flatbuffer.op_names(result.uncompressed))
    assert not ops & {"SHAPE", "REDUCE_PROD", "SELECT", "SELECT_V2", "LESS"}, sorted(ops)
    v = result.verification
    assert v["examples"] == 16 and v["top1_agreement"] >= 0.9  # untrained: near ties on random ids
    assert v["tflm_compressed_equals_uncompressed"]
    assert v["max_int8_diff_litert_ref"] <= 1  # rounding ties (FULLY_CONNECTED: TFLM rounds twice)
    assert all(r.exact for r in result.layers if r.quantizer != "float")


def test_tflm_names_the_op_it_has_no_kernel_for():
    """TFLite Micro only prints the op it lacks and raises "failed to allocate tensors"."""
    inputs = keras.Input((4,))
    product = keras.layers.Lambda(lambda t: tf.reduce_prod(t, axis=-1, keepdims=True), name="product")
    model = keras.Model(inputs, product(keras.layers.Dense(3, name="dense")(inputs)))
    buffer = convert.int8(model, np.random.default_rng(0).uniform(0, 1, (8, 4)).astype(np.float32))
    with pytest.raises(RuntimeError, match=r"^TFLite Micro has no kernel for op REDUCE_PROD \(first computing "
                                           r"tensor '[^']+'\); the model cannot run in TFLM$"):
        tflm.tflm_interpreter(buffer)
