"""Packed INT2 weights for LiteRT (``to_tflite(..., weights="int2")``): binary and ternary
FULLY_CONNECTED kernels four weights a byte, convolutions INT4 (LiteRT has no INT2 convolution)."""

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import separable_data
from syq_tf.export import codebook, flatbuffer, litert
from syq_tf.export import int8 as int8_stage
from syq_tf.export.runtime import litert_int8_outputs
from syq_tf.quantizers import SYQ, DoReFa, UniQ

INT2 = codebook.STORAGE["int2"]


def test_int2_packing_order_and_round_trip():
    # four 2-bit two's-complement fields a byte, the first value in the lowest bits:
    # [1, -1, 0, -2] -> 01, 11, 00, 10 -> 0b10_00_11_01
    assert codebook.pack_bits([1, -1, 0, -2], 2) == bytes([0b10001101])
    assert codebook.pack_bits([1, 1, 1, 1, -1], 2) == bytes([0x55, 0x03])  # a partial byte is zero-padded
    rng = np.random.default_rng(0)
    for count in (1, 3, 4, 5, 117):
        v = rng.integers(-2, 2, count)
        np.testing.assert_array_equal(codebook.unpack_bits(codebook.pack_bits(v, 2), 2, count), v)
    with pytest.raises(ValueError, match="do not fit int2"):
        codebook.pack_bits([2], 2)
    with pytest.raises(ValueError, match="INT2 data of 1 bytes cannot hold 5 values"):
        codebook.unpack_bits(b"\x00", 2, 5)


def _tensor(values, scales):
    values = np.asarray(values, np.int8)
    return flatbuffer.WeightTensor("FULLY_CONNECTED", "w", "INT8", values.shape, values,
                                   np.asarray(scales, np.float32), np.zeros(len(scales), np.int64), 0)


