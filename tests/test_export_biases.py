"""Full-integer export of low-bit activation grids: every int32 bias means what the kernels compute
with (the converter can store one at the scale its input had before a later pass changed it)."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from syq_tf.export import flatbuffer, to_tflite
from syq_tf.export.convert import int8 as convert
from syq_tf.export.inference import build as build_inference_model
from syq_tf.export.runtime import litert_predict

Q = syq_tf.quantizers


def _bias_ratios(buffer):
    """bias scale / (input scale x weight scale) per weight op (1.0 where consistent)."""
    fm = flatbuffer.read(buffer)
    g = fm.subgraphs[0]
    out = {}
    for op in g.operators:
        if flatbuffer.op_name(fm, op) not in ("CONV_2D", "FULLY_CONNECTED", "DEPTHWISE_CONV_2D"):
            continue
        if len(op.inputs) < 3 or op.inputs[2] < 0:  # no bias
            continue
        x, w, b = (g.tensors[int(i)] for i in op.inputs[:3])
        ratio = np.asarray(b.quantization.scale) / (x.quantization.scale[0] * np.asarray(w.quantization.scale))
        out[b.name.decode()] = ratio
    return out


def _head_model():
    """A float Dense whose input is a DoReFa(2) grid: the converter mis-scales this bias."""
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((16,))
    h = tf.keras.layers.Dense(32, name="d1")(inp)
    h = tf.keras.layers.BatchNormalization(name="bn")(h)
    out = lq.layers.QuantDense(10, name="head", input_quantizer=Q.DoReFa(2), bias_initializer="random_normal")(h)
    return tf.keras.Model(inp, out)


@pytest.fixture(scope="module")
def head():
    model = _head_model()
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    return model, x


def test_converter_bias_scale_bug_is_detected_and_fixed(head):
    model, x = head
    raw = convert(build_inference_model(model), x[:200])
    ratios = _bias_ratios(raw)
    bad = {k: v for k, v in ratios.items() if "head" in k}
    # the bug this guards against: the head's bias stored at 1/85 of input x weight scale
    # (input range [0, 1] / 255 where the 2-bit grid's tensor has scale 1/3)
    assert bad and np.allclose(next(iter(bad.values())), 3 / 255, rtol=1e-4)
    fixed_buffer, fixed = flatbuffer.consistent_biases(raw)
    assert [name for name, _ in fixed] == list(bad) and abs(fixed[0][1] - 3 / 255) < 1e-6
    assert all(np.allclose(r, 1.0, rtol=1e-5) for r in _bias_ratios(fixed_buffer).values())
    # the re-expressed int32 bias, read with input x weight scale, is the Keras bias
    wt = [t for t in flatbuffer.weight_tensors(fixed_buffer) if t.op == "FULLY_CONNECTED"][-1]
    b = flatbuffer.bias_tensors(fixed_buffer)[wt.bias_index]
    step = wt.input_scale * wt.scales
    np.testing.assert_allclose(b * step, model.get_layer("head").bias.numpy(), atol=float(step.max()))
    # consistent biases are left alone: same bytes back
    again, none = flatbuffer.consistent_biases(fixed_buffer)
    assert none == [] and again is fixed_buffer


def test_export_of_a_2bit_grid_head_matches_keras(head):
    model, x = head
    result = to_tflite(model, x[:200], verify_data=x)
    # the 2-bit grid is converted in its fine form (scale 1/255): the converter then stores the head's
    # bias at the scale its op computes with, nothing to re-express
    assert not any("re-expressed" in n for n in result.notes), result.notes
    head_weights = [t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.op == "FULLY_CONNECTED"][-1]
    assert head_weights.input_scale == pytest.approx(1 / 255, rel=1e-6)
    keras_out = model.predict(x, verbose=0)
    out = litert_predict(result.flatbuffer, x)
    # before the fix the head added 85x its bias (|bias| ~ 0.05 -> offsets of ~4); now the outputs
    # differ by int8 rounding, and by one grid level where d1's int8 output crosses a 2-bit boundary
    assert np.abs(out - keras_out).mean() < 0.02
    assert result.verification["top1_agreement"] >= 0.95
