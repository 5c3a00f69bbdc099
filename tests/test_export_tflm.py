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


@pytest.mark.parametrize("shape,axis", [((4, 3, 3, 6), 0), ((2, 5, 7), 2), ((9, 11), None), ((0, 3), None)])
def test_lut_encode_is_np_unique_per_slice(shape, axis):
    w = np.random.default_rng(3).integers(-128, 128, shape).astype(np.int8)
    w.flat[:2] = [-128, 127][: w.size]
    tables, indices = tflm.lut_encode(w, axis)
    slices = [w] if axis is None else list(np.moveaxis(w, axis, 0))
    index_slices = [indices] if axis is None else list(np.moveaxis(indices, axis, 0))
    assert len(tables) == len(slices) and indices.dtype == np.uint8 and indices.shape == w.shape
    for table, values, idx in zip(tables, slices, index_slices):
        expected, inverse = np.unique(values, return_inverse=True)
        np.testing.assert_array_equal(table, expected)
        np.testing.assert_array_equal(idx.ravel(), inverse.ravel())
    with pytest.raises(TypeError, match="int8 values expected"):
        tflm.lut_encode(w.astype(np.int16), axis)


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


def test_biases_are_lowered_for_tflms_two_roundings(ternary, data):
    """The tflm model is the litert one with the int32 bias of each op whose output holds no negative
    value (zero point -128 or a fused ReLU) one lower (flatbuffer.lower_biases_for_two_roundings)."""
    model, result = ternary
    x, _ = data
    litert = syq_tf.export.to_tflite(model, representative_data=x[:64], target="litert")
    ours, theirs = (syq_tf.export.flatbuffer.bias_tensors(b) for b in (result.uncompressed, litert.flatbuffer))
    assert sorted(ours) == sorted(theirs)
    moved = [i for i in ours if not np.array_equal(ours[i], theirs[i])]
    assert moved and all(np.array_equal(ours[i], theirs[i] - 1) for i in moved)
    again, names = syq_tf.export.flatbuffer.lower_biases_for_two_roundings(litert.flatbuffer)
    assert len(names) == len(moved)
    again = syq_tf.export.flatbuffer.bias_tensors(again)
    assert all(np.array_equal(again[i], ours[i]) for i in ours)
    assert any(f"{len(moved)} int32 biases lowered by one" in n for n in result.notes)


def test_lowered_biases_stay_one_unit_lower_in_packed_kernels(ternary, data):
    """litert, weights='int4', requantization='double': a packed kernel's int32 bias is re-expressed in
    its new scale from the bias before lowering, then lowered by one unit of that scale (re-expressing
    the lowered bias would shrink the offset to 7/127 of a unit and round it away)."""
    model, _ = ternary
    x, _ = data
    bias = syq_tf.export.flatbuffer.bias_tensors
    single, double = (syq_tf.export.to_tflite(model, representative_data=x[:64], target="litert", weights="int4",
                                              requantization=r) for r in ("single", "double"))
    assert any(r.storage == "int4" for r in double.layers)
    a, b = bias(double.flatbuffer), bias(single.flatbuffer)
    assert sorted(a) == sorted(b)
    moved = [i for i in a if not np.array_equal(a[i], b[i])]
    assert moved and all(np.array_equal(a[i], b[i] - 1) for i in moved)
    assert any(f"{len(moved)} int32 biases lowered by one" in n for n in double.notes)


def test_requantization_option(ternary, data):
    """requantization='single' keeps the converter's biases on tflm; 'double' lowers them on litert
    too and verifies with LiteRT's builtin kernels; bad values and targets are refused."""
    model, result = ternary
    x, y = data
    bias = syq_tf.export.flatbuffer.bias_tensors
    litert = syq_tf.export.to_tflite(model, representative_data=x[:64], target="litert")
    single = syq_tf.export.to_tflite(model, representative_data=x[:64], target="tflm", requantization="single")
    double = syq_tf.export.to_tflite(model, representative_data=x[:64], target="litert", requantization="double",
                                     verify_data=x[512:], verify_labels=y[512:])
    for a, b in ((single.uncompressed, litert.flatbuffer), (double.flatbuffer, result.uncompressed)):
        a, b = bias(a), bias(b)
        assert sorted(a) == sorted(b) and all(np.array_equal(a[i], b[i]) for i in a)
    assert not any("biases lowered" in n for n in single.notes)
    assert any("verified with LiteRT's builtin kernels" in n for n in double.notes)
    assert [r.to_dict()["requantization"] for r in (litert, single, double, result)] == ["single", "single",
                                                                                          "double", "double"]
    xq = int8_stage.model_input(double.flatbuffer, x[512:])
    builtin = litert_int8_outputs(double.flatbuffer, xq, "builtin").argmax(-1)
    keras = model.predict(x[512:], verbose=0).argmax(-1)
    assert double.verification["top1_agreement"] == pytest.approx(np.mean(builtin == keras))
    with pytest.raises(ValueError, match=r"requantization='triple'; allowed: 'auto' \(default\), 'single'"):
        syq_tf.export.to_tflite(model, x[:64], target="tflm", requantization="triple")
    with pytest.raises(ValueError, match="requantization='double' is for targets 'litert' and 'tflm'"):
        syq_tf.export.to_tflite(model, x[:64], target="lce", requantization="double")


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