def test_int2_keeps_binary_and_ternary_codebooks_exact():
    # per channel: binary +-127, ternary {-64, 0, 64}, all zero
    w = np.array([[127, -127, 127, -127], [64, 0, -64, 0], [0, 0, 0, 0]])
    scales = [0.01, 0.02, 0.5]
    bias = np.array([1000, -2540, 7], np.int32)
    values, new_scales, new_bias = codebook.narrowed(_tensor(w, scales), bias, INT2)
    np.testing.assert_array_equal(values, [[1, -1, 1, -1], [1, 0, -1, 0], [0, 0, 0, 0]])
    # value x scale unchanged (0.01 x 127 per step, 0.02 x 64), the bias follows its scale
    np.testing.assert_allclose(new_scales, [0.01 * 127, 0.02 * 64, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(new_bias, [round(1000 / 127), round(-2540 / 64), 7])
    # three steps (UniQ 2 bit: odd multiples +-1, +-3) do not fit |q| <= 1
    reason = codebook.narrowed(_tensor([[21, -63, 63, -21]], [0.1]), None, INT2)
    assert isinstance(reason, str) and "largest |k| 3" in reason and "|k| <= 1" in reason


def test_a_bias_lowered_for_two_roundings_stays_one_unit_lower_in_the_new_scale():
    # stored biases 1000 and -2540 were lowered by one from 1001 and -2539 (TFLM's two roundings):
    # re-expressed from those (x 1/127, x 1/64) and lowered one unit of the new scale. Re-expressing
    # the lowered values would give round(1000/127) = 8 = round(1001/127): the offset rounded away.
    w = np.array([[127, -127, 127, -127], [64, 0, -64, 0]])
    bias = np.array([1000, -2540], np.int32)
    _, _, new_bias = codebook.narrowed(_tensor(w, [0.01, 0.02]), bias, INT2, lowered=True)
    np.testing.assert_array_equal(new_bias, [round(1001 / 127) - 1, round(-2539 / 64) - 1])
    assert new_bias.tolist() == [7, -41]
    _, _, plain = codebook.narrowed(_tensor(w, [0.01, 0.02]), bias, INT2)
    assert plain.tolist() == [8, -40]
    lowest = codebook.narrowed(_tensor(w[:1], [0.01]), np.array([-(2**31)], np.int64), INT2, lowered=True)[2]
    assert lowest.tolist() == [round((1 - 2**31) / 127) - 1]


def int2_model(x):
    inp = tf.keras.Input((8, 8, 1))
    h = syq_tf.quantize(tf.keras.layers.Conv2D(6, 3, name="conv"), kernel_quantizer=SYQ(2, "channel"),
                        input_quantizer=DoReFa(8))(inp)
    h = tf.keras.layers.Flatten()(h)  # 216 features
    h = syq_tf.quantize(tf.keras.layers.Dense(22, name="tern"), kernel_quantizer=SYQ(2, "channel"),
                        input_quantizer=DoReFa(8))(h)
    h = syq_tf.quantize(tf.keras.layers.Dense(20, name="bin"), kernel_quantizer=SYQ(1, "channel"),
                        input_quantizer=DoReFa(8))(h)
    h = syq_tf.quantize(tf.keras.layers.Dense(16, name="uniq2"), kernel_quantizer=UniQ(2, "channel"),
                        input_quantizer=DoReFa(8))(h)
    out = tf.keras.layers.Dense(4, name="logits")(h)
    model = tf.keras.Model(inp, out)
    model.compile(tf.keras.optimizers.Adam(3e-3),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def exported():
    x, y = separable_data(640, seed=5)
    model = int2_model(x)
    syq_tf.reinitialize_scales(model)
    model.fit(x[:512], y[:512], epochs=2, batch_size=64, verbose=0)
    kwargs = dict(representative_data=x[:64], verify_data=x[512:], verify_labels=y[512:])
    return model, syq_tf.export.to_tflite(model, **kwargs), syq_tf.export.to_tflite(model, weights="int2", **kwargs)


def test_int2_export_stores_binary_and_ternary_fc_in_two_bits(exported):
    _, int8, int2 = exported
    stored = {t.op + str(t.values.shape): t for t in flatbuffer.weight_tensors(int2.flatbuffer)}
    for key, levels in (("FULLY_CONNECTED(22, 216)", {-1, 0, 1}), ("FULLY_CONNECTED(20, 22)", {-1, 1})):
        t = stored[key]
        assert t.dtype == "INT2" and t.stored_bytes == (t.values.size + 3) // 4, t
        assert set(np.unique(t.values)) == levels
    assert stored["CONV_2D(6, 3, 3, 1)"].dtype == "INT4"  # no INT2 convolution in LiteRT
    assert stored["FULLY_CONNECTED(16, 20)"].dtype == "INT4"  # UniQ 2 bit: +-1, +-3 steps
    assert stored["FULLY_CONNECTED(4, 16)"].dtype == "INT8"  # float layer
    layers = {r.layer: r for r in int2.layers}
    for name in ("tern", "bin"):
        r, r8 = layers[name], next(r for r in int8.layers if r.layer == name)
        assert r.storage == "int2" and r.exact and "packed INT2" in r.note, r
        assert r.weight_bytes == (r.weights + 3) // 4 and r8.weight_bytes == r.weights
    # the ternary kernel is at its minimum: 2 bits a weight plus one float scale per channel
    assert layers["tern"].stored_bytes / layers["tern"].min_bytes <= 1.05
    assert layers["conv"].storage == "int4" and layers["uniq2"].storage == "int4"
    assert any("'conv': stored INT4, not INT2 (CONV_2D takes no INT2 weights in LiteRT)" in n for n in int2.notes)
    assert any("'uniq2': stored INT4, not INT2 (" in n and "largest |k| 3" in n for n in int2.notes)
    assert int2.weights == "int2" and int2.to_dict()["weights"] == "int2"
    # the op code announces sub-byte filters
    codes = flatbuffer.read(int2.flatbuffer).operatorCodes
    assert min(c.version for c in codes if c.builtinCode == 9) >= INT2.op_version("FULLY_CONNECTED")


def test_int2_outputs_equal_the_int8_twin(exported):
    model, int8, int2 = exported
    v = int2.verification
    assert v["int2_equals_int8_twin_builtin"] and v["top1_agreement"] >= 0.9, v
    # the twin, rebuilt here: the same integers stored int8 compute the same outputs (builtin kernels)
    buffer, twin, packed, _ = litert.pack(model, int8.flatbuffer, [INT2, codebook.STORAGE["int4"]])
    assert buffer == int2.flatbuffer and {k: f.name for k, f in packed.items()} == {
        "conv": "int4", "tern": "int2", "bin": "int2", "uniq2": "int4"}
    x = separable_data(640, seed=5)[0][512:576]
    xq = int8_stage.quantize_input(x, *int8_stage.input_quantization(int2.flatbuffer))
    for kernels in ("builtin", "ref"):
        np.testing.assert_array_equal(litert_int8_outputs(buffer, xq, kernels), litert_int8_outputs(twin, xq, kernels))
    # every stored INT2 level times its scale is the Keras codebook (read back, per channel)
    kernel = np.asarray(model.get_layer("tern").quantized_kernel()).T  # [out, in]
    t = next(t for t in flatbuffer.weight_tensors(int2.flatbuffer) if t.dtype == "INT2" and t.values.shape == (22, 216))
    np.testing.assert_allclose(t.values * t.scales[:, None], kernel, rtol=1e-6, atol=1e-7)


def test_int2_rows_not_a_multiple_of_four_are_noted(exported):
    model, int8, int2 = exported
    # 'bin' has 22 input features, 'tern' 216: XNNPACK takes INT2 rows of a multiple of 4 only
    assert [n for n in int2.notes if "not a multiple of 4" in n] == [
        "layer 'bin': INT2 rows of 22 input features (not a multiple of 4): XNNPACK leaves this "
        "FULLY_CONNECTED to LiteRT's builtin kernels (measured)"]


def test_int2_option_errors(exported):
    model, _, _ = exported
    x = separable_data(8)[0]
    with pytest.raises(ValueError, match="weights='int2' is for target 'litert' \\(got target='tflm'\\)"):
        syq_tf.export.to_tflite(model, x, target="tflm", weights="int2")
    with pytest.raises(ValueError, match="'int2' \\(target 'litert'\\)"):
        syq_tf.export.to_tflite(model, x, weights="int1")
