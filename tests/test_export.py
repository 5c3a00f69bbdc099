"""TFLite export: exact codebooks read back from the flatbuffer, LiteRT agreement, error cases."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import separable_data
from syq_tf.export import flatbuffer
from syq_tf.quantizers import SYQ, DoReFa


def small_model(bits, granularity, dense_granularity=None):
    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="first")(inp)
    x = tf.keras.layers.BatchNormalization()(x)
    x = lq.layers.QuantConv2D(12, 3, use_bias=False, name="qconv",
                              kernel_quantizer=SYQ(bits, granularity), input_quantizer=DoReFa(8))(x)
    x = tf.keras.layers.BatchNormalization()(x)
    x = syq_tf.quantize(tf.keras.layers.DepthwiseConv2D(3, name="dw"), kernel_quantizer=SYQ(bits, granularity),
                        input_quantizer=DoReFa(8))(x)
    x = tf.keras.layers.Flatten()(x)
    x = syq_tf.quantize(tf.keras.layers.Dense(16, name="fc"),
                        kernel_quantizer=SYQ(bits, dense_granularity or granularity),
                        input_quantizer=DoReFa(8))(x)
    out = lq.layers.QuantDense(4, input_quantizer=DoReFa(8), name="logits")(x)
    model = tf.keras.Model(inp, out)
    model.compile(tf.keras.optimizers.Adam(3e-3),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def data():
    return separable_data(768, seed=3)


def _stored(result, name):
    tensors = flatbuffer.weight_tensors(result.flatbuffer)
    report = next(r for r in result.layers if r.layer == name)
    return report, tensors


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_layer_and_channel_codebooks_are_exact(data, bits, granularity):
    x, _ = data
    model = small_model(bits, granularity)
    model(x[:1])
    result = syq_tf.export.to_tflite(model, representative_data=x[:64])
    tensors = {t.op + ":" + str(t.values.shape): t for t in flatbuffer.weight_tensors(result.flatbuffer)}
    assert len(tensors) == 5
    allowed = {-127, 127} if bits == 1 else {-127, 0, 127}
    by_layer = {r.layer: r for r in result.layers}
    for name in ("qconv", "dw", "fc"):
        r = by_layer[name]
        assert r.exact and r.max_rel_alpha_error < 1e-6 and r.stored_levels == len(allowed), r
    # every output channel (fc, qconv) / depth channel (dw) has its own int8 scale, all of them exact
    assert [(by_layer[n].channels, by_layer[n].exact_channels) for n in ("qconv", "dw", "fc")] == [(12, 12)] * 2 + [(16, 16)]
    # read the int8 values ourselves: every quantized channel holds exactly the codebook
    qconv = tensors["CONV_2D:(12, 3, 3, 8)"]
    dw = tensors["DEPTHWISE_CONV_2D:(1, 3, 3, 12)"]
    fc = tensors["FULLY_CONNECTED:(16, 192)"]
    for t, axis in ((qconv, 0), (dw, 3), (fc, 0)):
        assert t.dtype == "INT8" and np.all(t.zero_points == 0)
        assert t.scales.size == t.values.shape[axis]  # per-channel int8
        for c in range(t.values.shape[axis]):
            levels = set(np.unique(np.take(t.values, c, axis=axis)).tolist())
            assert levels <= allowed and {-127, 127} <= levels | {-127} and 127 in np.abs(list(levels))


@pytest.mark.parametrize("granularity", ["pixel", "row"])
def test_pixel_and_row_report_their_alpha_error(data, granularity):
    x, _ = data
    model = small_model(2, granularity, dense_granularity="layer")
    model(x[:1])
    # spread the alphas so that int8 rounding must show
    q = model.get_layer("qconv").kernel_quantizer
    # (square roots of primes: no common unit step, so no exact integer form exists either)
    primes = np.array([2, 3, 5, 7, 11, 13, 17, 19, 23])[: int(np.prod(q.alpha.shape))]
    q.alpha.assign((np.sqrt(primes) / 20).reshape(q.alpha.shape).astype(np.float32))
    result = syq_tf.export.to_tflite(model, representative_data=x[:64])
    r = next(r for r in result.layers if r.layer == "qconv")
    assert not r.exact and 1e-5 < r.max_rel_alpha_error < 0.05
    assert r.stored_levels > 3 and r.channels == 12 and r.exact_channels < 12
    assert any("qconv" in n and "cannot hold this codebook exactly" in n for n in result.notes)
    # the reported error is what the flatbuffer holds: recompute it for the channel of the largest
    t = next(t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.values.shape == (12, 3, 3, 8))
    keras_q = np.transpose(q(model.get_layer("qconv").kernel.latent_variable).numpy(), (3, 0, 1, 2))
    worst = 0.0
    for c in range(12):
        k, s = keras_q[c].ravel(), t.values[c].ravel().astype(np.float64)
        i = np.argmax(np.abs(k))
        nz = k != 0
        worst = max(worst, np.max(np.abs(s[nz] * k[i] / s[i] - k[nz]) / np.abs(k[nz])))
    assert r.max_rel_alpha_error == pytest.approx(worst, rel=1e-6)


def test_trained_model_litert_agrees_with_keras(data, tmp_path):
    x, y = data
    model = small_model(2, "channel")
    model.fit(x[:512], y[:512], epochs=6, batch_size=32, verbose=0)
    keras_acc = model.evaluate(x[512:], y[512:], verbose=0)[1]
    assert keras_acc > 0.9
    result = syq_tf.export.to_tflite(model, representative_data=x[:128], verify_data=x[512:],
                                     verify_labels=y[512:])
    assert result.verification["top1_agreement"] >= 0.99
    assert result.verification["runtime_accuracy"] > 0.9
    ops = flatbuffer.op_names(result.flatbuffer)
    assert "CONV_2D" in ops and "FULLY_CONNECTED" in ops and "DEQUANTIZE" not in ops
    path = result.save(str(tmp_path / "m.tflite"))
    assert open(path, "rb").read() == result.flatbuffer
    import json
    report = json.load(open(path + ".json"))
    assert report["model_bytes"] == len(result.flatbuffer) and report["verification"]["examples"] == 256
    # the int8 model runs in LiteRT with int8 input
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=result.flatbuffer)
    assert interp.get_input_details()[0]["dtype"] == np.int8


def test_dorefa_8bit_activations_are_the_int8_grid(data):
    x, _ = data
    model = small_model(2, "layer")
    model(x[:1])
    result = syq_tf.export.to_tflite(model, representative_data=x[:32])
    tensors = flatbuffer.weight_tensors(result.flatbuffer)
    # every layer behind a DoReFa(8) input quantizer reads int8 with scale 1/255, zero point -128:
    # DoReFa's 8-bit levels i/255 on [0, 1] are exactly the int8 grid
    behind_dorefa = [t for t in tensors if t.values.shape[0] != 8]  # all but the float first conv
    assert len(behind_dorefa) == 4
    for t in behind_dorefa:
        assert abs(t.input_scale - 1 / 255) < 1e-9 and t.input_zero_point == -128, t.name
    assert not result.notes  # 8-bit activations: nothing lost


def test_low_bit_dorefa_activations_are_exact_in_int8(data):
    x, _ = data
    inp = tf.keras.Input((8, 8, 1))
    out = lq.layers.QuantConv2D(4, 3, kernel_quantizer=SYQ(2, "layer"), input_quantizer=DoReFa(2), name="c")(inp)
    model = tf.keras.Model(inp, tf.keras.layers.Flatten()(out))
    result = syq_tf.export.to_tflite(model, representative_data=x[:16])
    (t,) = flatbuffer.weight_tensors(result.flatbuffer)
    # levels {0, 1/3, 2/3, 1}: the model's int8 input has scale 1/3 (TFLite rounds to the levels when
    # it quantizes the input); a QUANTIZE multiplies by 85 onto scale 1/255, whose int8 range ends at 1
    # (the clip), and the convolution reads that: its int32 bias on a grid 85 times finer
    assert flatbuffer.io_quantization(result.flatbuffer, "input") == (pytest.approx(1 / 3, rel=1e-6), -128)
    assert flatbuffer.op_names(result.flatbuffer) == ["QUANTIZE", "CONV_2D", "RESHAPE"]
    assert t.input_scale == pytest.approx(1 / 255, rel=1e-6) and t.input_zero_point == -128
    assert not result.notes  # (its zero bias was stored at the wrong scale: corrected silently)
    # LiteRT quantizes the input to DoReFa's 2-bit levels exactly as Keras does
    # (up to an input rounded across a level boundary by the int8 model input: rare)
    probe = x[:64]
    keras_out = model.predict(probe, verbose=0)
    litert_out = syq_tf.export.litert_predict(result.flatbuffer, probe)
    off = np.abs(keras_out - litert_out) > 0.05 * np.abs(keras_out).max()
    assert off.mean() < 0.01


def test_errors(data):
    x, _ = data
    model = small_model(2, "layer")
    model(x[:1])
    with pytest.raises(ValueError, match=r"unknown target 'tpu'; allowed: 'litert', 'tflm', 'lce' \(Keras 2 only\)\.$"):
        syq_tf.export.to_tflite(model, x[:4], target="tpu")
    with pytest.raises(ValueError, match="representative_data is empty"):
        syq_tf.export.to_tflite(model, x[:0])
    inp = tf.keras.Input((8, 8, 1))
    out = lq.layers.QuantConv2D(4, 3, input_quantizer="ste_sign", kernel_quantizer=SYQ(), name="bin")(inp)
    with pytest.raises(ValueError, match="layer 'bin': input quantizer SteSign has no int8 TFLite form"):
        syq_tf.export.to_tflite(tf.keras.Model(inp, out), x[:4])


def test_option_errors_name_the_argument(data):
    x, y = data
    model = small_model(2, "layer")
    model(x[:1])
    export = syq_tf.export.to_tflite
    with pytest.raises(ValueError, match="representative_data is None; give a few hundred input examples"):
        export(model, None)
    with pytest.raises(ValueError, match=r"representative_data has examples of shape \(8, 8\); model .* takes "
                                         r"\(8, 8, 1\)"):
        export(model, x[:4, ..., 0])
    with pytest.raises(ValueError, match=r"verify_data has examples of shape \(4, 4, 1\)"):
        export(model, x[:4], verify_data=x[:4, :4, :4])
    bad = x[:4].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="representative_data has 1 NaN or infinite values of 256"):
        export(model, bad)
    with pytest.raises(ValueError, match="verify_labels has 3 entries for 4 verify_data examples"):
        export(model, x[:4], verify_data=x[:4], verify_labels=y[:3])
    with pytest.raises(ValueError, match="representative_samples=0; expected a whole number >= 1"):
        export(model, x[:4], representative_samples=0)
    unbuilt = tf.keras.Sequential([tf.keras.layers.Dense(2)], name="unbuilt")
    with pytest.raises(ValueError, match="model 'unbuilt' is not built .*tf.keras.Input"):
        export(unbuilt, x[:4])
    # numpy integers are whole numbers too
    assert export(model, x[:4], representative_samples=np.int64(4)).model_bytes > 0


@pytest.mark.parametrize("blob,match", [
    (b"", "fewer than 8 bytes"),
    (b"\x00" * 16, "file identifier is not 'TFL3'"),
    (b"\x10\x00\x00\x00TFL3" + b"\xff" * 8, "malformed TFLite flatbuffer"),
])
def test_flatbuffer_reader_rejects_bad_files(blob, match):
    with pytest.raises(ValueError, match=match):
        flatbuffer.weight_tensors(blob)


def test_conv3d_is_reported_float32_and_refused_by_tflm():
    x = np.random.default_rng(0).uniform(0, 1, (48, 6, 6, 6, 1)).astype(np.float32)
    inp = tf.keras.Input((6, 6, 6, 1))
    h = syq_tf.quantize(tf.keras.layers.Conv3D(4, 3, name="c3"), kernel_quantizer=SYQ(2, "channel"),
                        input_quantizer=DoReFa(8))(inp)
    out = tf.keras.layers.Dense(2)(tf.keras.layers.Flatten()(h))
    model = tf.keras.Model(inp, out)
    result = syq_tf.export.to_tflite(model, x[:16], verify_data=x[16:])
    c3 = next(r for r in result.layers if r.layer == "c3")
    # LiteRT has no int8 CONV_3D: the converter keeps the op and its filter float, which is exact
    assert c3.op == "CONV_3D" and c3.storage == "float32" and c3.exact and "no int8 CONV_3D" in c3.note
    stored = next(t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.op == "CONV_3D")
    np.testing.assert_array_equal(stored.values, model.get_layer("c3").quantized_kernel().numpy())
    assert result.verification["top1_agreement"] == 1.0
    with pytest.raises(ValueError, match=r"target='tflm'\): layers \['c3'\] are Conv3D; TFLite Micro has no CONV_3D"):
        syq_tf.export.to_tflite(model, x[:16], target="tflm")
