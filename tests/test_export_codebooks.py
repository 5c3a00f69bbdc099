"""Export of UniQ and least-squares codebooks: stored exactly where int8 can hold them (re-expressed
as integer multiples of their unit step when the converter's scale misses them), reported and
refusable where it cannot."""

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import separable_data
from syq_tf.export import flatbuffer
from syq_tf.export.codebook import integer_unit
from syq_tf.quantizers import UniQ, UniQActivation


@pytest.fixture(scope="module")
def data():
    return separable_data(640, seed=5)


def uniq_model(bits, act_bits=8, use_bias=True):
    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(8, 3, padding="same", name="first")(inp)
    x = tf.keras.layers.BatchNormalization()(x)
    x = tf.keras.layers.ReLU()(x)
    x = syq_tf.quantize(tf.keras.layers.Conv2D(12, 3, use_bias=use_bias, name="qconv"),
                        kernel_quantizer=UniQ(bits, "channel"), input_quantizer=UniQActivation(act_bits))(x)
    x = tf.keras.layers.ReLU()(x)
    x = syq_tf.quantize(tf.keras.layers.DepthwiseConv2D(3, name="dw"), kernel_quantizer=UniQ(bits, "channel"),
                        input_quantizer=UniQActivation(act_bits))(x)
    x = tf.keras.layers.ReLU()(x)
    x = tf.keras.layers.Flatten()(x)
    out = syq_tf.quantize(tf.keras.layers.Dense(4, name="fc"), kernel_quantizer=UniQ(bits, "layer"),
                          input_quantizer=UniQActivation(8))(x)
    model = tf.keras.Model(inp, out)
    model.compile(tf.keras.optimizers.Adam(2e-3),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def _per_channel_levels(t, axis):
    return [set(np.unique(np.take(t.values, c, axis=axis)).tolist()) for c in range(t.values.shape[axis])]


def test_integer_unit():
    assert integer_unit(np.array([-0.75, -0.25, 0.25, 0.75])) == pytest.approx(0.25)
    assert integer_unit(np.array([0.0, 0.2, -0.6, 1.0])) == pytest.approx(0.2)
    assert integer_unit(np.array([0.3, 0.5])) == pytest.approx(0.1)  # 3u, 5u
    assert integer_unit(np.array([1.0, np.sqrt(2.0)])) is None
    assert integer_unit(np.arange(1, 256) * 0.01) is None  # 255 multiples do not fit int8
    assert integer_unit(np.zeros(4)) is None


@pytest.mark.parametrize("bits", [2, 4])
def test_uniq_codebooks_are_exact_and_litert_agrees(data, bits):
    x, y = data
    model = uniq_model(bits)
    syq_tf.calibrate(model, x[:256], batches=2)
    model.fit(x[:512], y[:512], epochs=4, batch_size=32, verbose=0)
    result = syq_tf.export.to_tflite(model, representative_data=x[:128], verify_data=x[512:],
                                     verify_labels=y[512:], require_exact=True)
    by_layer = {r.layer: r for r in result.layers}
    for name in ("qconv", "dw", "fc"):
        assert by_layer[name].exact and by_layer[name].max_rel_alpha_error < 1e-6, by_layer[name]
    tensors = {t.op: t for t in flatbuffer.weight_tensors(result.flatbuffer)}
    # mid-rise: every channel holds odd multiples (2i+1-L)*m of one integer step m, never 0
    L = 2**bits
    for op, axis in (("CONV_2D", 0), ("DEPTHWISE_CONV_2D", 3)):
        t = [t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.op == op][-1]
        for levels in _per_channel_levels(t, axis):
            assert 0 not in levels
            steps = [m for m in range(1, 128)
                     if all(v % m == 0 and (v // m) % 2 != 0 and abs(v // m) <= L - 1 for v in levels)]
            assert steps and max(abs(v) for v in levels) >= 100, levels  # the int8 range is used
    assert tensors["FULLY_CONNECTED"].values.dtype == np.int8
    # the rewritten scales and int32 biases compute what Keras computes
    assert result.verification["top1_agreement"] >= 0.99, result.verification
    keras_logits = model.predict(x[512:], verbose=0)
    litert_logits = syq_tf.export.litert_predict(result.flatbuffer, x[512:])
    span = keras_logits.max() - keras_logits.min()
    assert np.abs(keras_logits - litert_logits).max() < 0.08 * span


def test_codebook_int8_cannot_hold_is_reported_and_refusable(data):
    x, _ = data
    model = uniq_model(8)
    syq_tf.calibrate(model, x[:128], batches=1)
    q = model.get_layer("qconv").kernel_quantizer
    q.delta.assign(q.delta / 4)  # levels up to +-255/2 delta: more than int8 has
    levels = np.abs(model.get_layer("qconv").quantized_kernel().numpy()) / q.delta.numpy()
    assert (levels.max(axis=(0, 1, 2)) / levels.min(axis=(0, 1, 2))).max() > 127
    result = syq_tf.export.to_tflite(model, representative_data=x[:32])
    r = next(r for r in result.layers if r.layer == "qconv")
    assert not r.exact and r.max_rel_alpha_error > 0.01
    assert any("'qconv'" in n and "cannot hold this codebook exactly" in n for n in result.notes)
    with pytest.raises(ValueError, match="require_exact=True.*'qconv' \\(UniQ bits=8"):
        syq_tf.export.to_tflite(model, representative_data=x[:32], require_exact=True)


def test_mid_rise_8bit_codebook_is_exact_in_the_channels_int8_can_hold(data):
    """UniQ 8-bit levels (i - 127.5) delta are odd multiples k of delta / 2: int8 holds a channel exactly
    when its levels stay within 63.5 delta (|k| <= 127). Those channels are re-expressed; the others keep
    the converter's rounding, and the report counts both."""
    x, _ = data
    model = uniq_model(8)
    syq_tf.calibrate(model, x[:128], batches=1)
    layer = model.get_layer("qconv")
    top = np.abs(layer.kernel.numpy()).max(axis=(0, 1, 2))
    wide = np.arange(12) < 3  # levels up to ~120.5 delta in channels 0..2, ~40.5 delta in the others
    delta = (top / np.where(wide, 120.0, 40.0)).astype(np.float32)
    layer.kernel_quantizer.delta.assign(delta.reshape(1, 1, 1, 12))
    keras = np.transpose(layer.quantized_kernel().numpy(), (3, 0, 1, 2)).reshape(12, -1)  # [out, ...]
    odd = keras / delta[:, None] * 2
    assert np.allclose(odd, np.round(odd), atol=1e-3) and np.all(np.round(odd) % 2 == 1)
    assert np.all(np.abs(odd).max(axis=1)[wide] > 200) and np.all(np.abs(odd).max(axis=1)[~wide] < 127)
    result = syq_tf.export.to_tflite(model, representative_data=x[:32])
    r = next(r for r in result.layers if r.layer == "qconv")
    assert not r.exact and "exact in 9 of 12 channels" in r.note, r.note
    assert (r.exact_channels, r.channels) == (9, 12) and result.to_dict()["layers"][result.layers.index(r)][
        "exact_channels"] == 9
    t = next(t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.values.shape == (12, 3, 3, 8))
    stored = t.values.reshape(12, -1).astype(np.float64)
    for c in range(12):
        if wide[c]:  # the converter's symmetric rounding at max|w| / 127
            assert np.array_equal(stored[c], np.round(keras[c] / np.abs(keras[c]).max() * 127)), c
        else:  # odd multiples of one int8 unit: the Keras levels times one factor
            unit = integer_unit(stored[c])
            assert unit is not None and np.allclose(stored[c] / keras[c], stored[c][0] / keras[c][0]), c
            assert np.abs(stored[c]).max() > 63, c  # spread over the int8 range
    # the re-expressed scales and int32 biases compute what Keras computes
    keras_logits = model.predict(x[512:], verbose=0)
    litert_logits = syq_tf.export.litert_predict(result.flatbuffer, x[512:])
    span = keras_logits.max() - keras_logits.min()
    assert np.abs(keras_logits - litert_logits).max() < 0.08 * span


def test_uncalibrated_activation_step_blocks_export(data):
    x, _ = data
    model = uniq_model(2)
    with pytest.raises(syq_tf.quantizers.NotCalibratedError, match="qconv.*not calibrated.*calibrate"):
        syq_tf.export.to_tflite(model, representative_data=x[:8])


@pytest.mark.parametrize("act_bits", [1, 2, 4])
def test_low_bit_uniq_activations_are_exact_in_int8(data, act_bits):
    x, y = data
    model = uniq_model(2, act_bits=act_bits)
    syq_tf.calibrate(model, x[:256], batches=2)
    # (binary activations learn slower; a barely trained model has near-tied logits whose argmax
    # any rounding flips, which would test the margins, not the export)
    model.fit(x[:512], y[:512], epochs=8 if act_bits == 1 else 3, batch_size=32, verbose=0)
    result = syq_tf.export.to_tflite(model, representative_data=x[:128], verify_data=x[512:],
                                     verify_labels=y[512:])
    # the layer before qconv writes at scale delta: TFLite rounds to the 2^b UniQ levels itself; a
    # QUANTIZE multiplies by m = 255 / (2^b - 1) onto scale delta / m, whose int8 range ends at the top
    # level (2^b - 1) delta (the clip), and which qconv reads: its int32 bias is on a grid m times
    # finer than at scale delta
    delta = float(model.get_layer("qconv").input_quantizer.delta.numpy())
    m = 255 // (2**act_bits - 1)
    t = next(t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.op == "CONV_2D"
             and t.values.shape[0] == 12)
    assert t.input_scale == pytest.approx(delta / m, rel=1e-6) and t.input_zero_point == -128
    first = next(t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.op == "CONV_2D"
                 and t.values.shape[0] == 8)
    graph = flatbuffer.read(result.flatbuffer).subgraphs[0]
    written = graph.tensors[graph.operators[1].inputs[0]]  # the first conv's output, read by the QUANTIZE
    assert written.quantization.scale[0] == pytest.approx(delta, rel=1e-6), first.name
    bias = graph.tensors[graph.operators[2].inputs[2]].quantization.scale  # qconv's int32 bias
    assert np.allclose(bias, np.float32(t.input_scale) * t.scales, rtol=1e-5)
    assert flatbuffer.op_names(result.flatbuffer)[:3] == ["CONV_2D", "QUANTIZE", "CONV_2D"]
    ops = flatbuffer.op_names(result.flatbuffer)
    assert ops.count("QUANTIZE") == 2 and "MINIMUM" not in ops, ops  # qconv and dw inputs
    # nothing lost; the only notes may be biases the converter mis-scaled and the export re-expressed
    assert all("re-expressed" in n for n in result.notes), result.notes
    # 1-bit: inputs near the threshold delta/2 flip when int8 re-rounds them (double rounding)
    assert result.verification["top1_agreement"] >= (0.95 if act_bits == 1 else 0.98), result.verification


def ls_model(modes=("ls1", "lsT", "ls2"), act=None):
    from syq_tf.quantizers import DoReFa, LeastSquares

    conv_mode, dw_mode, fc_mode = modes
    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(8, 3, padding="same", name="first")(inp)
    x = tf.keras.layers.BatchNormalization()(x)
    x = syq_tf.quantize(tf.keras.layers.Conv2D(12, 3, name="qconv"), kernel_quantizer=LeastSquares(conv_mode),
                        input_quantizer=act() if act else DoReFa(8))(x)
    x = tf.keras.layers.BatchNormalization()(x)
    x = syq_tf.quantize(tf.keras.layers.DepthwiseConv2D(3, name="dw"), kernel_quantizer=LeastSquares(dw_mode),
                        input_quantizer=DoReFa(8))(x)
    x = tf.keras.layers.Flatten()(x)
    out = syq_tf.quantize(tf.keras.layers.Dense(4, name="fc"), kernel_quantizer=LeastSquares(fc_mode),
                          input_quantizer=DoReFa(8))(x)
    model = tf.keras.Model(inp, out)
    model.compile(tf.keras.optimizers.Adam(2e-3),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def test_least_squares_codebooks_exact_where_int8_can_and_reported_where_not(data):
    x, y = data
    model = ls_model()
    model.fit(x[:512], y[:512], epochs=8, batch_size=32, verbose=0)
    result = syq_tf.export.to_tflite(model, representative_data=x[:128], verify_data=x[512:],
                                     verify_labels=y[512:])
    by_layer = {r.layer: r for r in result.layers}
    # ls1: +-v per channel; lsT: {0, +-2v} per channel -> exact in per-channel int8
    assert by_layer["qconv"].exact and by_layer["qconv"].stored_levels == 2
    assert by_layer["dw"].exact and by_layer["dw"].stored_levels <= 3
    dw = next(t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.op == "DEPTHWISE_CONV_2D")
    for levels in _per_channel_levels(dw, 3):
        assert levels <= {-127, 0, 127}
    # ls2: levels +-(v1 +- v2) with an arbitrary ratio: 4 levels per channel in Keras, and int8
    # rounds the inner ones -- reported, not hidden
    fc = by_layer["fc"]
    assert fc.keras_levels == 4 and not fc.exact and 0 < fc.max_rel_alpha_error < 0.05
    assert any("'fc'" in n and "cannot hold this codebook exactly" in n for n in result.notes)
    # the int8 value of each ls2 level is the nearest to the Keras level on the channel's grid
    fc_t = next(t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.op == "FULLY_CONNECTED")
    keras_fc = model.get_layer("fc").quantized_kernel().numpy().T  # [out, in]
    for c in range(4):
        k, stored = keras_fc[c], fc_t.values[c].astype(np.float64)
        np.testing.assert_array_equal(stored, np.round(k / np.abs(k).max() * 127 * np.sign(stored[np.argmax(np.abs(k))] * k[np.argmax(np.abs(k))])))
    with pytest.raises(ValueError, match="require_exact=True.*'fc' \\(LeastSquares"):
        syq_tf.export.to_tflite(model, representative_data=x[:32], require_exact=True)
    assert result.verification["top1_agreement"] >= 0.98, result.verification


def test_least_squares_activations_are_reported_as_approximate(data):
    from syq_tf.quantizers import LeastSquaresActivation

    x, _ = data
    model = ls_model(act=lambda: LeastSquaresActivation("ls2"))
    model(x[:2])
    result = syq_tf.export.to_tflite(model, representative_data=x[:32])
    assert any("'qconv'" in n and "LeastSquaresActivation" in n and "[-3, 3]" in n for n in result.notes)
