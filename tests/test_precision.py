"""Every quantizer trains under the mixed_float16 / mixed_bfloat16 policies (scales stay float32)
and inside jit_compile=True (XLA)."""

import numpy as np
import pytest
import tensorflow as tf

import syq_tf

Q = syq_tf.quantizers
CASES = {
    "SYQ": (lambda: Q.SYQ(2, "channel"), lambda: Q.DoReFa(4)),
    "UniQ": (lambda: Q.UniQ(4, "channel"), lambda: Q.UniQActivation(4, initial_step=0.2)),
    "LS": (lambda: Q.LeastSquares("ls2"), lambda: Q.LeastSquaresActivation("lsT")),
    "LossAware": (lambda: Q.LossAware("linear", bits=3), lambda: Q.DoReFa(8)),
}


@pytest.fixture
def policy(request):
    tf.keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    tf.keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy,jit", [("mixed_float16", False), ("mixed_bfloat16", False), ("float32", True)],
                         indirect=["policy"])
@pytest.mark.parametrize("name", list(CASES))
def test_quantizers_train_under_mixed_precision_and_xla(policy, jit, name):
    weight, act = CASES[name]
    x = np.random.default_rng(0).normal(size=(64, 6, 6, 2)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, 64)
    model = tf.keras.Sequential([
        tf.keras.Input((6, 6, 2)),
        syq_tf.quantize(tf.keras.layers.Conv2D(4, 3, name="c"), kernel_quantizer=weight(), input_quantizer=act()),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(3, dtype="float32"),
    ])
    optimizer = syq_tf.LossAwareAdam(1e-2) if name == "LossAware" else tf.keras.optimizers.Adam(1e-2)
    model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    history = model.fit(x, y, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    layer = model.get_layer("c")
    assert layer.compute_dtype == {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(policy, "float32")
    for variable in layer.kernel_quantizer.weights + layer.input_quantizer.weights:
        assert variable.dtype in (tf.float32, tf.bool)  # scales and flags never in half precision
    assert layer(x[:2]).dtype == layer.compute_dtype
