"""FusedBatchNormalization: Keras 3's BatchNormalization trained with TensorFlow's fused kernel --
the same outputs, gradients and moving statistics as Keras's own layer, the fused kernel only where
it computes the same thing, Keras's code everywhere else; quantize_model puts it in place."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import reloaded_in_a_fresh_process

import keras
import syq_tf.keras3 as syq


def _pair(shape, **kwargs):
    """Keras's layer and ours, built on ``shape``, with the same non-trivial gamma, beta and moving
    statistics."""
    stock, fused = keras.layers.BatchNormalization(**kwargs), syq.FusedBatchNormalization(**kwargs)
    stock.build(shape)
    fused.build(shape)
    rng = np.random.default_rng(3)
    for a, b in zip(stock.weights, fused.weights):
        value = rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
        a.assign(value)
        b.assign(value)
    return stock, fused


def _ops(layer, x, training, mask=None):
    graph = tf.function(lambda t: layer(t, training=training, mask=mask)).get_concrete_function(
        tf.TensorSpec(x.shape, tf.float32)).graph
    return {op.type for op in graph.get_operations()}


def _train_step(layer, x):
    """Output, gradients (input, gamma, beta) of a non-linear loss, and the moving statistics after one
    training call."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.sin(y) * y)
    params = [w for w in (getattr(layer, "gamma", None), getattr(layer, "beta", None)) if w is not None]
    grads = tape.gradient(loss, [x] + params)
    return [np.asarray(y)] + [np.asarray(g) for g in grads] + [np.asarray(layer.moving_mean),
                                                                 np.asarray(layer.moving_variance)]


FUSED_CASES = [
    ((8, 5, 5, 6), {}),
    ((8, 5, 5, 6), {"axis": 1, "momentum": 0.9}),
    ((4, 3, 4, 5, 6), {"momentum": 0.5}),
    ((8, 5, 5, 6), {"center": False}),
    ((8, 5, 5, 6), {"scale": False, "epsilon": 1e-5 + 1e-8}),
]


@pytest.mark.parametrize("shape,kwargs", FUSED_CASES, ids=[f"{len(s)}d-{k}" for s, k in FUSED_CASES])
def test_fused_training_step_equals_keras(shape, kwargs):
    x = np.random.default_rng(0).normal(2.0, 3.0, shape).astype(np.float32)
    stock, fused = _pair(shape, **kwargs)
    assert "FusedBatchNormV3" in _ops(fused, x, True)
    assert "FusedBatchNormV3" not in _ops(stock, x, True)
    names = ["output", "d input", "d gamma", "d beta", "moving mean", "moving variance"]
    before = fused.moving_variance.numpy().copy()
    expected, got = _train_step(stock, x), _train_step(fused, x)
    assert len(expected) == len(got)
    for name, a, b in zip(names, expected, got):
        # float32 sums in another order
        assert np.allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(a).max()), (name, np.abs(a - b).max())
    # the moving variance takes the biased batch variance (the fused kernel's has Bessel's correction)
    axis = fused.axis % len(shape)
    variance = np.var(x.astype(np.float64), axis=tuple(i for i in range(len(shape)) if i != axis))
    m = fused.momentum
    assert np.allclose(got[-1], m * before + (1 - m) * variance, rtol=1e-5)
    assert not np.allclose(got[-1], m * before + (1 - m) * variance * (x.size / variance.size)
                           / (x.size / variance.size - 1), rtol=1e-5)


FALLBACK_CASES = [
    ("rank 2", (16, 6), {}, None),
    ("epsilon below the kernel's floor", (8, 5, 5, 6), {"epsilon": 1e-6}, None),
    ("channel axis in the middle", (8, 5, 5, 6), {"axis": 2}, None),
    ("renorm", (8, 5, 5, 6), {"renorm": True}, None),
    ("mask", (8, 5, 6), {}, np.array([[True] * 4 + [False]] * 8)),
]


@pytest.mark.parametrize("what,shape,kwargs,mask", FALLBACK_CASES, ids=[c[0] for c in FALLBACK_CASES])
def test_keras_code_where_the_fused_kernel_would_differ(what, shape, kwargs, mask):
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    stock, fused = _pair(shape, **kwargs)
    assert "FusedBatchNormV3" not in _ops(fused, x, True, mask)
    a, b = stock(x, training=True, mask=mask), fused(x, training=True, mask=mask)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(stock.moving_variance.numpy(), fused.moving_variance.numpy())


def test_inference_and_frozen_layers_run_keras_code_bit_for_bit():
    shape = (8, 5, 5, 6)
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    stock, fused = _pair(shape)
    assert "FusedBatchNormV3" not in _ops(fused, x, False)
    assert np.array_equal(np.asarray(stock(x, training=False)), np.asarray(fused(x, training=False)))
    stock.trainable = fused.trainable = False  # Keras 3: a frozen BatchNormalization uses its moving statistics
    assert np.array_equal(np.asarray(stock(x, training=True)), np.asarray(fused(x, training=True)))
    assert np.array_equal(stock.moving_mean.numpy(), fused.moving_mean.numpy())


def test_quantize_model_fuses_batchnorm_and_the_file_reloads(tmp_path):
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(h))
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(h)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn_1")(h))
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h))
    float_model = keras.Model(inp, out)
    float_model.get_layer("bn").moving_mean.assign(np.full(8, 0.25, np.float32))
    model = syq.quantize_model(float_model, "syq-w2a8")
    kept = syq.quantize_model(float_model, "syq-w2a8", fused_batchnorm=False)
    assert type(model.get_layer("bn")) is syq.FusedBatchNormalization
    assert type(kept.get_layer("bn")) is keras.layers.BatchNormalization
    assert np.array_equal(model.get_layer("bn").moving_mean.numpy(), np.full(8, 0.25, np.float32))
    x = np.random.default_rng(0).uniform(size=(16, 8, 8, 3)).astype(np.float32)
    # the 8-bit input ranges, from the moving statistics: inference runs Keras's code in both
    assert syq.calibrate(model, x, batch_statistics=False) and syq.calibrate(kept, x, batch_statistics=False)
    assert np.array_equal(model.predict(x, verbose=0), kept.predict(x, verbose=0))
    model.compile("adam", "mse")
    model.fit(x, np.zeros((16, 3), np.float32), epochs=1, verbose=0)
    assert reloaded_in_a_fresh_process(model, x, tmp_path, "type(m.get_layer('bn')).__name__",
                                       save=syq.save_model) == "FusedBatchNormalization"
