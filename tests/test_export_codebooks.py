"""Export of UniQ and least-squares codebooks: stored exactly where int8 can hold them (re-expressed
as integer multiples of their unit step when the converter's scale misses them), reported and
refusable where it cannot."""

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import separable_data
from syq_tf.export import flatbuffer
from syq_tf.export.litert import integer_unit
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


def test_uncalibrated_activation_step_blocks_export(data):
    x, _ = data
    model = uniq_model(2)
    with pytest.raises(syq_tf.quantizers.NotCalibratedError, match="qconv.*not calibrated.*calibrate"):
        syq_tf.export.to_tflite(model, representative_data=x[:8])


def test_low_bit_uniq_activations_export_on_their_grid(data):
    x, _ = data
    model = uniq_model(2, act_bits=2)
    syq_tf.calibrate(model, x[:128], batches=1)
    result = syq_tf.export.to_tflite(model, representative_data=x[:32])
    q = model.get_layer("qconv").input_quantizer
    t = next(t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.op == "CONV_2D"
             and t.values.shape[0] == 12)
    # the int8 input grid contains every 2-bit level k*delta: delta is 85 int8 steps
    assert float(q.delta.numpy()) / t.input_scale == pytest.approx(85, rel=1e-4)
    assert any("'qconv'" in n and "2-bit" in n for n in result.notes)
