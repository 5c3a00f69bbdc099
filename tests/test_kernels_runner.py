"""Whole-model runner (syq_tf.kernels.run_tflite) vs LiteRT BUILTIN_REF on exported SYQ models.

Small untrained models with SYQ ternary / binary weights (layer and channel granularity, 8-bit
DoReFa inputs) are exported with syq_tf.export.to_tflite; the runner executes them op by op
(packed C kernels for the codebook CONV_2D / FULLY_CONNECTED layers, numpy int8 references for
CONV_2D with ordinary int8 weights, DEPTHWISE_CONV_2D, MAX/AVERAGE_POOL_2D, MUL, ADD, MEAN, RESHAPE,
FULLY_CONNECTED, QUANTIZE, DEQUANTIZE, MINIMUM, ...) and must give LiteRT's int8 outputs exactly.
The one documented exception is SOFTMAX (float exp here, gemmlowp fixed-point exp in TFLite):
at most 1 LSB (0 in these cases).  SYQ channel scales end up in the per-channel int8 scales, so
the int8 codebook has one m_g per layer (127) and the runner packs it at layer granularity."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import syq_tf
from conftest import separable_data
from syq_tf import kernels as K
from syq_tf.quantizers import SYQ, DoReFa
from syq_tf.export.convert import int8 as convert_int8


@pytest.fixture(scope="module", autouse=True)
def _library():
    K._lib.lib()


def _litert(fb, x):
    it = Interpreter(model_content=fb, experimental_op_resolver_type=OpResolverType.BUILTIN_REF, num_threads=1)
    d = it.get_input_details()[0]
    it.resize_tensor_input(d["index"], x.shape)
    it.allocate_tensors()
    it.set_tensor(d["index"], x.astype(d["dtype"]))
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def syq_model(conv_bits, conv_gran, dense_bits, softmax=False):
    q = dict(input_quantizer=DoReFa(8))
    inp = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="first")(inp)  # int8 weights
    x = tf.keras.layers.BatchNormalization()(x)
    x = lq.layers.QuantConv2D(32, 3, padding="same", use_bias=False, name="q1",
                              kernel_quantizer=SYQ(conv_bits, conv_gran), **q)(x)
    x = tf.keras.layers.MaxPool2D()(x)
    x = tf.keras.layers.BatchNormalization()(x)  # -> MUL (+ bias folded downstream)
    y = lq.layers.QuantConv2D(32, 3, padding="same", strides=1, name="q2",
                              kernel_quantizer=SYQ(3 - conv_bits, conv_gran), **q)(x)
    x = tf.keras.layers.Add()([tf.keras.layers.ReLU()(x), y])
    x = syq_tf.quantize(tf.keras.layers.DepthwiseConv2D(3, padding="same", name="dw"),
                        kernel_quantizer=SYQ(conv_bits, conv_gran, depthwise=True), **q)(x)
    x = lq.layers.QuantConv2D(32, 2, name="q3", kernel_quantizer=SYQ(conv_bits, conv_gran), **q)(x)
    g = tf.keras.layers.GlobalAveragePooling2D()(x)  # -> MEAN over 3x3
    f = tf.keras.layers.Flatten()(x)
    x = tf.keras.layers.Concatenate()([g, tf.keras.layers.Dense(8, name="side")(f)])
    x = lq.layers.QuantDense(24, name="fc", kernel_quantizer=SYQ(dense_bits, "layer"), **q)(x)
    x = tf.keras.layers.BatchNormalization()(x)
    out = lq.layers.QuantDense(4, name="logits", **q)(x)
    if softmax:
        out = tf.keras.layers.Softmax()(out)
    return tf.keras.Model(inp, out)


def _export(model, x):
    model(x[:1])
    # nudge BN statistics away from identity so the folded MUL/bias ops are not trivial
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            rng = np.random.default_rng(n)
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), rng.normal(0, 0.3, n),
                               rng.uniform(0.5, 2, n)])
    return bytes(syq_tf.export.to_tflite(model, representative_data=x[:32]).flatbuffer)


CASES = [(2, "channel", 1, False), (1, "layer", 2, True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"conv{c[0]}b-{c[1]}-fc{c[2]}b{'-softmax' if c[3] else ''}")
def test_runner_matches_litert_builtin_ref(case):
    conv_bits, gran, dense_bits, softmax = case
    x, _ = separable_data(64, shape=(8, 8, 3), seed=5)
    fb = _export(syq_model(conv_bits, gran, dense_bits, softmax), x)
    runner = K.TFLiteRunner(fb)
    ops = {name for _, name, _, _ in runner.ops}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "ADD", "MEAN", "FULLY_CONNECTED"} <= ops, ops
    report = runner.weight_report()
    kinds = {(r["kind"], r["bits"]) for r in report}
    assert ("conv", 1) in kinds and ("conv", 2) in kinds and ("fc", dense_bits) in kinds, report
    for r in report:  # 1 or 2 bits per weight (input channels padded to 32) plus the m_g bytes
        o, kh, kw, i = r["shape"]
        assert r["code_bytes"] == o * kh * kw * -(-i // 32) * 4 * r["bits"], r
        assert r["packed_bytes"] == r["code_bytes"] + r["magnitude_bytes"] < r["int8_bytes"], r
    rng = np.random.default_rng(1)
    xq = np.concatenate([rng.integers(-128, 128, size=(3, 8, 8, 3)),
                         np.round(x[:5] / 0.0039215686 - 128)]).clip(-128, 127).astype(np.int8)
    expected = _litert(fb, xq)
    diffs = {}
    for impl in ("opt", "ref", "portable"):
        got = K.run_tflite(fb, xq, impl=impl)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        diffs[impl] = np.abs(got.astype(np.int32) - expected).max()
    # numpy int8 reference for every layer (no packed kernels) must agree too
    diffs["numpy"] = np.abs(K.TFLiteRunner(fb, packed=False)(xq).astype(np.int32) - expected).max()
    print("max |diff| vs BUILTIN_REF:", diffs, "packed weights:", report)
    allowed = 1 if softmax else 0  # SOFTMAX: float exp vs gemmlowp fixed point, <= 1 LSB
    assert max(diffs.values()) <= allowed, diffs


def _convert_plain(model, shape, rng):
    # the project's own full-integer int8 conversion (int8 in and out), on 16 random examples
    return convert_int8(model, rng.uniform(-1, 1, size=(16,) + tuple(shape)))


def test_runner_other_ops_and_unsupported_error():
    rng = np.random.default_rng(7)
    shape = (7, 7, 4)
    inp = tf.keras.Input(shape)
    x = tf.keras.layers.Conv2D(8, 3, padding="same", activation="relu6")(inp)
    x = tf.keras.layers.AveragePooling2D(3, strides=2, padding="same")(x)
    a = tf.keras.layers.Lambda(lambda t: tf.minimum(t, 0.7))(x)  # MINIMUM (activation clipping)
    b = tf.keras.layers.Lambda(lambda t: tf.maximum(t, 0.1))(a)
    x = tf.keras.layers.Subtract()([a, tf.keras.layers.Conv2D(8, 1)(b)])
    x = tf.keras.layers.ZeroPadding2D(1)(x)
    x = tf.keras.layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2)(x)
    x = tf.keras.layers.Flatten()(x)
    out = tf.keras.layers.Dense(5)(x)
    fb = _convert_plain(tf.keras.Model(inp, out), shape, rng)
    runner = K.TFLiteRunner(fb)
    ops = {name for _, name, _, _ in runner.ops}
    assert {"MINIMUM", "MAXIMUM", "AVERAGE_POOL_2D", "SUB", "PAD"} <= ops, ops
    xq = rng.integers(-128, 128, size=(4,) + shape).astype(np.int8)
    np.testing.assert_array_equal(runner(xq), _litert(fb, xq))

    inp = tf.keras.Input((6,))
    fb = _convert_plain(tf.keras.Model(inp, tf.keras.layers.Dense(3, activation="tanh")(inp)), (6,), rng)
    with pytest.raises(K.UnsupportedOp, match="TANH"):
        K.run_tflite(fb, np.zeros((1, 6), np.int8))
