"""to_tflite(..., target="lce"): binary layers as bit-packed LceBconv2d, run with LCE's interpreter."""

import importlib.util
import json
import os
import sys

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from syq_tf.export import TARGETS, codebook, lce_format, to_tflite

Q = syq_tf.quantizers
PYTHON = "%d.%d" % sys.version_info[:2]
# larq-compute-engine is optional where it has no wheel (Python 3.13): the tests that convert or run
# with it are skipped there; packing, refusals and the missing-package error still run.
HAVE_LCE = importlib.util.find_spec("larq_compute_engine") is not None
NO_LCE = f"larq-compute-engine is not installed on Python {PYTHON} (0.16.0 publishes no wheel for 3.13)"
needs_lce = pytest.mark.skipif(not HAVE_LCE, reason=NO_LCE)


# ---- packing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("c_in", [1, 31, 32, 33, 40, 64, 70])
def test_pack_unpack_round_trip_with_channel_padding(c_in):
    rng = np.random.default_rng(c_in)
    kernel = rng.choice([-1.0, 1.0], size=(3, 2, c_in, 40)) * rng.uniform(0.1, 2.0, 40)
    words = lce_format.pack_signs(kernel)
    n_words = -(-c_in // 32)
    assert words.dtype == np.dtype("<i4") and words.shape == (40, 3, 2, n_words)
    np.testing.assert_array_equal(lce_format.unpack_signs(words, c_in), np.sign(kernel))
    # bit i of word w is input channel 32 w + i, set for -1; bits past c_in are zero
    bits = np.unpackbits(words.view(np.uint8).reshape(40, 3, 2, n_words, 4), axis=-1, bitorder="little")
    bits = bits.reshape(40, 3, 2, n_words * 32)
    assert not bits[..., c_in:].any()
    np.testing.assert_array_equal(bits[..., :c_in], np.transpose(kernel < 0, (3, 0, 1, 2)))


def test_pack_refuses_zeros_and_unpack_refuses_set_padding_bits():
    with pytest.raises(ValueError, match="zero"):
        lce_format.pack_signs(np.zeros((1, 1, 4, 2)))
    words = lce_format.pack_signs(np.ones((1, 1, 33, 2)))
    words[0, 0, 0, 1] = 2  # channel 33 (past c_in)
    with pytest.raises(ValueError, match="padding bits"):
        lce_format.unpack_signs(words, 33)


# ---- a small model exported once ----------------------------------------------------------------


def _model():
    inp = tf.keras.Input((8, 8, 3))
    h = tf.keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv0")(inp)  # float
    h = tf.keras.layers.BatchNormalization(name="bn0")(h)
    h = lq.layers.QuantConv2D(40, 3, padding="same", use_bias=False, name="bin_same",
                              kernel_quantizer=Q.SYQ(1, "channel"), input_quantizer="ste_sign")(h)
    h = tf.keras.layers.BatchNormalization(name="bn1")(h)
    # per-sample ls1 activations: the LceBconv2d output is multiplied by v (its multiplier stays alpha)
    h = lq.layers.QuantConv2D(36, 3, padding="valid", name="bin_valid", kernel_quantizer=Q.UniQ(1, "channel"),
                              input_quantizer=Q.LeastSquaresActivation("ls1"))(h)
    h = tf.keras.layers.BatchNormalization(name="bn2")(h)
    # {0, 1} activations: negated kernel, +1 padding, per-channel bias
    h = lq.layers.QuantConv2D(33, 3, padding="same", strides=2, name="bin_step",
                              kernel_quantizer=Q.LeastSquares("ls1"), input_quantizer=Q.DoReFa(1))(h)
    h = tf.keras.layers.BatchNormalization(name="bn3")(h)
    h = lq.layers.QuantConv2D(16, 3, padding="same", name="pixel", kernel_quantizer=Q.SYQ(1, "pixel"),
                              input_quantizer="ste_sign")(h)
    h = tf.keras.layers.BatchNormalization(name="bn4")(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    out = lq.layers.QuantDense(10, name="fc", kernel_quantizer=Q.SYQ(2, "layer"), input_quantizer=Q.DoReFa(8))(h)
    model = tf.keras.Model(inp, out)
    rng = np.random.default_rng(5)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, c), rng.normal(0, 0.3, c), rng.normal(0, 0.3, c),
                               rng.uniform(0.5, 2, c)])
    return model


