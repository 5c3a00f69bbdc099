"""Loss-aware models survive save/load (scales, optimizer, binding) and export to TFLite with exact
codebooks -- CNNs as full-integer int8, LSTM language models as a fused LSTM with int8 weights."""

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import separable_data
from syq_tf.export import flatbuffer
from syq_tf.export.match import kernel_matches
from syq_tf.quantizers import DoReFa, LossAware

V, T, UNITS = 24, 10, 48


def cnn(mode, bits=None, conv_mode=None):
    q = syq_tf.quantize
    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(8, 3, use_bias=False, name="conv1")(inp)
    x = tf.keras.layers.BatchNormalization(name="bn1")(x)
    x = q(tf.keras.layers.Conv2D(12, 3, use_bias=False, name="conv2"),
          kernel_quantizer=LossAware(conv_mode or mode, bits=bits), input_quantizer=DoReFa(8))(x)
    x = tf.keras.layers.BatchNormalization(name="bn2")(x)
    x = tf.keras.layers.Flatten()(x)
    out = q(tf.keras.layers.Dense(4, name="fc"), kernel_quantizer=LossAware(mode, bits=bits),
            input_quantizer=DoReFa(8))(x)
    model = tf.keras.Model(inp, out)
    model.compile(syq_tf.LossAwareAdam(1e-2), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def images():
    return separable_data(768)


def char_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    # a learnable sequence: next = (3 * current + 1) mod V, with noise
    ids = np.zeros((n, T + 1), np.int64)
    ids[:, 0] = rng.integers(0, V, n)
    for t in range(T):
        ids[:, t + 1] = np.where(rng.random(n) < 0.9, (3 * ids[:, t] + 1) % V, rng.integers(0, V, n))
    return np.eye(V, dtype=np.float32)[ids[:, :-1]], ids[:, 1:]


def lstm_lm(bits=3, kind="linear", cls=tf.keras.layers.LSTM):
    inp = tf.keras.Input((T, V))
    rnn = syq_tf.quantize(cls(UNITS, return_sequences=True, name="rnn"),
                          kernel_quantizer=LossAware(kind, bits=bits))
    head = syq_tf.quantize(tf.keras.layers.Dense(V, name="head"), kernel_quantizer=LossAware(kind, bits=bits))
    model = tf.keras.Model(inp, head(rnn(inp)))
    model.compile(syq_tf.LossAwareAdam(1e-2), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _scales(model):
    return {f"{layer.name}/{kernel.name}": [s.numpy() for s in q._scales()]
            for layer, q, kernel in syq_tf.quantized_kernels(model)}


@pytest.mark.parametrize("fmt", ["h5", "tf"])
def test_lstm_language_model_round_trip_and_training_resumes(tmp_path, fmt):
    x, y = char_data()
    model = lstm_lm()
    model.fit(x, y, epochs=2, verbose=0)
    path = str(tmp_path / ("lm.h5" if fmt == "h5" else "lm"))
    model.save(path, save_format=fmt)
    loaded = tf.keras.models.load_model(path)  # no custom_objects, optimizer included
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    before = _scales(loaded)
    assert before.keys() == _scales(model).keys() and len(before) == 3
    for key, values in _scales(model).items():
        for a, b in zip(values, before[key]):
            np.testing.assert_array_equal(a, b)
    assert isinstance(loaded.optimizer, syq_tf.LossAwareAdam)
    loaded.fit(x, y, epochs=1, verbose=0)  # the reloaded optimizer takes the kernels over again
    assert len(loaded.optimizer.loss_aware_quantizers) == 3
    assert any(not np.array_equal(a, b) for k in before for a, b in zip(before[k], _scales(loaded)[k]))


def test_reloaded_model_trained_with_another_optimizer_still_fails(tmp_path):
    x, y = char_data(32)
    model = lstm_lm()
    model.fit(x, y, epochs=1, verbose=0)
    model.save(str(tmp_path / "lm.h5"))
    loaded = tf.keras.models.load_model(str(tmp_path / "lm.h5"), compile=False)
    loaded.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(tf.errors.InvalidArgumentError, match="LossAwareAdam"):
        loaded.fit(x, y, epochs=1, verbose=0)


@pytest.mark.parametrize("mode,bits", [("binary", None), ("ternary_exact", None), ("linear", 3), ("linear", 4),
                                       ("log", 3), ("log", 4)])
def test_cnn_codebooks_are_exact_in_int8_and_litert_agrees(images, mode, bits):
    x, y = images
    model = cnn(mode, bits)
    model.fit(x[:512], y[:512], epochs=3, batch_size=32, verbose=0)
    result = syq_tf.export.to_tflite(model, representative_data=x[:200], verify_data=x[512:],
                                     verify_labels=y[512:], require_exact=True)
    reports = {r.layer: r for r in result.layers}
    levels = {"binary": 2, "ternary_exact": 3}.get(mode, 2**(bits or 0) - 1)
    for name in ("conv2", "fc"):
        assert reports[name].exact and reports[name].keras_levels <= levels
    # every stored level equals the Keras level up to the (per-channel) int8 scale
    for match in kernel_matches(model, result.flatbuffer):
        if match.quantizer is None:
            continue
        stored = match.tensor.values.astype(np.float64)
        keras = match.expected()
        assert np.array_equal(stored == 0, keras == 0)
    assert result.verification["top1_agreement"] >= 0.99


def test_two_scale_ternary_is_reported_and_refused_when_exactness_is_required(images):
    x, y = images
    model = cnn("ternary_two_scale")
    model.fit(x[:256], y[:256], epochs=2, batch_size=32, verbose=0)
    result = syq_tf.export.to_tflite(model, representative_data=x[:100])
    fc = next(r for r in result.layers if r.layer == "fc")
    assert not fc.exact and "cannot hold this codebook exactly" in fc.note
    assert any("'fc'" in n for n in result.notes)
    with pytest.raises(ValueError, match="require_exact=True.*'fc'"):
        syq_tf.export.to_tflite(model, representative_data=x[:100], require_exact=True)


def test_lstm_exports_as_fused_lstm_with_exact_int8_gate_weights(tmp_path):
    x, y = char_data()
    model = lstm_lm(bits=3)
    model.fit(x, y, epochs=4, verbose=0)
    result = syq_tf.export.to_tflite(model, representative_data=x, verify_data=x[:48], verify_labels=y[:48],
                                     require_exact=True)
    assert flatbuffer.op_names(result.flatbuffer) == ["UNIDIRECTIONAL_SEQUENCE_LSTM", "FULLY_CONNECTED"]
    reports = {r.layer: r for r in result.layers}
    assert set(reports) == {"rnn/kernel", "rnn/recurrent_kernel", "head"}
    matches = [m for m in kernel_matches(model, result.flatbuffer) if m.layer.name == "rnn"]
    assert sorted((m.tensor.position, m.part) for m in matches) == [(p, (p - 1) % 4) for p in range(1, 9)]
    for m in matches:
        t = m.tensor
        assert t.dtype == "INT8" and t.values.shape == ((UNITS, V) if t.position <= 4 else (UNITS, UNITS))
        # dequantized int8 == the Keras codebook, gate by gate (Keras gate order i, f, c, o)
        np.testing.assert_allclose(t.values * t.scales.astype(np.float64)[0], m.expected(), rtol=1e-6, atol=1e-9)
        assert np.unique(t.values).size <= 7
    assert reports["rnn/recurrent_kernel"].weight_bytes == 4 * UNITS * UNITS  # one byte per weight
    assert result.verification["top1_agreement"] >= 0.99
    assert result.verification["max_abs_diff"] < 0.05
    path = result.save(str(tmp_path / "lm.tflite"))
    assert open(path, "rb").read() == bytes(result.flatbuffer)


def test_recurrent_exports_refuse_what_tflite_cannot_hold():
    gru = lstm_lm(cls=tf.keras.layers.GRU)
    with pytest.raises(ValueError, match="layer 'rnn' \\(QuantizedGRU\\) cannot be exported yet"):
        syq_tf.export.to_tflite(gru, representative_data=char_data(8)[0])
    inp = tf.keras.Input((T, V))
    lstm = syq_tf.quantize(tf.keras.layers.LSTM(8, name="rnn"), kernel_quantizer=LossAware("binary"),
                           input_quantizer=DoReFa(8))
    with pytest.raises(ValueError, match="layer 'rnn' has an input \\(activation\\) quantizer"):
        syq_tf.export.to_tflite(tf.keras.Model(inp, lstm(inp)), representative_data=char_data(8)[0])
