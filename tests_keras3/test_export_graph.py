"""Keras 3 graphs whose export the converter used to leave partly float: a convolution's output read
both by a quantized layer (through its input range) and by an Add."""

import keras
import numpy as np

import syq_tf.keras3 as syq
from syq_tf.export import flatbuffer


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