@pytest.fixture(scope="module")
def exported():
    """weights='float32': the layers LCE cannot pack keep float32 kernels (bit-exact outputs)."""
    if not HAVE_LCE:
        pytest.skip(NO_LCE)
    tf.keras.utils.set_random_seed(7)
    model = _model()
    x = np.random.default_rng(0).uniform(0, 1, (200, 8, 8, 3)).astype(np.float32)
    result = to_tflite(model, x[:8], target="lce", verify_data=x, weights="float32")
    return model, x, result


@pytest.fixture(scope="module")
def exported_int8(exported):
    """The default: those layers store int8 weights (DEQUANTIZE to float when prepared)."""
    model, x, _ = exported
    with pytest.warns(UserWarning, match=r"\['pixel'\] round their codebooks") as caught:
        result = to_tflite(model, x[:8], target="lce", verify_data=x)
    return model, x, result, [str(w.message) for w in caught]


def _report(result, name):
    return next(r for r in result.layers if r.layer == name)


def _keras_kernel(model, name):
    quantizer, variable = syq_tf.models.layer_kernels(model.get_layer(name))["kernel"]
    return np.asarray(quantizer(tf.convert_to_tensor(variable)))


def test_lce_is_a_target_and_packs_the_binary_layers(exported):
    _, _, result = exported
    assert "lce" in TARGETS and result.target == "lce"
    assert [r.layer for r in result.layers if r.packed] == ["bin_same", "bin_valid", "bin_step"]
    ops = result.ops
    assert "LceBconv2d" in ops and "LceQuantize" in ops
    assert len(lce_format.bconv_ops(result.flatbuffer)) == 3
    for name in ("bin_same", "bin_valid", "bin_step"):
        r = _report(result, name)
        assert r.exact and r.op == "LceBconv2d" and r.bits == 1 and r.stored_levels == 2 and r.keras_levels == 2


def test_packed_filters_decode_to_the_keras_codebook(exported):
    model, _, result = exported
    bconvs = lce_format.bconv_ops(result.flatbuffer)
    # bin_valid: nothing folded into its multiplier (a per-sample MUL follows): signs x multiplier is the
    # Keras ±alpha kernel bit for bit; 36 input channels -> 2 words with 28 zero padding bits
    q = _keras_kernel(model, "bin_valid")
    op = bconvs[1]
    assert op.filter.shape == (36, 3, 3, 2) and op.options["channels_in"] == 40
    decoded = lce_format.unpack_signs(op.filter, 40) * op.multiplier.reshape(1, 1, 1, -1)
    np.testing.assert_array_equal(decoded, q)
    assert set(np.unique(np.abs(q) / np.abs(q).max(axis=(0, 1, 2)))) == {1.0}
    # bin_same: signs exact; multiplier = alpha x the folded BatchNorm scale
    q = _keras_kernel(model, "bin_same")
    np.testing.assert_array_equal(lce_format.unpack_signs(bconvs[0].filter, 32), np.sign(q))
    bn = model.get_layer("bn1")
    folded = np.abs(q[0, 0, 0]) * bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    np.testing.assert_allclose(bconvs[0].multiplier, folded, rtol=1e-5)
    # bin_step ({0, 1} inputs): the negated kernel's signs; its output sign is fused (thresholds)
    q = _keras_kernel(model, "bin_step")
    np.testing.assert_array_equal(lce_format.unpack_signs(bconvs[2].filter, 36), -np.sign(q))
    assert bconvs[2].options["pad_values"] == 1 and bconvs[2].options["stride_height"] == 2
    assert bconvs[0].options["pad_values"] == 0


