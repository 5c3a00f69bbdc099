"""The int8 kernels ``litert_predict`` runs: XNNPACK (LiteRT's default) requantizes a convolution's
accumulator with one rounding; LiteRT's builtin and reference convolutions -- and TFLite Micro's,
which are the reference ones -- with two (a rounding doubling high multiply, then a rounding
shift), so a value less than half a unit of the first rounding below a tie rounds up. The
benchmarks report Keras's agreement with both; this pins the difference on a one-weight model."""

import importlib.util

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.lite.tools import flatbuffer_utils

from syq_tf.export import flatbuffer
from syq_tf.export.runtime import litert_predict

# output multiplier 0.75 * 2**-10 (input scale 1 x weight scale / output scale 1): an accumulator a
# is first rounded to a * 0.75 in units of 2**-10, then to a whole output step
MULTIPLIER = 0.75 * 2.0 ** -10
BIAS = 680  # accumulators 680 + x for inputs x
LAYERS = {"CONV_2D": lambda: tf.keras.layers.Conv2D(1, 1, bias_initializer="ones"),
          "DEPTHWISE_CONV_2D": lambda: tf.keras.layers.DepthwiseConv2D(1, bias_initializer="ones")}


def one_weight_model(op, out_zero=0):
    """A 1x1 ``op`` y = round((x * 1 + BIAS) * MULTIPLIER) on one channel, int8 in and out, zero points 0
    (the output's ``out_zero``)."""
    model = tf.keras.Sequential([tf.keras.Input((1, 1, 1)), LAYERS[op]()])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([np.full((1, 1, 1, 1), v, np.float32)] for v in (-1.0, 1.0))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(converter.convert()))
    graph = tree.subgraphs[0]
    (conv,) = graph.operators
    assert len(conv.inputs) == 3 and min(conv.inputs) >= 0  # input, weights, bias (a zero bias is left out)
    x, w, b = (graph.tensors[i] for i in conv.inputs)
    y = graph.tensors[conv.outputs[0]]
    for tensor, scale, zero in ((x, 1.0, 0), (w, MULTIPLIER, 0), (b, MULTIPLIER, 0), (y, 1.0, out_zero)):
        tensor.quantization.scale = np.array([scale], np.float32)
        tensor.quantization.zeroPoint = np.array([zero], np.int64)
    tree.buffers[w.buffer].data = np.array([1], np.int8).view(np.uint8)
    tree.buffers[b.buffer].data = np.array([BIAS], np.int32).view(np.uint8)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


X = np.array([0, 2, 3], np.float32).reshape(3, 1, 1, 1)
EXACT = (X.reshape(-1) + BIAS) * MULTIPLIER  # 0.498, 0.49951 (682 * 0.75 = 511.5 units of 2**-10), 0.50024
TWICE = [0, 1, 1]  # 511.5 -> 512 units of 2**-10 = 0.5 -> 1


@pytest.mark.parametrize("op", sorted(LAYERS))
def test_builtin_kernels_round_twice_and_xnnpack_once(op):
    buffer = one_weight_model(op)
    assert EXACT[1] == pytest.approx(0.5 - 2.0 ** -11, abs=1e-12)
    once = np.floor(EXACT + 0.5)
    np.testing.assert_array_equal(once, [0, 0, 1])
    np.testing.assert_array_equal(litert_predict(buffer, X).reshape(-1), once)  # xnnpack: the default
    for kernels in ("builtin", "ref"):
        np.testing.assert_array_equal(litert_predict(buffer, X, kernels=kernels).reshape(-1), TWICE)


@pytest.mark.parametrize("op", sorted(LAYERS))
def test_tflm_rounds_as_the_reference_kernels(op):
    pytest.importorskip("tflite_micro")
    from syq_tf.export.tflm import tflm_predict_int8

    out = tflm_predict_int8(one_weight_model(op), X.astype(np.int8))
    np.testing.assert_array_equal(np.asarray(out).reshape(-1), TWICE)


@pytest.mark.parametrize("op", sorted(LAYERS))
def test_lowered_biases_make_two_roundings_round_once(op):
    """lower_biases_for_two_roundings (target 'tflm'): on an output that holds no negative value
    (zero point -128) the bias one lower moves a * M from 511.5 to 510.75 units of 2**-10, under the
    tie; 683 * 0.75 = 512.25 -> 511.5 still rounds up, as its one rounding does. A runtime that
    rounds once now sees 0.49951 for x = 3 and rounds it down."""
    lowered, names = flatbuffer.lower_biases_for_two_roundings(one_weight_model(op, out_zero=-128))
    assert len(names) == 1
    assert list(flatbuffer.bias_tensors(lowered).values())[0].tolist() == [BIAS - 1]
    once = np.floor(EXACT + 0.5)
    for kernels in ("builtin", "ref"):
        np.testing.assert_array_equal(litert_predict(lowered, X, kernels=kernels).reshape(-1), once)
    np.testing.assert_array_equal(litert_predict(lowered, X).reshape(-1), [0, 0, 0])  # xnnpack: the cost
    if importlib.util.find_spec("tflite_micro"):
        from syq_tf.export.tflm import tflm_predict_int8

        out = tflm_predict_int8(lowered, X.astype(np.int8)).reshape(-1).astype(int) + 128
        np.testing.assert_array_equal(out, once)


def test_biases_of_outputs_that_hold_negative_values_are_kept():
    buffer = one_weight_model("CONV_2D")  # zero point 0, no fused activation: ties below zero too
    assert flatbuffer.lower_biases_for_two_roundings(buffer) == (buffer, [])


def test_unknown_kernels_are_refused():
    with pytest.raises(ValueError, match=r"kernels='fast'; allowed: \('xnnpack', 'builtin', 'ref'\)"):
        litert_predict(one_weight_model("CONV_2D"), np.zeros((1, 1, 1, 1), np.float32), kernels="fast")
