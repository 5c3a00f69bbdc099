"""TFLite Micro export (target 'tflm'): LUT-packed low-bit weights in TFLM's DECODE format, run by
the TFLM interpreter bit-identically to the uncompressed int8 model, C array that compiles."""

import os
import shutil
import subprocess
import sys

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import separable_data
from syq_tf.export.codebook import bits_for_levels
from syq_tf.export import int8 as int8_stage, tflm
from syq_tf.export.runtime import litert_int8_outputs
from syq_tf.quantizers import SYQ, DoReFa, UniQ, UniQActivation

pytest.importorskip("tflite_micro")


def syq_model(bits, granularity):
    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="first")(inp)
    x = tf.keras.layers.BatchNormalization()(x)
    x = lq.layers.QuantConv2D(13, 3, use_bias=False, name="qconv",  # 13 channels: not a multiple of 8
                              kernel_quantizer=SYQ(bits, granularity), input_quantizer=DoReFa(8))(x)
    x = tf.keras.layers.BatchNormalization()(x)
    x = syq_tf.quantize(tf.keras.layers.DepthwiseConv2D(3, name="dw"), kernel_quantizer=SYQ(bits, granularity),
                        input_quantizer=DoReFa(4))(x)
    x = tf.keras.layers.Flatten()(x)
    x = syq_tf.quantize(tf.keras.layers.Dense(33, name="fc"), kernel_quantizer=SYQ(bits, granularity),
                        input_quantizer=DoReFa(8))(x)
    out = lq.layers.QuantDense(4, input_quantizer=DoReFa(8), name="logits")(x)
    model = tf.keras.Model(inp, out)
    model.compile(tf.keras.optimizers.Adam(3e-3),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def uniq_model(bits):
    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(8, 3, padding="same", name="first")(inp)
    x = tf.keras.layers.ReLU()(x)
    x = syq_tf.quantize(tf.keras.layers.Conv2D(12, 3, name="qconv"), kernel_quantizer=UniQ(bits, "channel"),
                        input_quantizer=UniQActivation(8))(x)
    x = tf.keras.layers.ReLU()(x)
    x = tf.keras.layers.Flatten()(x)
    out = syq_tf.quantize(tf.keras.layers.Dense(4, name="fc"), kernel_quantizer=UniQ(bits, "layer"),
                          input_quantizer=UniQActivation(8))(x)
    return tf.keras.Model(inp, out)


@pytest.fixture(scope="module")
def data():
    return separable_data(640, seed=7)


@pytest.fixture(scope="module")
def ternary(data):
    x, y = data
    tf.keras.utils.set_random_seed(4321)
    model = syq_model(2, "channel")
    model.fit(x[:512], y[:512], epochs=2, batch_size=32, verbose=0)
    result = syq_tf.export.to_tflite(model, representative_data=x[:64], target="tflm",
                                     verify_data=x[512:], verify_labels=y[512:])
    return model, result


# ---- the packing -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis", [((13, 3, 3, 5), 0), ((1, 3, 3, 33), 3), ((7, 31), 0),
                                        ((5, 9), None), ((1, 1), 0), ((3, 2, 2, 1), 3)])