def test_lce_interpreter_matches_keras(exported):
    model, x, result = exported
    v = result.verification
    assert v["data"] == "verify_data" and v["examples"] == 200
    assert v["top1_agreement"] >= 0.99
    assert v["max_abs_diff"] < 1e-4
    ours = lce_format.lce_predict(result.flatbuffer, x[:20])
    np.testing.assert_allclose(ours, model.predict(x[:20], verbose=0), atol=1e-4)


def test_unpackable_layers_are_reported_with_the_reason(exported):
    _, _, result = exported
    pixel, fc = _report(result, "pixel"), _report(result, "fc")
    assert not pixel.packed and pixel.op == "CONV_2D" and "granularity 'pixel'" in pixel.note
    assert "kept float32" in pixel.note and pixel.exact  # float32 holds the codebook (x folded BN)
    assert pixel.storage == "float32" and pixel.bits == 1 and pixel.scales == 9  # one alpha per pixel
    assert pixel.weight_bytes == 4 * pixel.weights and pixel.min_bytes == -(-pixel.weights // 8) + 4 * 9
    assert not fc.packed and fc.op == "FULLY_CONNECTED" and "zero weights" in fc.note  # ternary
    assert any("'pixel'" in n for n in result.notes) and any("'fc'" in n for n in result.notes)
    text = result.table()
    assert "LceBconv2d" in text and "granularity 'pixel'" in text and "top1_agreement" in text


def test_bytes_stored_vs_theoretical_minimum(exported):
    _, _, result = exported
    same = _report(result, "bin_same")  # 32 input channels: one word per pixel, no padding
    assert same.weights == 3 * 3 * 32 * 40
    assert same.weight_bytes == same.weights // 8 == 1440
    assert same.scales == 40 and same.scale_bytes == 4 * 40 and same.min_bytes == 1440 + 4 * 40
    assert same.stored_bytes == same.min_bytes
    step = _report(result, "bin_step")  # 36 input channels padded to 64 bits
    assert step.weight_bytes == 33 * 3 * 3 * 2 * 4
    assert "padded to 64 bits" in step.note
    totals = result.totals()
    assert totals["packed_weight_bytes"] == 1440 + 36 * 9 * 8 + 33 * 9 * 8


def test_save_writes_model_and_report(exported, tmp_path):
    _, _, result = exported
    path = str(tmp_path / "out" / "model.tflite")
    result.save(path)
    with open(path, "rb") as f:
        assert f.read() == result.flatbuffer
    with open(path + ".json") as f:
        report = json.load(f)
    assert report["target"] == "lce" and report["lce"]["packed_layers"] == ["bin_same", "bin_valid", "bin_step"]
    assert sorted(os.listdir(tmp_path / "out")) == ["model.tflite", "model.tflite.json"]


def test_failed_save_leaves_no_partial_file(exported, tmp_path):
    _, _, result = exported
    path = str(tmp_path / "model.tflite")
    os.mkdir(path + ".json")  # the report cannot be written
    with pytest.raises(OSError):
        result.save(path)
    assert os.listdir(tmp_path) == ["model.tflite.json"]


# ---- bad input ----------------------------------------------------------------------------------


def test_model_with_nothing_to_pack_is_refused_naming_the_layers(tmp_path):
    inp = tf.keras.Input((8, 8, 4))
    h = lq.layers.QuantConv2D(8, 3, padding="same", name="tern", kernel_quantizer=Q.SYQ(2, "channel"),
                              input_quantizer="ste_sign")(inp)
    h = lq.layers.QuantConv2D(8, 3, padding="same", name="pix", kernel_quantizer=Q.SYQ(1, "pixel"),
                              input_quantizer="ste_sign")(h)
    h = lq.layers.QuantConv2D(8, 3, padding="same", name="eightbit", kernel_quantizer=Q.SYQ(1, "channel"),
                              input_quantizer=Q.DoReFa(8))(h)
    out = tf.keras.layers.Dense(3, name="head")(tf.keras.layers.Flatten()(h))
    model = tf.keras.Model(inp, out)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 4)).astype(np.float32)
    with pytest.raises(ValueError) as err:
        to_tflite(model, x, target="lce")
    msg = str(err.value)
    assert "no layer can be bit-packed" in msg
    assert "'tern'" in msg and "zero weights" in msg
    assert "'pix'" in msg and "granularity 'pixel'" in msg
    assert "'eightbit'" in msg and "DoReFa(8)" in msg
    assert "'head'" in msg and "float kernel" in msg


