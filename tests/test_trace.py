"""syq_tf.export.trace_divergence: where LiteRT departs from Keras, op by op."""

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from syq_tf import tfmot as st
from syq_tf.tfmot import schemes


def _mlp_export(x):
    L = tf.keras.layers
    tf.keras.utils.set_random_seed(3)
    inp = tf.keras.Input((24,))
    h = inp
    for i in range(3):
        h = L.ReLU(name=f"relu{i}")(L.BatchNormalization(name=f"bn{i}")(L.Dense(32, name=f"d{i}")(h)))
    model = tf.keras.Model(inp, L.Dense(24, name="out")(h))
    q = st.quantize_model(model, "syq-w2a4")
    q.compile(tf.keras.optimizers.Adam(1e-2), "mse")
    q.fit(x, x, epochs=3, batch_size=32, verbose=0)
    return q, syq_tf.export.to_tflite(q, representative_data=x[:64], target="litert")


def test_trace_matches_every_layer_and_finds_the_dense_batchnorm_rounding(monkeypatch):
    x = np.random.default_rng(0).uniform(0, 1, (256, 24)).astype(np.float32)
    q, result = _mlp_export(x)
    rows = syq_tf.export.trace_divergence(q, result.flatbuffer, x, max_examples=64)
    fused = [r for r in rows if r.layer.startswith("quant_relu")]
    assert [r.layer for r in fused][:3] == ["quant_relu0", "quant_relu1", "quant_relu2"]
    # the first layer computes what Keras does but for the 8-bit kernel's re-rounding with the folded
    # BatchNorm (measured 1.2 % of its 4-bit levels one step off)
    assert fused[0].off_by_1 <= 0.03 and fused[0].max_steps <= 1
    # locally (each layer computed from LiteRT's values of its input) the first layer is what it is
    # in all (it reads the model's input) and the later ones compute what Keras does: the few values
    # they have off in all are the first layer's, passed on (measured 2.0 % and 0.6 % in all, 0 local)
    assert fused[0].local_off_by_1 == fused[0].off_by_1
    assert all(r.local_off_by_1 <= 0.005 for r in fused[1:3]), fused
    # tfmot's own transform order: an 8-bit fake-quant on the BatchNorm output that the fused op does
    # not make -- the trace shows the first layer already off
    order = list(schemes.LayoutTransform.TRANSFORMS)
    dense = [t for t in order if t.__name__.startswith("DenseBatchNorm")]
    tfmot_order = [t for t in order if t not in dense]
    at = order.index(dense[0])
    tfmot_order[at:at] = sorted(dense, key=lambda t: t.__name__ != "DenseBatchNormQuantize")
    monkeypatch.setattr(schemes.LayoutTransform, "TRANSFORMS", tuple(tfmot_order))
    q_bad, result_bad = _mlp_export(x)
    bad = [r for r in syq_tf.export.trace_divergence(q_bad, result_bad.flatbuffer, x, max_examples=64)
           if r.layer.startswith("quant_relu")]
    assert bad[0].off_by_1 >= max(3 * fused[0].off_by_1, 0.04), (bad[0], fused[0])  # measured 7.7 %
    assert bad[1].local_off_by_1 >= 0.04, bad  # every such layer makes it (measured 8.2 %), not only the first


def test_trace_refuses_float_models_and_empty_inputs():
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])
    buffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    with pytest.raises(ValueError, match="the model's input is float32; the trace compares full-integer int8"):
        syq_tf.export.trace_divergence(model, buffer, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="x has no examples"):
        syq_tf.export.trace_divergence(model, buffer, np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match=r"^trace_divergence: kernels='xnnpack'; allowed: 'builtin', 'ref', 'tflm'\.$"):
        syq_tf.export.trace_divergence(model, buffer, np.zeros((2, 4), np.float32), kernels="xnnpack")
    with pytest.raises(ValueError, match="the model's input is float32; the trace compares full-integer int8"):
        syq_tf.export.trace_divergence(model, buffer, np.zeros((2, 4), np.float32), kernels="tflm")
