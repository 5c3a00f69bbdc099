"""syq_tf.summary: per-layer bits, bytes at the stored width, scales and MACs on hand-checked models,
for syq_tf / larq layers, an LSTM and a tfmot-quantized model."""

import larq as lq
import pytest
import tensorflow as tf

import syq_tf
from syq_tf.quantizers import SYQ, LossAware


def test_hand_checked_cnn():
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        lq.layers.QuantConv2D(4, 3, kernel_quantizer=SYQ(2, "channel"), name="conv"),
        tf.keras.layers.Flatten(name="flat"),
        syq_tf.quantize(tf.keras.layers.Dense(3, name="fc"), kernel_quantizer=SYQ(1, "layer")),
        tf.keras.layers.Dense(2, name="head"),
    ])
    lines = []
    rows = {r.layer: r for r in syq_tf.summary(model, print_fn=lines.append)}
    conv, fc, head = rows["conv"], rows["fc"], rows["head"]
    # conv: 36 ternary weights (2 bits) = 9 B, bias 4 + alpha 4 floats = 32 B; 6x6 outputs x 36 MACs
    assert (conv.method, conv.bits, conv.granularity, conv.scales) == ("SYQ", 2, "channel", 4)
    assert (conv.params, conv.bytes, conv.macs, conv.ternary_macs, conv.binary_macs) == (44, 41.0, 1296, 1296, 0)
    # fc: 144 x 3 binary weights = 54 B, bias 3 + alpha 1 floats = 16 B
    assert (fc.bits, fc.scales, fc.params, fc.bytes, fc.macs, fc.binary_macs) == (1, 1, 436, 70.0, 432, 432)
    assert (head.method, head.bits, head.bytes, head.macs) == ("float", 32, 32.0, 6)
    assert "flat" not in rows
    assert "143.0 bytes at stored bit widths" in lines[0] and "1734 MACs (432 binary, 1296 ternary)" in lines[0]


def test_lstm_counts_input_and_recurrent_products_per_step():
    lstm = syq_tf.quantize(tf.keras.layers.LSTM(4, return_sequences=True, name="lstm"),
                           kernel_quantizer=LossAware("linear", bits=3))
    model = tf.keras.Sequential([tf.keras.Input((5, 3)), lstm])
    (row,) = syq_tf.summary(model, print_fn=None)
    # kernel 3x16 + recurrent 4x16 at 3 bits, bias 16 + two alphas as floats; 5 steps x (48 + 64)
    assert (row.method, row.bits, row.scales, row.params) == ("LossAware(linear)", 3, 2, 48 + 64 + 16 + 2)
    assert row.bytes == pytest.approx((48 + 64) * 3 / 8 + 4 * 18)
    assert row.macs == 5 * (48 + 64) and row.binary_macs == 0 and row.ternary_macs == 0


def test_tfmot_models_report_low_bit_and_tfmot_8_bit_layers():
    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(4, 3, name="stem")(inp)
    x = tf.keras.layers.Conv2D(4, 3, name="mid")(x)
    x = tf.keras.layers.Flatten()(x)
    model = syq_tf.quantize_model(tf.keras.Model(inp, tf.keras.layers.Dense(2, name="head")(x)), "syq-w1a8")
    rows = {r.layer: r for r in syq_tf.summary(model, print_fn=None)}
    assert (rows["quant_stem"].method, rows["quant_stem"].bits) == ("tfmot 8-bit", 8)
    mid = rows["quant_mid"]
    assert (mid.method, mid.bits, mid.granularity, mid.scales) == ("SYQ", 1, "channel", 4)
    assert mid.macs == 4 * 4 * 3 * 3 * 4 * 4 == mid.binary_macs