def test_recurrent_model_is_refused():
    inp = tf.keras.Input((5, 3))
    model = tf.keras.Model(inp, tf.keras.layers.LSTM(4, name="rnn")(inp))
    with pytest.raises(ValueError, match="'rnn'"):
        to_tflite(model, np.zeros((2, 5, 3), np.float32), target="lce")


def test_missing_lce_is_one_line_naming_the_package_and_python(monkeypatch):
    """Where larq-compute-engine is not installed (on 3.13 for real; elsewhere hidden from import),
    target 'lce' plans the model, then refuses in one line naming the package and the Python."""
    if HAVE_LCE:
        monkeypatch.setitem(sys.modules, "larq_compute_engine", None)  # import raises ModuleNotFoundError
    inp = tf.keras.Input((8, 8, 3))
    h = lq.layers.QuantConv2D(32, 3, padding="same", name="bin", kernel_quantizer=Q.SYQ(1, "channel"),
                              input_quantizer="ste_sign")(inp)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(3)(tf.keras.layers.Flatten()(h)))
    x = np.random.default_rng(2).normal(size=(4, 8, 8, 3)).astype(np.float32)
    with pytest.raises(ModuleNotFoundError) as err:
        to_tflite(model, x, target="lce")
    msg = str(err.value)
    assert "\n" not in msg and err.value.name == "larq_compute_engine"
    assert msg.startswith("to_tflite(target='lce') needs the package larq-compute-engine, which ")
    if sys.version_info >= (3, 13):
        assert f"publishes no wheel for Python {PYTHON}" in msg and "target 'litert'" in msg
    else:
        assert "is not installed: pip install 'syq_tf[lce]'" in msg
    with pytest.raises(ModuleNotFoundError, match="larq-compute-engine"):
        lce_format.lce_predict(b"", x)


# ---- int8 weights for the layers LCE cannot pack (the default) --------------------------------------


def test_int8_codebook_exact_for_integer_codebooks_and_rounded_otherwise():
    a = np.float32(0.37)
    ternary = np.array([[-a, 0, a, a], [0.5, -0.5, 0, 0.5]], np.float32)  # rows = output channels
    q, scales, exact = codebook.int8_from_float(ternary, axis=0)
    assert exact and q.dtype == np.int8
    np.testing.assert_array_equal(q, [[-127, 0, 127, 127], [127, -127, 0, 127]])
    np.testing.assert_allclose(q * scales[:, None], ternary, rtol=1e-6)
    # odd multiples of delta/2 (UniQ 2 bit): unit delta/2, k in {±1, ±3}, m = 127 // 3 = 42
    d = np.float32(0.2)
    uniq = np.array([[-1.5 * d, -0.5 * d, 0.5 * d, 1.5 * d]], np.float32)
    q, scales, exact = codebook.int8_from_float(uniq, axis=0)
    assert exact
    np.testing.assert_array_equal(q, [[-126, -42, 42, 126]])
    np.testing.assert_allclose(q[0] * scales[0], uniq[0], rtol=1e-6)
    # depthwise layout: channels on the last axis; an all-zero channel gets scale 1 and zeros
    dw = np.stack([ternary[0], np.zeros(4, np.float32)], axis=-1)[None]  # [1, 4, 2] -> channel axis 2
    q, scales, exact = codebook.int8_from_float(dw, axis=2)
    assert exact and scales[1] == 1.0 and not q[..., 1].any()
    # no integer form (unrelated magnitudes): scale max|w|/127, rounding error at most half a step
    w = np.random.default_rng(3).normal(size=(3, 50)).astype(np.float32)
    q, scales, exact = codebook.int8_from_float(w, axis=0)
    assert not exact
    np.testing.assert_allclose(scales, np.abs(w).max(axis=1) / 127, rtol=1e-6)
    assert np.all(np.abs(q * scales[:, None] - w) <= scales[:, None] / 2 + 1e-7)