@pytest.mark.parametrize("shape,axis", [((13, 3, 3, 5), 0), ((1, 3, 3, 33), 3), ((7, 31), 0), ((5, 9), None)])
@pytest.mark.parametrize("levels", [2, 3, 9, 100])
def test_lut_bytes_is_packs_size(shape, axis, levels):
    values = np.random.default_rng(levels).integers(-levels // 2, levels - levels // 2, shape).astype(np.int8)
    tables, _ = tflm.lut_encode(values, axis)
    stride = max(len(t) for t in tables)
    bits = bits_for_levels(stride)
    encoded, ancillary = tflm.pack(values, axis)
    assert tflm.lut_bytes(values.size, bits, len(tables), stride) == len(encoded) + len(ancillary)


def test_kernels_a_lut_would_grow_stay_int8(data):
    """A 3x3 depthwise kernel with 16-level UniQ weights has up to 9 levels in each channel's 9
    weights: 4-bit indices and a 9-entry table per channel take more than its int8 bytes, so it
    stays int8 (no DECODE); the 2-bit Dense still compresses."""
    x, _ = data
    inp = tf.keras.Input((8, 8, 1))
    h = tf.keras.layers.Conv2D(4, 3, padding="same", name="first")(inp)
    h = syq_tf.quantize(tf.keras.layers.DepthwiseConv2D(3, name="dw"), kernel_quantizer=UniQ(4, "channel"))(h)
    h = tf.keras.layers.Flatten()(h)
    out = syq_tf.quantize(tf.keras.layers.Dense(4, name="fc"), kernel_quantizer=UniQ(2, "layer"))(h)
    model = tf.keras.Model(inp, out)
    result = syq_tf.export.to_tflite(model, representative_data=x[:32], target="tflm", verify_data=x[:48])
    by_layer = {r.layer: r for r in result.compression}
    dw, fc = by_layer["dw"], by_layer["fc"]
    assert dw.levels > 4 and dw.channels == 4 and dw.weights == 36
    lut = tflm.lut_bytes(36, bits_for_levels(dw.levels), 4, dw.levels)
    assert lut >= 36
    assert not dw.compressed and dw.bits == 8 and dw.stored_bytes == 36 and dw.minimum_bytes == 36
    assert dw.note == (f"LUT would store {lut} bytes ({bits_for_levels(dw.levels)}-bit indices, 4 table(s) of "
                       f"{dw.levels}), not fewer than int8's 36: stored as plain int8")
    assert fc.compressed and fc.bits == 2 and fc.stored_bytes < fc.weights
    assert set(tflm.decode_pairs(result.flatbuffer)) == {fc.tensor}  # one DECODE input: the Dense's
    assert result.verification["tflm_compressed_equals_uncompressed"]


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


# ---- syq_tf's compressor against TFLM's ----------------------------------------------------------


def shared_dense_model():
    """One quantized Dense layer (per-tensor table) read by two FULLY_CONNECTED ops."""
    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(4, 3, strides=2, name="first")(inp)
    x = tf.keras.layers.Flatten()(x)
    shared = syq_tf.quantize(tf.keras.layers.Dense(36, name="shared"), kernel_quantizer=SYQ(1, "layer"),
                             input_quantizer=DoReFa(8))
    y = shared(x)
    z = shared(tf.keras.layers.Lambda(lambda v: v * 0.5)(x))
    out = tf.keras.layers.Dense(4, name="logits")(tf.keras.layers.Concatenate()([y, z]))
    return tf.keras.Model(inp, out)


def _per_tensor_scales(buffer):
    """The int8 model with one scale (the first channel's) for every weight tensor: the plan then
    takes one value table per tensor. (The export's models have per-channel scales. One table for
    a tensor with per-channel scales is no use: TFLM's runtime then does not reproduce the
    uncompressed outputs, whichever compressor wrote the file.)"""
    fb = syq_tf.export.flatbuffer
    model = fb.read(buffer)
    for t in fb.weight_tensors(buffer):
        q = model.subgraphs[0].tensors[t.tensor_index].quantization
        if t.dtype != "INT8" or q is None or q.scale is None:
            continue
        q.scale, q.zeroPoint, q.quantizedDimension = [q.scale[0]], [0], 0
    return fb._serialize(model, len(buffer))


def _compress_both(model, buffer, bits=None):
    """(ours, TFLM's) compressed flatbuffers of the tensors _plan picks, at ``bits`` if given
    (a wider index than needed is allowed by both), and the weights {tensor name: int8 values}."""
    from tflite_micro.tensorflow.lite.micro.compression import compress as tflm_compress
    from tflite_micro.tensorflow.lite.micro.compression import spec

    encodings, specs, weights = {}, [], {}
    for report, tensor, axis in tflm._plan(model, buffer):
        if tensor is None:
            continue
        b = report.bits if bits is None else max(bits, report.bits)
        encodings[tensor.tensor_index] = tflm.pack(tensor.values, axis, b)
        mode = spec.PerTensor() if axis is None else spec.PerChannel(axis)
        specs.append(spec.Tensor(0, tensor.tensor_index, [spec.LookUpTableCompression(b, mode)]))
        weights[tensor.name] = tensor.values
    ours, skipped = tflm.insert_decodes(buffer, encodings)
    assert not skipped
    return ours, bytes(tflm_compress(buffer, specs)), weights


def _graph(buffer):
    """The model as TFLite Micro sees it: ops (name, input and output tensor names) in order, and
    per tensor (name, type, shape, quantization, data). Empty shapes count as none (TFLM's
    compressor rewrites the file with the C++ object API, which omits empty vectors)."""
    model = syq_tf.export.flatbuffer.read(buffer)
    graph = model.subgraphs[0]

    def name(i):
        return None if i < 0 else graph.tensors[i].name.decode()

    ops = [(syq_tf.export.flatbuffer.op_name(model, op), [name(i) for i in op.inputs], [name(i) for i in op.outputs])
           for op in graph.operators]
    tensors = []
    for t in graph.tensors:
        q, data = t.quantization, model.buffers[t.buffer].data
        quant = None if q is None or q.scale is None else (list(q.scale), list(q.zeroPoint), q.quantizedDimension)
        tensors.append((t.name.decode(), t.type, [] if t.shape is None else list(t.shape), quant,
                        b"" if data is None else bytes(data), bool(t.isVariable)))
    metadata = {m.name: bytes(model.buffers[m.buffer].data) for m in model.metadata or []}
    return ops, tensors, metadata, [graph.tensors[i].buffer for i in range(len(graph.tensors))]


def _aligned_data(buffer):
    """Every non-empty buffer's data starts at a multiple of 16 bytes of the file."""
    from tensorflow.lite.python import schema_py_generated as schema

    raw = schema.Model.GetRootAsModel(bytearray(buffer), 0)
    for i in range(raw.BuffersLength()):
        b = raw.Buffers(i)
        if b.DataLength():
            start = b._tab.Vector(b._tab.Offset(4))
            if start % 16:
                return False
    return True


def _check_same_as_tflms(ours, theirs, weights, uncompressed, xq):
    a, b = _graph(ours), _graph(theirs)
    # The same graph: DECODE ops before each consumer, the same tensors in the same order with the
    # same types, shapes, quantization and data; buffers shared the same way; the same metadata.
    assert a[0] == b[0]
    assert a[1] == b[1]
    assert a[2] == b[2]
    assert len(set(a[3])) == len(set(b[3])) and [a[3].index(k) for k in a[3]] == [b[3].index(k) for k in b[3]]
    # Not byte-identical: TFLM's compressor writes with the Python object API, then re-packs the
    # whole file with the C++ object API (tflite_flatbuffer_align_wrapper) for the 16-byte data
    # alignment, so its table layout (field order, vtables, omitted empty vectors) is the C++
    # builder's; syq_tf packs with the Python builder and aligns the data vectors itself. The
    # operator codes are listed in another order (TFLM: order of first use; syq_tf: the existing
    # ones, then TFLM_DECODE). The sizes differ by the layout only.
    assert abs(len(ours) - len(theirs)) <= 64 + len(ours) // 100, (len(ours), len(theirs))
    assert _aligned_data(ours) and _aligned_data(theirs)
    pairs = tflm.decode_pairs(ours)
    assert set(pairs) == set(weights)
    for name, (encoded, ancillary, shape) in pairs.items():
        np.testing.assert_array_equal(tflm.unpack(encoded, ancillary, shape), weights[name])
    plain = tflm.tflm_predict_int8(uncompressed, xq)
    np.testing.assert_array_equal(tflm.tflm_predict_int8(ours, xq), plain)
    np.testing.assert_array_equal(tflm.tflm_predict_int8(theirs, xq), plain)


@pytest.fixture(scope="module")
def converted(data):
    """int8 flatbuffers (and a probe batch) of a per-channel model (Conv2D, DepthwiseConv2D, Dense),
    a per-channel/per-tensor one (UniQ), and a per-tensor Dense read by two ops."""
    x, _ = data
    out = {}
    for key, build in (("syq", lambda: syq_model(2, "channel")), ("uniq", lambda: uniq_model(3)),
                       ("shared", shared_dense_model)):
        tf.keras.utils.set_random_seed(11)
        model = build()
        if key == "uniq":
            syq_tf.calibrate(model, x[:64], batches=1)
        else:
            model(x[:1])
        result = syq_tf.export.to_tflite(model, representative_data=x[:32], target="litert")
        out[key] = (model, bytes(result.flatbuffer), int8_stage.probe(bytes(result.flatbuffer), x[:32], 4))
    return out


def test_the_models_cover_the_channel_axes(converted):
    kinds = {(key, r.op, r.axis) for key, (model, buffer, _) in converted.items()
             for r, t, _ in tflm._plan(model, buffer) if t is not None}
    assert {("syq", "CONV_2D", 0), ("syq", "DEPTHWISE_CONV_2D", 3), ("syq", "FULLY_CONNECTED", 0),
            ("uniq", "CONV_2D", 0), ("shared", "FULLY_CONNECTED", 0)} <= kinds, kinds


# 1..7-bit indices: the plan's widths (binary, ternary, 3-bit UniQ), wider ones forced, and one
# table per tensor (the kernels given one scale each)
@pytest.mark.parametrize("key,bits,per_tensor", [("shared", None, False), ("syq", None, False), ("uniq", None, False),
                                                 ("shared", 4, False), ("syq", 5, False), ("uniq", 6, False),
                                                 ("syq", 7, False), ("shared", None, True), ("syq", None, True),
                                                 ("uniq", 6, True)])
def test_compressor_builds_tflms_graph(converted, key, bits, per_tensor):
    model, buffer, xq = converted[key]
    buffer = _per_tensor_scales(buffer) if per_tensor else buffer
    ours, theirs, weights = _compress_both(model, buffer, bits)
    _check_same_as_tflms(ours, theirs, weights, buffer, xq)
    pairs = tflm.decode_pairs(ours).values()
    assert {ancillary[5] >> 4 == 15 for _, ancillary, _ in pairs} == {per_tensor}  # axis 15: one table
    if bits is not None:
        assert {ancillary[5] & 7 for _, ancillary, _ in pairs} == {bits}
    elif not per_tensor:
        assert {ancillary[5] & 7 for _, ancillary, _ in pairs} == {{"shared": 1, "syq": 2, "uniq": 3}[key]}
    if key == "shared":  # one DECODE before each of the two FULLY_CONNECTED ops reading the kernel
        ops = _graph(ours)[0]
        decodes = [k for k, op in enumerate(ops) if op[0] == "TFLM_DECODE"]
        assert len(decodes) == 2 and all(ops[k + 1][0] == "FULLY_CONNECTED" for k in decodes)
        assert ops[decodes[0]][1] == ops[decodes[1]][1]  # the same encoded and ancillary tensors


def test_export_uses_syq_tfs_compressor(converted, monkeypatch):
    """to_tflite(target='tflm') no longer needs TFLM's Python compressor."""
    import importlib

    theirs = importlib.import_module("tflite_micro.tensorflow.lite.micro.compression.compress")

    def refuse(*args, **kwargs):
        raise AssertionError("TFLM's compressor was called")

    monkeypatch.setattr(theirs, "compress", refuse)
    model, buffer, xq = converted["syq"]
    out, reports = tflm.compress(model, buffer)
    assert sum(r.compressed for r in reports) == 3
    np.testing.assert_array_equal(tflm.tflm_predict_int8(out, xq), tflm.tflm_predict_int8(buffer, xq))


def test_insert_decodes_refuses_bad_indices_and_tensors_without_data(converted):
    model, buffer, _ = converted["syq"]
    with pytest.raises(ValueError, match="is not below"):
        tflm.insert_decodes(buffer, {10**6: (b"\x00", b"\x00" * 17)})
    first = int(syq_tf.export.flatbuffer.read(buffer).subgraphs[0].inputs[0])  # the model's input
    out, skipped = tflm.insert_decodes(buffer, {first: (b"\x00", b"\x00" * 17)})
    assert out == buffer and skipped == {first: "it has no data"}


def test_insert_decodes_refuses_malformed_files(converted):
    from syq_tf.errors import MalformedModelError

    _, buffer, _ = converted["syq"]
    for bad in (b"\x00" * 64, buffer[:200], buffer[:8] + bytes(len(buffer) - 8)):
        with pytest.raises(MalformedModelError):
            tflm.insert_decodes(bad, {1: (b"\x00", b"\x00" * 17)})
