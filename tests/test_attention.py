"""Attention: MultiHeadAttention's query/key/value/output projections (EinsumDense) quantized, in a
small Transformer encoder (Embedding + MultiHeadAttention + Dense feed-forward + LayerNormalization)
that trains, reloads and exports with every projection's codebook exact."""

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from syq_tf.export import flatbuffer
from syq_tf.export.runtime import litert_interpreter
from syq_tf.layers import QuantizedMultiHeadAttention
from syq_tf.quantizers import SYQ, DoReFa


def token_data(n, seed=0):
    """Token ids 0..19, label: whether token 7 occurs (about half the sequences)."""
    x = np.random.default_rng(seed).integers(0, 20, (n, 12)).astype(np.int32)
    return x, (x == 7).any(axis=1).astype(np.int32)


def encoder():
    inp = tf.keras.Input((12,), dtype="int32")
    e = tf.keras.layers.Embedding(20, 16, name="emb")(inp)
    a = syq_tf.quantize(tf.keras.layers.MultiHeadAttention(2, 8, name="mha"), kernel_quantizer=SYQ(2, "layer"))(e, e)
    h = tf.keras.layers.LayerNormalization(name="ln1")(tf.keras.layers.Add()([a, e]))
    f = syq_tf.quantize(tf.keras.layers.Dense(32, activation="relu", name="ff1"), kernel_quantizer=SYQ(2, "channel"),
                        input_quantizer=DoReFa(8))(h)
    f = syq_tf.quantize(tf.keras.layers.Dense(16, name="ff2"), kernel_quantizer=SYQ(2, "channel"))(f)
    h = tf.keras.layers.LayerNormalization(name="ln2")(tf.keras.layers.Add()([f, h]))
    h = tf.keras.layers.GlobalAveragePooling1D()(h)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(2, name="head")(h))
    model.compile(tf.keras.optimizers.Adam(3e-3), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def trained():
    x, y = token_data(896)
    model = encoder()
    syq_tf.reinitialize_scales(model)
    history = model.fit(x[:768], y[:768], epochs=10, batch_size=64, verbose=0)
    return model, x, y, history.history["accuracy"][-1]


def test_projections_compute_with_their_quantized_kernels(trained):
    model, x, _, _ = trained
    mha = model.get_layer("mha")
    assert isinstance(mha, QuantizedMultiHeadAttention)
    kernels = mha.float_kernels()
    assert sorted(kernels) == ["attention_output", "key", "query", "value"]
    # each projection has its own quantizer (its own learned alpha)
    alphas = {name: float(q.alpha.numpy().ravel()[0]) for name, (q, _) in kernels.items()}
    assert len(set(alphas.values())) == 4
    # a plain MultiHeadAttention holding the quantized kernels computes the same outputs
    e = model.get_layer("emb")(x[:8])
    plain = tf.keras.layers.MultiHeadAttention(2, 8)
    plain(e, e)
    by_path = {v.name.split("/", 1)[1]: v.numpy() for v in mha.weights}
    for name, (q, kernel) in kernels.items():
        by_path[f"{name}/kernel:0"] = q(kernel).numpy()
        assert len(np.unique(by_path[f"{name}/kernel:0"])) <= 3  # ternary
    for v in plain.weights:
        v.assign(by_path[v.name.split("/", 1)[1]])
    np.testing.assert_allclose(mha(e, e).numpy(), plain(e, e).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="MultiHeadAttention takes kernel_quantizer and input_quantizer only"):
        syq_tf.quantize(tf.keras.layers.MultiHeadAttention(2, 8), kernel_quantizer=SYQ(), depthwise_quantizer=SYQ())


def test_transformer_encoder_reloads_and_exports_exactly(trained, tmp_path):
    model, x, y, accuracy = trained
    assert accuracy >= 0.95
    path = str(tmp_path / "encoder.h5")
    model.save(path)
    again = tf.keras.models.load_model(path)
    assert isinstance(again.get_layer("mha"), QuantizedMultiHeadAttention)
    np.testing.assert_array_equal(model.predict(x[:16], verbose=0), again.predict(x[:16], verbose=0))
    keras_path = str(tmp_path / "encoder.keras")  # the .keras format, loaded in safe mode
    syq_tf.save_model(model, keras_path)
    again = syq_tf.load_model(keras_path)
    np.testing.assert_array_equal(model.predict(x[:16], verbose=0), again.predict(x[:16], verbose=0))
    for weights in ("int8", "int2"):
        result = syq_tf.export.to_tflite(model, x[:64], weights=weights, verify_data=x[768:], verify_labels=y[768:],
                                         require_exact=True)
        layers = {r.layer: r for r in result.layers}
        for name in ("mha/query", "mha/key", "mha/value", "mha/attention_output", "ff1", "ff2"):
            assert layers[name].op == "FULLY_CONNECTED" and layers[name].exact, layers[name]
            assert layers[name].storage == weights and layers[name].stored_levels <= 3
        assert result.verification["top1_agreement"] >= 0.99, result.verification
        assert flatbuffer.io_type(result.flatbuffer, "input") == "INT32"
    # converted at a fixed batch (sequence_kernel_layers): the new input keeps the model's input name
    # (an unnamed one took tf_keras's running count, input_N). The bytes of two exports still differ
    # in one tensor name: tf_keras's MultiHeadAttention names its inner Softmax by a running count too
    name = model.inputs[0]._keras_history[0].name
    assert litert_interpreter(bytes(result)).get_input_details()[0]["name"] == f"serving_default_{name}:0"


def test_attention_ranges_are_keras3_only():
    """The inner ranges of syq_tf.keras3's attention (tests_keras3/test_attention_ranges.py) export
    from Keras 3 only: say so when the layer is made, not after training."""
    with pytest.raises(ValueError, match=r"layer 'mha' \(MultiHeadAttention\): attention_ranges=True is for the "
                                         r"Keras 3 frontend \(syq_tf.keras3\)"):
        syq_tf.quantize(tf.keras.layers.MultiHeadAttention(2, 4, name="mha"), kernel_quantizer=SYQ(2),
                        attention_ranges=True)