def test_unpackable_quantized_layers_store_int8_weights(exported_int8):
    model, _, result, caught = exported_int8
    assert result.weights == "int8" and result.to_dict()["requantization"] is None  # LCE sets no bias rounding
    fc, pixel, conv0 = _report(result, "fc"), _report(result, "pixel"), _report(result, "conv0")
    # read back from the flatbuffer: constant INT8 tensors, DEQUANTIZE ops first in the graph
    from syq_tf.export import flatbuffer
    ops = flatbuffer.op_names(result.flatbuffer)
    assert ops[:2] == ["DEQUANTIZE", "DEQUANTIZE"] and ops.count("DEQUANTIZE") == 2
    stored = {t.op: t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.dequantized}
    assert sorted(stored) == ["CONV_2D", "FULLY_CONNECTED"]
    t = stored["FULLY_CONNECTED"]
    assert t.dtype == "INT8" and t.values.shape == (10, 16) and t.scales.size == 10
    # fc: SYQ 2-bit layer codebook {-a, 0, a} -> {-127, 0, 127} in every channel, zeros kept
    q = _keras_kernel(model, "fc").T
    assert set(np.unique(t.values)) <= {-127, 0, 127}
    np.testing.assert_array_equal(t.values == 0, q == 0)
    np.testing.assert_array_equal(np.sign(t.values), np.sign(q))
    assert fc.storage == "int8" and fc.exact and fc.stored_levels == 3
    assert fc.weight_bytes == 160 and fc.scale_bytes == 40 and fc.stored_bytes == 200
    assert "stored int8" in fc.note and "zero weights" in fc.note
    # pixel: 9 alphas per channel have no integer form: rounded, reported, warned
    assert pixel.storage == "int8" and not pixel.exact and 0 < pixel.max_rel_alpha_error < 1 / 127
    assert "int8 rounds this codebook" in pixel.note and pixel.weight_bytes == pixel.weights
    assert any("'pixel'" in m and "weights='float32'" in m for m in caught)
    # float layers stay float32
    assert conv0.storage == "float32" and conv0.quantizer == "float"
    assert result.totals()["int8_layers"] == ["pixel", "fc"]
    assert result.totals()["float32_layers"] == ["conv0"]
    assert "int8" in result.table()


def test_int8_model_is_smaller_and_still_matches_keras(exported, exported_int8):
    _, _, f32 = exported
    _, _, int8, _ = exported_int8
    saved = (_report(f32, "pixel").weight_bytes - _report(int8, "pixel").stored_bytes
             + _report(f32, "fc").weight_bytes - _report(int8, "fc").stored_bytes)
    assert saved == (4752 * 3 - 64) + (480 - 40)
    # the float data is gone, not just shadowed: the file shrank by what the report says, less the
    # new tensors, quantization tables and DEQUANTIZE ops (under 1 KiB)
    assert saved - 1024 <= f32.model_bytes - int8.model_bytes <= saved
    assert int8.verification["top1_agreement"] >= 0.99 and int8.verification["max_abs_diff"] < 0.05
    # the packed layers are untouched by the int8 rewrite
    for a, b in zip(lce_format.bconv_ops(f32.flatbuffer), lce_format.bconv_ops(int8.flatbuffer)):
        np.testing.assert_array_equal(a.filter, b.filter)