@pytest.mark.parametrize("levels", [2, 3, 4, 5, 8, 16, 100, 128])
def test_pack_unpack_round_trip(shape, axis, levels):
    rng = np.random.default_rng(levels * 7 + len(shape))
    codebook = np.sort(rng.choice(np.arange(-128, 128), levels, replace=False))
    w = codebook[rng.integers(0, levels, shape)].astype(np.int8)
    encoded, ancillary = tflm.pack(w, axis)
    bits = bits_for_levels(max(len(np.unique(c)) for c in (np.moveaxis(w, axis, 0) if axis is not None else [w])))
    assert len(encoded) == -(-bits * w.size // 8)
    np.testing.assert_array_equal(tflm.unpack(encoded, ancillary, shape), w)


@pytest.mark.parametrize("bits", range(1, 8))
@pytest.mark.parametrize("count", [1, 7, 8, 9, 31, 33, 1000])
def test_index_packing_round_trip(bits, count):
    idx = np.random.default_rng(count).integers(0, 1 << bits, count)
    packed = tflm.pack_indices(idx, bits)
    assert len(packed) == -(-bits * count // 8)
    np.testing.assert_array_equal(tflm.unpack_indices(packed, bits, count), idx)
    with pytest.raises(ValueError, match="does not fit"):
        tflm.pack_indices([1 << bits], bits)


@pytest.mark.parametrize("shape,axis", [((13, 3, 3, 5), 0), ((1, 3, 3, 33), 3), ((6, 10), None)])
def test_packing_is_tflms_own_format(shape, axis):
    """Our bytes equal what TFLM's LUT compressor writes (indices and value tables)."""
    from tflite_micro.tensorflow.lite.micro.compression import lut

    w = np.array([-127, 0, 127], np.int8)[np.random.default_rng(1).integers(0, 3, shape)]
    encoded, ancillary = tflm.pack(w, axis)
    theirs = lut.compress_array(w, axis)
    assert encoded == lut.pack_indices(theirs.indices, 2)
    stride = max(len(t) for t in theirs.lookup_tables)
    assert ancillary[tflm.DCM_BYTES:] == lut.pack_lookup_tables(theirs.lookup_tables, stride)
    assert ancillary[4:16] == lut.LutAncillaryData(bitwidth=2, axis=15 if axis is None else axis,
                                                   value_table_stride=stride).to_user_data()


def test_unpack_rejects_foreign_ancillary():
    with pytest.raises(ValueError, match="not a TFLM LUT ancillary tensor"):
        tflm.unpack(b"\x00", b"\x01" * 20, (8,))


# ---- the export --------------------------------------------------------------------------------


def test_ternary_export_is_lut_compressed_near_the_minimum(ternary):
    _, result = ternary
    by_layer = {r.layer: r for r in result.compression}
    for name, channels in (("qconv", 13), ("dw", 13), ("fc", 33)):
        r = by_layer[name]
        assert r.compressed and r.bits == 2 and r.levels == 3 and r.channels == channels, r
        assert r.index_bytes == -(-2 * r.weights // 8)
        # extra: the 16-byte DECODE header and tables padded to 3 entries (channels with 2 levels)
        assert r.minimum_bytes <= r.stored_bytes <= r.minimum_bytes + 16 + channels, r
        assert r.stored_bytes < 0.3 * r.int8_bytes + 16 + 3 * channels
    for name in ("first", "logits"):
        assert not by_layer[name].compressed and "float layer" in by_layer[name].note
    assert result.model_bytes < len(result.uncompressed)
    assert "TFLM_DECODE" in result.ops
    # every DECODE input decodes (our numpy decoder) to the int8 weights of the uncompressed model
    pairs = tflm.decode_pairs(result.flatbuffer)
    assert len(pairs) == 3
    plain = {t.name: t.values for t in syq_tf.export.flatbuffer.weight_tensors(result.uncompressed)}
    for name, (encoded, ancillary, shape) in pairs.items():
        np.testing.assert_array_equal(tflm.unpack(encoded, ancillary, shape), plain[name])


def test_ternary_tflm_outputs_are_bit_identical(ternary):
    model, result = ternary
    v = result.verification
    assert v["examples"] == 128
    assert v["tflm_compressed_equals_uncompressed"], v
    # LiteRT's reference per-channel FULLY_CONNECTED rounds once where TFLM rounds twice: equal
    # except at rounding ties, by at most one step
    assert v["max_int8_diff_litert_ref"] <= 1 and v["int8_outputs_differing_litert_ref"] <= 0.02 * v["int8_outputs"], v
    assert v["top1_agreement"] >= 0.9, v
    # the same, computed here directly
    x = separable_data(640, seed=7)[0][512:576]
    xq = int8_stage.quantize_input(x, *int8_stage.input_quantization(result.uncompressed))
    a = tflm.tflm_predict_int8(result.flatbuffer, xq)
    np.testing.assert_array_equal(a, tflm.tflm_predict_int8(result.uncompressed, xq))
    assert np.abs(a.astype(int) - litert_int8_outputs(result.uncompressed, xq, "ref")).max() <= 1


def test_arena_is_measured_and_sufficient(ternary, tmp_path):
    _, result = ternary
    assert result.arena_bytes and result.arena_bytes_uncompressed
    # decoded weights live in the arena while their op runs: the largest one (fc, 33 x 121) at least
    assert result.arena_bytes >= result.arena_bytes_uncompressed
    # exactly that arena runs the model (a fresh process: a too-small arena crashes TFLM's runtime)
    code = ("import sys, numpy as np\nfrom tflite_micro.python.tflite_micro import runtime\n"
            "it = runtime.Interpreter.from_bytes(open(sys.argv[1], 'rb').read(), arena_size=int(sys.argv[2]))\n"
            "it.set_input(np.zeros((1, 8, 8, 1), np.int8), 0); it.invoke(); print('ok')\n")
    path = tmp_path / "m.tflite"
    path.write_bytes(result.flatbuffer)
    ok = subprocess.run([sys.executable, "-c", code, str(path), str(result.arena_bytes)],
                        capture_output=True, text=True, timeout=60)
    assert ok.stdout.strip() == "ok", ok.stderr[-500:]


def test_report_and_c_array_compile(ternary, tmp_path):
    _, result = ternary
    table = result.table()
    assert "flash:" in table and f"tensor arena {result.arena_bytes} bytes" in table and "minimum B" in table
    d = result.to_dict()
    assert d["target"] == "tflm" and d["tflm"]["flash_bytes"] == result.model_bytes
    assert {r["layer"] for r in d["tflm"]["compressed_tensors"] if r["compressed"]} == {"qconv", "dw", "fc"}
    path = result.save(str(tmp_path / "kws.tflite"))
    assert sorted(os.listdir(tmp_path)) == ["kws.cc", "kws.h", "kws.tflite", "kws.tflite.json"]
    assert open(path, "rb").read() == result.flatbuffer
    source = (tmp_path / "kws.cc").read_text()
    assert "alignas(16) const unsigned char g_model[] = {" in source
    assert f"const unsigned int g_model_len = {result.model_bytes};" in source
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    out = subprocess.run([compiler, "-std=c++11", "-Wall", "-Werror", "-c", "kws.cc", "-o", "kws.o"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    nm = shutil.which("nm")
    if nm:
        symbols = subprocess.run([nm, "kws.o"], cwd=tmp_path, capture_output=True, text=True).stdout
        assert " R g_model" in symbols and " R g_model_len" in symbols  # external, read-only


def test_failed_save_leaves_no_file(ternary, tmp_path):
    _, result = ternary
    with pytest.raises(ValueError, match="not a C identifier"):
        result.save(str(tmp_path / "m.tflite"), array_name="1bad name")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bits", [2, 4])
def test_uniq_kernels_pack_to_their_bit_width(data, bits):
    x, _ = data
    model = uniq_model(bits)
    syq_tf.calibrate(model, x[:64], batches=1)
    result = syq_tf.export.to_tflite(model, representative_data=x[:32], target="tflm", verify_data=x[:48])
    by_layer = {r.layer: r for r in result.compression}
    for name in ("qconv", "fc"):
        r = by_layer[name]
        # (an untrained channel may leave its outermost levels unused: still ceil(log2(levels)) bits)
        assert r.compressed and r.bits == bits and 2**(bits - 1) < r.levels <= 2**bits, r
        assert r.stored_bytes <= r.minimum_bytes + 16 + r.channels * 2**bits
    assert result.verification["tflm_compressed_equals_uncompressed"]
    assert result.verification["max_int8_diff_litert_ref"] <= 1


def test_binary_layer_granularity(data):
    x, _ = data
    model = syq_model(1, "layer")
    model(x[:1])
    result = syq_tf.export.to_tflite(model, representative_data=x[:32], target="tflm")
    for r in result.compression:
        if r.layer in ("qconv", "dw", "fc"):
            assert r.compressed and r.bits == 1 and r.levels == 2 and r.index_bytes == -(-r.weights // 8), r


def test_bad_targets_and_models(data):
    x, _ = data
    model = syq_model(2, "layer")
    model(x[:1])
    with pytest.raises(ValueError, match=r"unknown target 'mcu'.*'litert', 'tflm'"):
        syq_tf.export.to_tflite(model, x[:4], target="mcu")
    inp = tf.keras.Input((5, 3))
    out = tf.keras.layers.Dense(2)(syq_tf.quantize(tf.keras.layers.LSTM(4), kernel_quantizer=SYQ(2, "channel"))(inp))
    with pytest.raises(ValueError, match="target='tflm'.*recurrent.*TFLite Micro does not run"):
        syq_tf.export.to_tflite(tf.keras.Model(inp, out), np.zeros((4, 5, 3), np.float32), target="tflm")
