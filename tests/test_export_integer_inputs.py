"""Models whose input is integer token ids (an Embedding first) export to every int8 target: the
integer input stays integer (the converter keeps it), calibration and verification feed ids."""

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from syq_tf.export import flatbuffer
from syq_tf.quantizers import SYQ, DoReFa


@pytest.fixture(scope="module")
def token_model():
    tf.keras.utils.set_random_seed(0)  # the weights too: the agreement below is of one trained model
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (512, 12)).astype(np.int32)
    y = (x[:, :6].sum(1) > x[:, 6:].sum(1)).astype(np.int32)
    inp = tf.keras.Input((12,), dtype="int32")
    h = tf.keras.layers.Embedding(50, 16, name="emb")(inp)
    h = tf.keras.layers.Flatten()(h)
    h = syq_tf.quantize(tf.keras.layers.Dense(32, name="fc"), kernel_quantizer=SYQ(2, "channel"),
                        input_quantizer=DoReFa(8))(h)
    out = tf.keras.layers.Dense(2, name="logits")(h)
    model = tf.keras.Model(inp, out)
    model.compile(tf.keras.optimizers.Adam(3e-3), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:384], y[:384], epochs=3, batch_size=64, verbose=0)
    return model, x, y


@pytest.mark.parametrize("target,weights", [("litert", "int8"), ("litert", "int2"), ("tflm", "int8")])
def test_token_id_inputs_export_and_agree(token_model, target, weights):
    model, x, y = token_model
    result = syq_tf.export.to_tflite(model, x[:64], target=target, weights=weights, verify_data=x[384:],
                                     verify_labels=y[384:])
    assert flatbuffer.io_type(result.flatbuffer, "input") == "INT32"
    v = result.verification
    assert v["top1_agreement"] >= 0.99, v
    fc = next(r for r in result.layers if r.layer == "fc")
    assert fc.exact and fc.storage == {"litert": weights, "tflm": "lut"}[target]
    if target == "tflm":
        assert v["tflm_compressed_equals_uncompressed"]
    if weights == "int2":
        assert v["int2_equals_int8_twin_builtin"]


def test_token_ids_of_the_wrong_shape_are_refused(token_model):
    model, x, _ = token_model
    with pytest.raises(ValueError, match=r"representative_data has examples of shape \(6,\); model .* takes \(12,\)"):
        syq_tf.export.to_tflite(model, x[:8, :6])


def test_quantized_embedding_table_is_stored_exactly():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 20, (512, 12)).astype(np.int32)
    y = (x == 7).any(axis=1).astype(np.int32)
    inp = tf.keras.Input((12,), dtype="int32")
    e = syq_tf.quantize(tf.keras.layers.Embedding(20, 16, name="emb"), kernel_quantizer=SYQ(2, "layer"))(inp)
    h = tf.keras.layers.Dense(16, activation="relu")(tf.keras.layers.GlobalAveragePooling1D()(e))
    model = tf.keras.Model(inp, tf.keras.layers.Dense(2)(h))
    model.compile(tf.keras.optimizers.Adam(3e-3), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    assert model.fit(x[:448], y[:448], epochs=10, verbose=0).history["accuracy"][-1] >= 0.9
    table = model.get_layer("emb").quantized_kernel().numpy()
    assert len(np.unique(table)) == 3
    result = syq_tf.export.to_tflite(model, x[:64], weights="int2", verify_data=x[448:], require_exact=True)
    emb = next(r for r in result.layers if r.layer == "emb")
    assert emb.op == "GATHER" and emb.exact and emb.storage == "int8" and emb.stored_levels == 3
    # LiteRT 2.3's GATHER refuses INT2 tables (and gathers INT4 rows as INT4): the table stays int8
    assert any("'emb': kept int8 weights, not INT2/INT4 (INT2: GATHER takes no INT2" in n for n in result.notes)
    stored = next(t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.op == "GATHER")
    np.testing.assert_allclose(stored.values * stored.scales[0], table, rtol=1e-6)
    assert result.verification["top1_agreement"] >= 0.99
