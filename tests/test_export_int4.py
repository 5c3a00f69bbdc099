"""Packed INT4 weights for LiteRT (``to_tflite(..., weights="int4")``) and the theoretical-minimum
columns of the export report."""

import json

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import separable_data
from syq_tf.export import codebook, flatbuffer, litert
from syq_tf.export import int8 as int8_stage
from syq_tf.export.runtime import litert_int8_outputs
from syq_tf.kernels import run_tflite
from syq_tf.quantizers import SYQ, DoReFa, UniQ, UniQActivation

INT4 = codebook.STORAGE["int4"]
INT4_MAX = INT4.max_int


def int4_update(tensor, bias):
    return codebook.narrowed(tensor, bias, INT4)


def int4_weights(model, buffer):
    return litert.pack(model, buffer, [INT4])


def pack_int4(values):
    return codebook.pack_bits(values, 4)


def unpack_int4(data, count):
    return codebook.unpack_bits(data, 4, count)


def syq_model(bits, granularity):
    """Odd sizes on purpose: 13 channels (the depthwise kernel has 117 weights: a half-used byte)."""
    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="first")(inp)
    x = tf.keras.layers.BatchNormalization()(x)
    x = lq.layers.QuantConv2D(13, 3, use_bias=False, name="qconv",
                              kernel_quantizer=SYQ(bits, granularity), input_quantizer=DoReFa(8))(x)
    x = tf.keras.layers.BatchNormalization()(x)
    x = syq_tf.quantize(tf.keras.layers.DepthwiseConv2D(3, name="dw"), kernel_quantizer=SYQ(bits, granularity),
                        input_quantizer=DoReFa(8))(x)
    x = tf.keras.layers.Flatten()(x)
    x = syq_tf.quantize(tf.keras.layers.Dense(33, name="fc"), kernel_quantizer=SYQ(bits, "layer"),
                        input_quantizer=DoReFa(8))(x)
    out = lq.layers.QuantDense(4, input_quantizer=DoReFa(8), name="logits")(x)
    model = tf.keras.Model(inp, out)
    model.compile(tf.keras.optimizers.Adam(3e-3),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def data():
    return separable_data(640, seed=11)


@pytest.fixture(scope="module")
def ternary(data):
    x, y = data
    tf.keras.utils.set_random_seed(5)
    model = syq_model(2, "channel")
    model.fit(x[:512], y[:512], epochs=1, batch_size=32, verbose=0)
    int8 = syq_tf.export.to_tflite(model, representative_data=x[:64])
    int4 = syq_tf.export.to_tflite(model, representative_data=x[:64], weights="int4",
                                   verify_data=x[512:], verify_labels=y[512:])
    return model, int8, int4


# ---- the packing -------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 7, 117, 256])
def test_int4_pack_round_trip(count):
    v = np.random.default_rng(count).integers(-8, 8, count).astype(np.int8)
    data = pack_int4(v)
    assert len(data) == (count + 1) // 2
    np.testing.assert_array_equal(unpack_int4(data, count), v)


def test_int4_nibble_order_is_litert_s():
    # LiteRT reads the first value of each pair from the low nibble (measured: the other order
    # gives wrong outputs), two's complement
    assert pack_int4([1, -1, 7]) == bytes([0xF1, 0x07])
    np.testing.assert_array_equal(unpack_int4(bytes([0x8F]), 2), [-1, -8])
    with pytest.raises(ValueError, match="do not fit int4"):
        pack_int4([8])
    with pytest.raises(ValueError, match="cannot hold 5 values"):
        unpack_int4(b"\x00\x00", 5)


def _tensor(values, scales):
    values = np.asarray(values, np.int8)
    return flatbuffer.WeightTensor("CONV_2D", "w", "INT8", values.shape, values, np.asarray(scales, np.float32),
                                   np.zeros(len(scales), np.int64), 0)


def test_int4_update_keeps_every_level_exact():
    # per channel: binary +-127, ternary {-127, 0, 127}, UniQ-like odd multiples 21 * {+-1, +-3, +-5}
    w = np.array([[127, -127, 127, -127, 127, 127], [127, 0, -127, 0, 0, 127], [21, -63, 105, -105, 63, -21]])
    scales = [0.01, 0.02, 0.003]
    bias = np.array([1000, -2540, 7], np.int32)
    values, new_scales, new_bias = int4_update(_tensor(w, scales), bias)
    assert np.abs(values).max() <= INT4_MAX
    np.testing.assert_array_equal(values[0], [7, -7, 7, -7, 7, 7])
    np.testing.assert_array_equal(values[2], [1, -3, 5, -5, 3, -1])
    # value x scale unchanged: the codebook is the same
    np.testing.assert_allclose(values * new_scales[:, None], w * np.asarray(scales, np.float32)[:, None], rtol=1e-6)
    # the int32 bias follows its scale (in_scale x weight scale): same real value up to rounding
    np.testing.assert_allclose(new_bias * new_scales, bias * np.float32(scales), atol=0.5 * new_scales.max())
    # 12 levels +-11 steps: no int4 form
    reason = int4_update(_tensor([[11, -9, 7, -5, 3, 1]], [0.1]), None)
    assert isinstance(reason, str) and "largest |k| 11" in reason


# ---- the export --------------------------------------------------------------------------------


def test_int4_export_stores_packed_exact_codebooks(ternary):
    _, int8, int4 = ternary
    by_name = {t.name: t for t in flatbuffer.weight_tensors(int8.flatbuffer)}
    stored = {}
    for t in flatbuffer.weight_tensors(int4.flatbuffer):
        stored[t.op + str(t.values.shape)] = t
        if t.dtype == "INT4":
            assert t.stored_bytes == (t.values.size + 1) // 2 and set(np.unique(t.values)) <= {-7, 0, 7}
    assert stored["CONV_2D(13, 3, 3, 8)"].dtype == "INT4"
    assert stored["DEPTHWISE_CONV_2D(1, 3, 3, 13)"].stored_bytes == 59  # 117 weights
    assert stored["FULLY_CONNECTED(33, 208)"].dtype == "INT4"
    assert stored["CONV_2D(8, 3, 3, 1)"].dtype == "INT8" and stored["FULLY_CONNECTED(4, 33)"].dtype == "INT8"
    assert len(by_name) == len(stored)
    layers = {r.layer: r for r in int4.layers}
    for name in ("qconv", "dw", "fc"):
        r, r8 = layers[name], next(r for r in int8.layers if r.layer == name)
        assert r.storage == "int4" and r.exact and r.stored_levels == 3 and "packed INT4" in r.note, r
        assert r.weight_bytes == (r.weights + 1) // 2 and r8.weight_bytes == r.weights
    assert layers["first"].storage == "int8" and int4.weights == "int4" and int8.weights == "int8"
    assert int4.model_bytes < int8.model_bytes - 0.45 * sum(layers[n].weights for n in ("qconv", "dw", "fc"))
    ops = flatbuffer.read(int4.flatbuffer).operatorCodes
    assert sorted(c.version for c in ops if c.builtinCode in (3, 4, 9)) == [7, 7, 10]  # conv, dw, fc


def test_int4_outputs_equal_the_int8_twin_and_track_the_int8_export(ternary):
    model, int8, int4 = ternary
    v = int4.verification
    # LiteRT's builtin kernels unpack INT4 to the same integers: bit-identical to the int8 twin
    assert v["int4_equals_int8_twin_builtin"], v
    # vs the int8 export: the re-expressed bias / multipliers round differently, so not the default
    assert v["top1_agreement_vs_int8_export"] >= 0.97 and v["top1_agreement"] >= 0.9, v
    # our packed-kernel runner reads INT4 too: the same outputs as for the int8 twin, and LiteRT's
    # builtin kernels' up to their rounding ties
    buffer, twin, labels, _ = int4_weights(model, int8.flatbuffer)
    assert buffer == int4.flatbuffer and sorted(labels) == ["dw", "fc", "qconv"]
    x = separable_data(640, seed=11)[0][512:560]
    xq = int8_stage.quantize_input(x, *int8_stage.input_quantization(int4.flatbuffer))
    ours = run_tflite(int4.flatbuffer, xq).reshape(len(x), -1)
    np.testing.assert_array_equal(ours, run_tflite(twin, xq).reshape(len(x), -1))
    assert np.abs(ours.astype(int) - litert_int8_outputs(int4.flatbuffer, xq, "builtin")).max() <= 1


def test_int4_only_where_the_codebook_fits(data):
    x, _ = data
    inp = tf.keras.Input((8, 8, 1))
    h = syq_tf.quantize(tf.keras.layers.Conv2D(6, 3, name="u3"), kernel_quantizer=UniQ(3, "channel"),
                        input_quantizer=UniQActivation(8))(inp)
    h = tf.keras.layers.ReLU()(h)
    h = syq_tf.quantize(tf.keras.layers.Conv2D(6, 3, name="u4"), kernel_quantizer=UniQ(4, "channel"),
                        input_quantizer=UniQActivation(8))(h)
    h = tf.keras.layers.ReLU()(h)
    h = lq.layers.QuantConv2D(5, 3, kernel_quantizer=SYQ(2, "pixel"), input_quantizer=DoReFa(8), name="pix")(h)
    out = tf.keras.layers.Flatten()(h)
    model = tf.keras.Model(inp, out)
    syq_tf.calibrate(model, x[:64], batches=1)
    q = model.get_layer("pix").kernel_quantizer  # pixel alphas with no common step
    q.alpha.assign((np.sqrt([2, 3, 5, 7, 11, 13, 17, 19, 23]) / 20).reshape(q.alpha.shape).astype(np.float32))
    result = syq_tf.export.to_tflite(model, representative_data=x[:32], weights="int4")
    layers = {r.layer: r for r in result.layers}
    assert layers["u3"].storage == "int4" and layers["u3"].exact  # odd multiples +-1..+-7
    # UniQ 4 bit: 16 levels +-1, +-3, ..., +-15 half-steps; symmetric int4 holds 15 at most
    assert layers["u4"].storage == "int8" and layers["pix"].storage == "int8"
    assert any("'u4': kept int8 weights, not INT4" in n for n in result.notes)
    assert any("'pix': kept int8 weights, not INT4" in n for n in result.notes)


def test_int4_errors(data, ternary):
    x, _ = data
    model, _, int4 = ternary
    with pytest.raises(ValueError, match="weights='int3'; allowed: 'int8'"):
        syq_tf.export.to_tflite(model, x[:4], weights="int3")
    with pytest.raises(ValueError, match="weights='int4' is for target 'litert'"):
        syq_tf.export.to_tflite(model, x[:4], target="tflm", weights="int4")
    # a truncated INT4 tensor is named, by the reader and by the runner
    m = flatbuffer.read(int4.flatbuffer)
    g = m.subgraphs[0]
    t = next(t for t in g.tensors if t.type == 17)
    m.buffers[t.buffer].data = m.buffers[t.buffer].data[:-1]
    import flatbuffers
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    bad = bytes(b.Output())
    with pytest.raises(ValueError, match=f"weight tensor {t.name.decode()!r}: INT4 data of"):
        flatbuffer.weight_tensors(bad)
    with pytest.raises(ValueError, match="INT4 data of"):
        run_tflite(bad, np.zeros((1, 8, 8, 1), np.int8))


# ---- the report: theoretical minimum ------------------------------------------------------------


def test_report_has_the_theoretical_minimum(ternary, tmp_path):
    _, int8, int4 = ternary
    for result in (int8, int4):
        layers = {r.layer: r for r in result.layers}
        qconv = layers["qconv"]  # SYQ ternary per channel: 2 bits, 13 alphas
        assert (qconv.bits, qconv.weights, qconv.scales) == (2, 13 * 9 * 8, 13)
        assert qconv.min_bytes == 2 * 13 * 9 * 8 // 8 + 4 * 13
        assert qconv.stored_bytes == qconv.weight_bytes + 4 * 13  # 13 float32 TFLite scales
        assert layers["fc"].scales == 1  # layer-wise SYQ: one alpha
        assert layers["first"].min_bytes == layers["first"].stored_bytes  # float: no minimum of its own
        totals = result.low_bit_totals()
        assert totals["layers"] == 3
        assert totals["min_bytes"] == sum(layers[n].min_bytes for n in ("qconv", "dw", "fc"))
        assert totals["stored_over_min"] == pytest.approx(totals["stored_bytes"] / totals["min_bytes"])
        table = result.table()
        assert "min B" in table and "theoretical minimum" in table
    assert int4.low_bit_totals()["stored_bytes"] < 0.55 * int8.low_bit_totals()["stored_bytes"]
    path = int4.save(str(tmp_path / "m.tflite"))
    report = json.load(open(path + ".json"))
    assert report["weights"] == "int4" and report["low_bit_weights"]["min_bytes"] == int4.low_bit_totals()["min_bytes"]
    assert {"bits", "weights", "scales", "stored_bytes", "min_bytes", "storage"} <= set(report["layers"][1])
