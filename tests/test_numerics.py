"""Degenerate weights never give NaN scales or outputs: all-zero and constant kernels, a channel of
zeros, huge and tiny magnitudes; NaN in training is reported with the layer name."""

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from syq_tf.callbacks import CheckFinite

Q = syq_tf.quantizers
QUANTIZERS = {
    "SYQ-2-channel": lambda: Q.SYQ(2, "channel"), "SYQ-1-pixel": lambda: Q.SYQ(1, "pixel"),
    "UniQ-4-channel": lambda: Q.UniQ(4, "channel"), "UniQ-1-layer": lambda: Q.UniQ(1, "layer"),
    "LS-ls2": lambda: Q.LeastSquares("ls2"), "LS-lsT": lambda: Q.LeastSquares("lsT"),
    "LS-gf3": lambda: Q.LeastSquares("gf3"),
    "LAB": lambda: Q.LossAware("binary", curvature="constant"),
    "LAT-exact": lambda: Q.LossAware("ternary_exact", curvature="constant"),
    "LAQ-3": lambda: Q.LossAware("linear", bits=3, curvature="constant"),
    "LAT2": lambda: Q.LossAware("ternary_two_scale", curvature="constant"),
}
# quantizers whose codebook has a zero level (binary SYQ/LAB and UniQ's half-integer grid have none)
ZERO_LEVEL = {"SYQ-2-channel", "LS-lsT", "LAT-exact", "LAQ-3", "LAT2"}
rng = np.random.default_rng(0)
KERNELS = {
    "zeros": np.zeros((3, 3, 4, 5)),
    "constant": np.full((3, 3, 4, 5), 0.3),
    "zero-channel": np.concatenate([np.zeros((3, 3, 4, 1)), rng.normal(size=(3, 3, 4, 4))], -1),
    "huge": rng.normal(size=(3, 3, 4, 5)) * 1e30,
    "tiny": rng.normal(size=(3, 3, 4, 5)) * 1e-30,
}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_outputs_scales_and_gradients_stay_finite(name, kernel):
    quantizer = QUANTIZERS[name]()
    w = tf.constant(KERNELS[kernel], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(w)
        q = quantizer(w)
        loss = tf.reduce_sum(q * tf.constant(rng.normal(size=w.shape), tf.float32))
    grads = tape.gradient(loss, [w, *quantizer.trainable_weights])
    assert np.all(np.isfinite(q.numpy()))
    assert all(g is None or np.all(np.isfinite(g.numpy())) for g in grads)
    assert all(np.all(np.isfinite(v.numpy())) for v in quantizer.weights if v.dtype.is_floating)
    if kernel == "zeros":  # one level: 0, or the single magnitude of a codebook without a zero level
        assert np.unique(np.abs(q.numpy())).size == 1
        if name in ZERO_LEVEL:
            assert np.all(q.numpy() == 0)
    if kernel == "zero-channel" and name in ZERO_LEVEL:
        assert np.all(q.numpy()[..., 0] == 0)
    if kernel == "huge":  # the scale follows the magnitude: the output is not 0 and not inf
        assert 1e28 < np.abs(q.numpy()).max() < 1e32


def test_check_finite_stops_training_naming_the_layer():
    model = tf.keras.Sequential([
        tf.keras.Input((4,)),
        syq_tf.quantize(tf.keras.layers.Dense(3, name="fc"), kernel_quantizer=Q.SYQ(2)),
    ])
    model.compile(tf.keras.optimizers.SGD(1e38), "mse")  # a learning rate that overflows
    x = np.full((8, 4), 1e3, np.float32)
    with pytest.raises(FloatingPointError, match="layer 'fc': .*non-finite"):
        model.fit(x, np.zeros((8, 3), np.float32), epochs=3, verbose=0, callbacks=[CheckFinite()])
