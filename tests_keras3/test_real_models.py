"""Real Keras 3 models through the whole pipeline, reduced (benchmarks/keras3_models.py runs them at
size): quantize_model -> fit -> .keras round trip (safe mode) -> LiteRT export with exact codebooks."""

import keras
import numpy as np
from conftest import reloaded_in_a_fresh_process, separable_data

import syq_tf.keras3 as syq
from syq_tf.calibration import calibratable_quantizers
from syq_tf.export import flatbuffer
from syq_tf.keras3.layer_normalization import RANGES


def test_mobilenetv2_quantize_fit_reload_export(tmp_path):
    x, y = separable_data(16, shape=(32, 32, 3), classes=2)
    x = 2.0 * x - 1.0  # MobileNetV2's input range
    model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), weights=None, classes=2)
    q, report = syq.quantize_model(model, scheme="syq-w2a8", return_report=True)
    assert report["unsupported"] == [] and len(report["eight_bit"]) == 2
    assert len(report["low_bit"]) == 51  # every other Conv2D / DepthwiseConv2D of the network
    q.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy())
    syq.calibrate(q, x)
    q.fit(x, y, batch_size=16, epochs=1, verbose=0)  # one step
    path = tmp_path / "mobilenetv2.keras"
    q.save(path)
    loaded = keras.saving.load_model(path)  # safe mode, no custom objects
    np.testing.assert_array_equal(q.predict(x, verbose=0), loaded.predict(x, verbose=0))
    result = syq.export.to_tflite(loaded, x, target="litert", verify_data=x, verify_labels=y)
    low = [r for r in result.layers if r.quantizer != "float" and r.bits < 8]
    assert len(low) == 51
    assert [r.layer for r in result.layers if r.quantizer != "float" and not r.exact] == []
    ops = flatbuffer.op_names(bytes(result))  # every op int8: no convolution left float
    assert "DEQUANTIZE" not in ops and "QUANTIZE" not in ops and ops.count("ADD") == 10
    assert result.verification["examples"] == 16


def encoder(mha):
    tokens = keras.Input((12,), dtype="int32")
    x = keras.layers.Embedding(30, 16)(tokens)
    a = mha(x, x)
    x = keras.layers.LayerNormalization(name="ln")(keras.layers.Add()([x, a]))
    x = keras.layers.Dense(16, activation="relu", name="ff")(x)
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(tokens, out)


def test_transformer_encoder_calibrates():
    """quantize_model ranges the tensors not read by one quantized layer alone (the attention's output,
    read by the Add; the Add's output; the feed-forward's output, read by the pooling) at their
    producers; MultiHeadAttention reads its inputs as they are (the Embedding's output here: on the
    table's int8 scale), so its projections have no input ranges of their own; its inner tensors
    (attention_ranges) and the LayerNormalization's (Int8LayerNormalization) have theirs."""
    q = syq.quantize_model(encoder(keras.layers.MultiHeadAttention(2, 8, name="mha")), scheme="syq-w2a8")
    data = np.random.default_rng(0).integers(0, 30, (8, 12)).astype(np.int32)
    steps = syq.calibrate(q, data)
    names = sorted(quantizer.name for quantizer in calibratable_quantizers(q))
    inner = [f"mha_{name}_range" for name in ("context", "key", "query", "scaled_scores", "scores", "value")]
    inner += [f"ln_{name}_range" for name in RANGES]  # Int8LayerNormalization's
    assert names == sorted(steps) == sorted(["add_output_range", "ff_input_quantizer", "ff_output_range",
                                             "head_input_quantizer", *inner, "mha_output_range"])


def test_quantized_attention_calibrates_its_projections_only():
    """A quantized MultiHeadAttention lists only its projections' quantizers (the templates it copies
    them from are never called: calibrate() used to find them and fail, "saw no inputs")."""
    mha = syq.quantize(keras.layers.MultiHeadAttention(2, 8, name="mha"), kernel_quantizer=syq.quantizers.SYQ(2),
                       input_quantizer=syq.quantizers.MovingAverageActivation(8))
    model = encoder(mha)
    data = np.random.default_rng(0).integers(0, 30, (8, 12)).astype(np.int32)
    steps = syq.calibrate(model, data)
    names = sorted(quantizer.name for quantizer in calibratable_quantizers(model))
    assert names == sorted(steps) == ["attention_output_input_quantizer", "key_input_quantizer",
                                      "query_input_quantizer", "value_input_quantizer"]


def test_quantized_transformer_reloads_in_a_fresh_process(tmp_path):
    """A quantize_model Transformer (quantized Embedding, attention projections, output ranges as
    layers of the graph) saved as .keras loads in a new process in safe mode with the same outputs.
    The quantized Embedding's class used to be made on the first quantize() only: loading failed
    with "Could not locate class 'QuantizedEmbedding'"."""
    q = syq.quantize_model(encoder(keras.layers.MultiHeadAttention(2, 8, name="mha")), scheme="uniq-w4a8")
    data = np.random.default_rng(0).integers(0, 30, (8, 12)).astype(np.int32)
    syq.calibrate(q, data)
    kinds = reloaded_in_a_fresh_process(q, data, tmp_path, "sorted({type(layer).__name__ for layer in m.layers "
                                        "if 'Quantized' in type(layer).__name__ or 'Int8' in type(layer).__name__ "
                                        "or layer.name.endswith('_output_range')})")
    assert kinds == "['Int8LayerNormalization', 'MovingAverageActivation', 'QuantizedDense', 'QuantizedEmbedding', " \
        "'QuantizedMultiHeadAttention']"
