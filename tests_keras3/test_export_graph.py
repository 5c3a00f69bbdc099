"""Keras 3 graphs whose export the converter used to leave partly float or TFLite Micro could not run:
a convolution's output read both by a quantized layer (through its input range) and by an Add, and
a Transformer encoder (Embedding, MultiHeadAttention, Dense on a sequence) for target 'tflm'."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import syq_tf.keras3 as syq
from syq_tf.export import convert, flatbuffer, tflm
from syq_tf.export.runtime import litert_interpreter


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


def test_shared_tensors_are_ranged_in_training_as_in_the_export():
    """quantize_model puts the 8-bit range of a tensor several layers read at its producer (an
    output range, as tfmot does), so the Add trains on the int8 values TFLite gives it. Before, only
    the expand conv's input was ranged in training while the export clipped and rounded the Add's
    input too: the inference form and Keras differed by up to a range step."""
    x = np.random.default_rng(0).uniform(0, 1, (32, 8, 8, 4)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 32)
    q, report = syq.quantize_model(shared_output_model(), scheme="syq-w2a8", return_report=True)
    # project_bn: read by expand and add; expand: by add; add: by the pooling; the ReLU: by project
    # alone (its input range is the tensor's)
    assert report["output_ranges"] == ["add", "expand", "project_bn"]
    assert q.get_layer("expand").input_quantizer is None  # its input is project_bn's ranged output
    assert q.get_layer("project").input_quantizer is not None
    syq.calibrate(q, x)
    q.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, batch_size=8, epochs=1, verbose=0)
    rng = q.get_layer("project_bn_output_range")
    low, high = float(rng.low.numpy()), float(rng.high.numpy())
    step = (high - low) / 255
    # the Add reads project_bn's output on the range's grid (Keras's own forward pass; the grid
    # holds 0 exactly, as an int8 zero point does)
    probe = keras.Model(q.inputs, q.get_layer("add").input[0])
    grid = probe.predict(x, verbose=0) / step
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-3)
    form = syq.export.build_inference_model(q)
    np.testing.assert_allclose(form.predict(x, verbose=0), q.predict(x, verbose=0), atol=1e-5)
    result = syq.export.to_tflite(q, x, target="litert", verify_data=x)
    assert "DEQUANTIZE" not in flatbuffer.op_names(bytes(result))
    assert result.verification["max_abs_diff"] < 0.05


def transformer(vocab=30, length=12, dim=16):
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab, dim, name="embed")(tokens)
    a = keras.layers.MultiHeadAttention(2, dim // 2, name="mha")(x, x)
    x = keras.layers.LayerNormalization(name="ln1")(keras.layers.Add()([x, a]))
    h = keras.layers.Dense(2 * dim, activation="relu", name="ff1")(x)
    x = keras.layers.LayerNormalization(name="ln2")(keras.layers.Add()([x, keras.layers.Dense(dim, name="ff2")(h)]))
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(tokens, out)


def calibrated_transformer():
    """(the tiny Transformer quantized syq-w2a8 and calibrated, its 16 examples of token ids)."""
    data = np.random.default_rng(0).integers(0, 30, (16, 12)).astype(np.int32)
    q = syq.quantize_model(transformer(), scheme="syq-w2a8")
    syq.calibrate(q, data)
    return q, data


def test_the_same_model_exports_to_the_same_bytes():
    """A sequence model converts at a fixed batch (the new input replaces the model's): that input
    keeps the model's input name, which names the signature's input, so exporting the same model
    twice gives the same bytes. An unnamed input took Keras's running tensor count
    (serving_default_keras_tensor_61, then _78: the same model 8 bytes longer in a benchmark)."""
    q, data = calibrated_transformer()
    first, second = (bytes(syq.export.to_tflite(q, data, target="litert")) for _ in range(2))
    assert first == second
    assert litert_interpreter(first).get_input_details()[0]["name"] == "serving_default_tokens:0"


def test_trace_follows_a_token_model_converted_at_batch_1():
    """trace_divergence on a Transformer exported for LiteRT: token-id inputs fed as they are, the
    model (converted at batch 1) run one example at a time, each layer's int8 output against the
    inference form."""
    q, data = calibrated_transformer()
    buffer = bytes(syq.export.to_tflite(q, data, target="litert"))
    assert litert_interpreter(buffer).get_input_details()[0]["shape_signature"][0] == 1
    rows = {r.layer: r for r in syq.export.trace_divergence(q, buffer, data, max_examples=6)}
    assert {"embed", "mha", "ln1", "ff1", "ff2", "ln2"} <= set(rows), sorted(rows)
    assert rows["embed"].op == "GATHER" and rows["embed"].max_steps == 0  # the table's int8 values, looked up
    assert all(0 <= r.off_by_2 <= r.off_by_1 <= 1 for r in rows.values())
    with pytest.raises(ValueError, match=r"the model's input is int32 \(ids\); x is float32"):
        syq.export.trace_divergence(q, buffer, data.astype(np.float32))


def test_transformer_encoder_exports_for_tflm():
    """At a free batch size the converter computes the RESHAPE around a Dense on a sequence at run
    time (SHAPE, GATHER, REDUCE_PROD) and Keras 3's Embedding wraps negative ids (LESS, SELECT):
    TFLite Micro has neither REDUCE_PROD nor SELECT and failed to allocate tensors. Target 'tflm'
    converts at batch 1 and looks tables up with a plain GATHER."""
    q, data = calibrated_transformer()
    result = syq.export.to_tflite(q, data, target="tflm", verify_data=data)
    ops = set(flatbuffer.op_names(result.uncompressed))
    assert not ops & {"SHAPE", "REDUCE_PROD", "SELECT", "SELECT_V2", "LESS"}, sorted(ops)
    v = result.verification
    assert v["examples"] == 16 and v["max_abs_diff"] < 0.1
    # untrained, on random ids: near ties may flip; every example with a clear top-1 margin agrees
    # (LiteRT here: TFLM's outputs are within one int8 step of its reference kernels, checked above)
    keras_out, runtime_out = q.predict(data, verbose=0), syq.export.litert_predict(bytes(result.uncompressed), data)
    top2 = np.sort(keras_out, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(keras_out - runtime_out).max()
    assert clear.sum() >= 8 and (keras_out.argmax(1) == runtime_out.argmax(1))[clear].all()
    assert v["tflm_compressed_equals_uncompressed"]
    # rounding ties (FULLY_CONNECTED: TFLM rounds twice), a step more after the LayerNormalizations,
    # which scale their input's differences up (the benchmark's trained Transformer: up to 6 steps)
    assert v["max_int8_diff_litert_ref"] <= 2
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


def test_trace_divergence_matches_keras3_layers_and_finds_no_extra_rounding():
    """Keras 3 scopes a layer's ops as <name>_1 and keeps a quantized input inside its reader: the
    trace maps the fused FULLY_CONNECTED outputs to the ReLUs and leaves the input stand-ins out;
    Keras 3 quantize_model puts no range between Dense, BatchNorm and ReLU, so the first layer's
    levels are LiteRT's (Keras 2 had 7.7 % one step off there before its fix). The local columns (each
layer from LiteRT's values of its inputs) place a mismatch put into one layer at that layer."""
    L = keras.layers
    keras.utils.set_random_seed(3)
    inp = keras.Input((24,))
    h = inp
    for i in range(3):
        h = L.ReLU(name=f"relu{i}")(L.BatchNormalization(name=f"bn{i}")(L.Dense(32, name=f"d{i}")(h)))
    model = keras.Model(inp, L.Dense(24, name="out")(h))
    x = np.random.default_rng(0).uniform(0, 1, (256, 24)).astype(np.float32)
    q = syq.quantize_model(model, "syq-w2a4")
    q.compile(keras.optimizers.Adam(1e-2), "mse")
    syq.calibrate(q, x[:64])
    q.fit(x, x, epochs=3, batch_size=32, verbose=0)
    result = syq.export.to_tflite(q, representative_data=x[:64], target="litert")
    rows = syq.export.trace_divergence(q, result.flatbuffer, x, max_examples=64)
    relus = [r for r in rows if r.layer.startswith("relu")]
    assert [r.layer for r in relus] == ["relu0", "relu1", "relu2"]
    assert all(r.op == "FULLY_CONNECTED" for r in relus)  # not the input_range MINIMUMs inside d1, d2
    assert relus[0].off_by_1 <= 0.01 and max(r.max_steps for r in relus) <= 1
    assert all(r.local_off_by_1 <= 0.005 for r in relus), relus  # measured 0 each
    # TFLite Micro traced the same way: its target's export (LUT-compressed weights, TFLM_DECODE ops
    # before the layers) run with every tensor kept
    tflm_result = syq.export.to_tflite(q, representative_data=x[:64], target="tflm")
    assert "TFLM_DECODE" in flatbuffer.op_names(bytes(tflm_result))
    micro = syq.export.trace_divergence(q, tflm_result.flatbuffer, x, max_examples=64, kernels="tflm")
    assert [r.layer for r in micro] == ["relu0", "relu1", "relu2"], micro
    assert all(r.op == "FULLY_CONNECTED" and r.local_off_by_1 <= 0.005 for r in micro), micro
    with pytest.raises(ValueError, match=r"^trace_divergence: the model is a target-'tflm' export \(LUT-compressed "
                                         r"weights decoded by TFLM_DECODE ops\), which LiteRT cannot run: "
                                         r"kernels='tflm' traces it \(kernels='ref' takes the 'litert' export\)\.$"):
        syq.export.trace_divergence(q, tflm_result.flatbuffer, x, kernels="ref")
    # a structural mismatch put into one layer (bn1's beta moved after the export, by a fraction of
    # an int8 step): local at that layer, passed on -- not made -- by the next
    beta = q.get_layer("bn1").beta
    beta.assign(beta.numpy() + 0.3 * np.std(beta.numpy()))
    moved = {r.layer: r for r in syq.export.trace_divergence(q, result.flatbuffer, x, max_examples=64)}
    assert moved["relu0"].off_by_1 == relus[0].off_by_1
    assert moved["relu1"].local_off_by_1 == moved["relu1"].off_by_1 >= 0.05, moved  # measured 17 %
    assert moved["relu2"].off_by_1 >= 0.01 and moved["relu2"].local_off_by_1 <= 0.005, moved  # 3.2 %, 0


def test_trace_leaves_out_a_layer_whose_activation_is_an_op_of_its_own():
    """A Dense with a softmax: TFLite's FULLY_CONNECTED outputs the logits and a SOFTMAX follows, while
    the layer's value is the probabilities. The trace compared the two (98 % of a classifier's values
    'off'); now such a kernel op gets no row. A fused ReLU keeps its row."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="hidden")(inp)
    model = keras.Model(inp, keras.layers.Dense(4, activation="softmax", name="probs")(h))
    x = np.random.default_rng(0).uniform(0, 1, (64, 8)).astype(np.float32)
    q = syq.quantize_model(model, "syq-w2a8")
    syq.calibrate(q, x)
    result = syq.export.to_tflite(q, x, target="litert")
    assert "SOFTMAX" in flatbuffer.op_names(bytes(result))
    rows = syq.export.trace_divergence(q, bytes(result), x, max_examples=32)
    assert [r.layer for r in rows] == ["hidden"] and rows[0].op == "FULLY_CONNECTED"