@needs_lce
def test_int8_with_exact_codebooks_computes_like_keras():
    tf.keras.utils.set_random_seed(3)
    inp = tf.keras.Input((8, 8, 3))
    h = tf.keras.layers.Conv2D(32, 3, padding="same", name="conv0")(inp)
    h = lq.layers.QuantConv2D(32, 3, padding="same", use_bias=False, name="bin",
                              kernel_quantizer=Q.SYQ(1, "channel"), input_quantizer="ste_sign")(h)
    h = tf.keras.layers.BatchNormalization(name="bn")(h)
    h = lq.layers.QuantConv2D(8, 3, padding="same", name="tern", kernel_quantizer=Q.SYQ(2, "channel"),
                              input_quantizer=Q.DoReFa(8))(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    out = lq.layers.QuantDense(10, name="fc", kernel_quantizer=Q.UniQ(2, "channel"))(h)
    model = tf.keras.Model(inp, out)
    bn = model.get_layer("bn")
    bn.set_weights([np.full(32, 1.5), np.full(32, 0.1), np.zeros(32), np.full(32, 4.0)])
    x = np.random.default_rng(2).uniform(0, 1, (64, 8, 8, 3)).astype(np.float32)
    result = to_tflite(model, x[:8], target="lce", verify_data=x, require_exact=True)
    assert [r.layer for r in result.layers if r.storage == "int8"] == ["tern", "fc"]
    assert all(r.exact for r in result.layers if r.quantizer != "float")
    assert result.verification["top1_agreement"] == 1.0
    # exact int8 codebooks change nothing: the same outputs as the float32-kernel export, to float32
    # rounding (both differ from Keras by the same DoReFa(8) rounding at a level boundary)
    f32 = to_tflite(model, x[:8], target="lce", weights="float32")
    np.testing.assert_allclose(lce_format.lce_predict(result.flatbuffer, x), lce_format.lce_predict(f32.flatbuffer, x),
                               rtol=1e-5, atol=1e-6)


def test_require_exact_names_the_rounded_int8_layer(exported):
    model, x, _ = exported
    with pytest.raises(ValueError, match=r"require_exact=True.*'pixel'") as err:
        to_tflite(model, x[:8], target="lce", require_exact=True)
    assert "'fc'" not in str(err.value)
    to_tflite(model, x[:8], target="lce", require_exact=True, weights="float32", verify_data=x[:4])


def test_weights_option_is_checked_per_target(exported):
    model, x, _ = exported
    with pytest.raises(ValueError, match="weights='int4' is for target 'litert'"):
        to_tflite(model, x[:8], target="lce", weights="int4")
    with pytest.raises(ValueError, match="weights='float32' is for target 'lce'"):
        to_tflite(model, x[:8], target="litert", weights="float32")
    with pytest.raises(ValueError, match="allowed"):
        to_tflite(model, x[:8], target="lce", weights="int3")  # int2 is a litert storage now


def test_dequantize_weights_refuses_bad_updates(exported, exported_int8):
    from syq_tf.export import flatbuffer
    _, _, result = exported
    t = next(t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.op == "FULLY_CONNECTED")
    with pytest.raises(ValueError, match="int8 values of shape"):
        flatbuffer.dequantize_weights(result.flatbuffer, {t.tensor_index: (np.zeros((3, 3), np.int8), [1.0], 0)})
    with pytest.raises(ValueError, match="scales"):
        flatbuffer.dequantize_weights(result.flatbuffer,
                                      {t.tensor_index: (np.zeros(t.values.shape, np.int8), [1.0, 2.0], 0)})
    _, _, int8, _ = exported_int8  # an INT8 tensor is not float weights to store
    stored = next(t for t in flatbuffer.weight_tensors(int8.flatbuffer) if t.dequantized)
    with pytest.raises(ValueError, match="not a constant float32 tensor"):
        flatbuffer.dequantize_weights(int8.flatbuffer, {stored.tensor_index: (stored.values, stored.scales, 0)})


# ---- binary Dense layers: a 1x1 LceBconv2d --------------------------------------------------------


@needs_lce
def test_binary_dense_layers_become_1x1_bconvs():
    """The demo CNN at W1A1 ({0, 1} DoReFa(1) inputs): conv2-4 and the flat fc1 are packed; fc1 as a
    1x1 LceBconv2d on [batch, 1, 1, features]; outputs equal Keras'."""
    from syq_tf.recipes import build_cnn
    tf.keras.utils.set_random_seed(4)
    model = build_cnn(1, "channel", 1, widths=(8, 8, 16, 16, 40))
    x = np.random.default_rng(4).uniform(0, 1, (64, 28, 28, 1)).astype(np.float32)
    result = to_tflite(model, x[:8], target="lce", verify_data=x)
    assert [r.layer for r in result.layers if r.packed] == ["conv2", "conv3", "conv4", "fc1"]
    fc1 = _report(result, "fc1")
    features = model.get_layer("fc1").input_shape[-1]
    assert fc1.op == "LceBconv2d" and fc1.exact and fc1.weights == features * 40
    assert fc1.weight_bytes == 40 * 4 * -(-features // 32)  # 32 features per int32 word
    bconv = lce_format.bconv_ops(result.flatbuffer)[3]
    assert bconv.filter.shape == (40, 1, 1, -(-features // 32))
    q = _keras_kernel(model, "fc1").reshape(1, 1, features, 40)
    np.testing.assert_array_equal(lce_format.unpack_signs(bconv.filter, features), -np.sign(q))  # {0, 1}: negated
    assert "FULLY_CONNECTED" in result.ops  # the float logits layer
    assert result.verification["top1_agreement"] == 1.0 and result.verification["max_abs_diff"] < 1e-4


@needs_lce
def test_binary_dense_with_sign_inputs_and_non_flat_dense():
    tf.keras.utils.set_random_seed(5)
    inp = tf.keras.Input((6, 24))
    # binary x binary sums are integer multiples of alpha and hit 0 exactly, where a float sum in
    # another order can give a tiny ±value and flip the next sign: random biases keep clear of ties
    seq = lq.layers.QuantDense(8, name="per_step", kernel_quantizer=Q.SYQ(1, "channel"),
                               input_quantizer="ste_sign", bias_initializer="random_normal")(inp)  # rank 3: not packed
    h = lq.layers.QuantConv2D(32, 3, padding="same", name="conv", kernel_quantizer=Q.SYQ(1, "channel"),
                              input_quantizer="ste_sign", bias_initializer="random_normal",
                              )(tf.keras.layers.Reshape((6, 8, 1))(seq))
    h = tf.keras.layers.Flatten()(h)
    out = lq.layers.QuantDense(12, name="flat", use_bias=True, kernel_quantizer=Q.UniQ(1, "channel"),
                               input_quantizer="ste_sign", bias_initializer="glorot_uniform")(h)
    model = tf.keras.Model(inp, out)
    x = np.random.default_rng(5).normal(size=(32, 6, 24)).astype(np.float32)
    result = to_tflite(model, x[:8], target="lce", verify_data=x)
    assert [r.layer for r in result.layers if r.packed] == ["conv", "flat"]
    per_step = _report(result, "per_step")
    assert "rank-3 input" in per_step.note and per_step.storage == "int8" and per_step.exact
    flat = _report(result, "flat")
    bconv = lce_format.bconv_ops(result.flatbuffer)[1]
    q = _keras_kernel(model, "flat")
    np.testing.assert_array_equal(lce_format.unpack_signs(bconv.filter, q.shape[0]), np.sign(q).reshape(1, 1, *q.shape))
    np.testing.assert_allclose(bconv.multiplier, np.abs(q[0]), rtol=1e-6)  # alpha per output, nothing folded
    assert flat.exact and result.verification["top1_agreement"] == 1.0
    np.testing.assert_allclose(lce_format.lce_predict(result.flatbuffer, x), model.predict(x, verbose=0), atol=1e-4)


@needs_lce
def test_quicknet_style_block_with_a_float_larq_depthwise_exports():
    # larq-zoo's QuickNet transition blocks use QuantDepthwiseConv2D without quantizers (a float
    # layer of larq's class): it is kept float, the binary conv after it is packed
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16, 16, 3)).astype(np.float32)
    y = (x[..., 0].mean((1, 2)) > 0).astype(np.int32)
    inp = tf.keras.Input((16, 16, 3))
    h = tf.keras.layers.Conv2D(32, 3, padding="same", name="stem")(inp)
    h = tf.keras.layers.BatchNormalization()(h)
    h = lq.layers.QuantDepthwiseConv2D(3, strides=2, padding="same", use_bias=False, name="transition_dw")(h)
    h = tf.keras.layers.BatchNormalization()(h)
    r = lq.layers.QuantConv2D(32, 3, padding="same", input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                              kernel_constraint="weight_clip", use_bias=False, name="bconv")(h)
    r = tf.keras.layers.BatchNormalization()(r)
    h = tf.keras.layers.Add()([h, r])
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(2)(h))
    model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)
    result = to_tflite(model, x[:32], target="lce", verify_data=x[:64])
    layers = {r.layer: r for r in result.layers}
    assert layers["bconv"].packed and layers["bconv"].exact
    assert not layers["transition_dw"].packed and layers["transition_dw"].storage == "float32"
    assert "DepthwiseConv2D layer" in layers["transition_dw"].note
    assert result.verification["top1_agreement"] >= 0.99, result.verification


@needs_lce
def test_channel_with_a_tiny_scale_still_packs():
    """LCE's converter keeps a conv float if a channel's filter magnitude is <= float32 epsilon (a
    dead channel: a UniQ step at its floor, 1e-8): that channel gets a ±1 filter and its scale as a
    per-channel MUL, which the converter folds into the multiplier."""
    tf.keras.utils.set_random_seed(6)
    inp = tf.keras.Input((6, 6, 32))
    h = lq.layers.QuantConv2D(8, 3, padding="same", use_bias=False, name="bin", kernel_quantizer=Q.SYQ(1, "channel"),
                              input_quantizer="ste_sign")(inp)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(3, name="head")(tf.keras.layers.Flatten()(h)))
    quantizer = model.get_layer("bin").kernel_quantizer
    alpha = np.full((1, 1, 1, 8), 0.05, np.float32)
    alpha[..., 2] = 5e-9
    quantizer.alpha.assign(alpha)
    quantizer.alpha_initialized.assign(True)
    x = np.random.default_rng(6).normal(size=(32, 6, 6, 32)).astype(np.float32)
    result = to_tflite(model, x[:8], target="lce", verify_data=x)
    assert [r.layer for r in result.layers if r.packed] == ["bin"] and _report(result, "bin").exact
    bconv, = lce_format.bconv_ops(result.flatbuffer)
    np.testing.assert_allclose(bconv.multiplier, alpha.ravel(), rtol=1e-6)
    q = _keras_kernel(model, "bin")
    np.testing.assert_array_equal(lce_format.unpack_signs(bconv.filter, 32), np.sign(q))
    assert result.verification["top1_agreement"] == 1.0 and result.verification["max_abs_diff"] < 1e-5
