"""Int8Sigmoid: sigmoid and swish with the sigmoid on int8 TFLite's LOGISTIC grid (k / 256), and
quantize_model putting it in place of a model's sigmoid and swish activations."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import syq_tf.keras3 as syq
from syq_tf.export import flatbuffer
from syq_tf.export.runtime import litert_interpreter, quantize_input
from syq_tf.keras3.activations import Int8Sigmoid, int8_sigmoid

X = np.concatenate([np.linspace(-9.0, 9.0, 721), [0.0, 5.5, 5.6, -0.01, 0.01]]).astype(np.float32)


def reference_sigmoid(x):
    """min(round half up(256 sigmoid(x)), 255) / 256, from float64 (numpy, not TensorFlow)."""
    s = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    return np.minimum(np.floor(256.0 * s + 0.5), 255.0) / 256.0


def test_int8_sigmoid_is_the_logistic_grid():
    got = int8_sigmoid(tf.constant(X)).numpy()
    want = reference_sigmoid(X)
    # float32 and float64 sigmoids round differently only within 1e-6 of a half level
    s = 1.0 / (1.0 + np.exp(-X.astype(np.float64)))
    away = np.abs(256.0 * s - np.floor(256.0 * s) - 0.5) > 1e-4
    np.testing.assert_array_equal(got[away], want[away])
    np.testing.assert_array_equal(got * 256.0, np.round(got * 256.0))  # every value a level k / 256
    assert got.min() >= 0.0 and got.max() == 255.0 / 256.0  # the top level, not 1.0 (x = 9)
    swish = Int8Sigmoid("swish")(tf.constant(X)).numpy()
    np.testing.assert_allclose(swish[away], (X * want)[away], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["sigmoid", "swish"])
def test_int8_sigmoid_gradient_is_straight_through(kind):
    x = tf.constant(X)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = Int8Sigmoid(kind)(x)
    grad = tape.gradient(y, x).numpy()
    s = 1.0 / (1.0 + np.exp(-X.astype(np.float64)))
    inside = s <= 255.0 / 256.0  # the FakeQuant passes the gradient inside [0, 255/256]
    ds = np.where(inside, s * (1.0 - s), 0.0)
    want = ds if kind == "sigmoid" else reference_sigmoid(X) + X * ds
    near_top = np.abs(s - 255.0 / 256.0) < 1e-6  # float32 / float64 disagree on the side
    np.testing.assert_allclose(grad[~near_top], want[~near_top], rtol=1e-4, atol=1e-6)
    if kind == "sigmoid":  # above the top level (x > 5.54) the FakeQuant passes nothing
        assert np.all(grad[X > 5.6] == 0.0) and np.all(grad[np.abs(X) < 5.5] > 0.0)


def test_int8_sigmoid_refuses_other_activations():
    with pytest.raises(ValueError, match=r"Int8Sigmoid 'gate': activation='tanh'; allowed: 'sigmoid', 'swish'"):
        Int8Sigmoid("tanh", name="gate")
    assert Int8Sigmoid("silu").activation == "swish"


def squeeze_excite_model():
    """An EfficientNet block in small: conv -> BN -> swish, a squeeze-excite (pooling, a 1x1 conv
    with swish, a 1x1 conv with a sigmoid gate, Multiply) and a projection."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Activation("swish", name="stem_act")(x)
    s = keras.layers.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    s = keras.layers.Conv2D(4, 1, activation="swish", name="reduce")(s)
    s = keras.layers.Conv2D(8, 1, activation="sigmoid", name="expand")(s)
    x = keras.layers.Multiply(name="excite")([x, s])
    x = keras.layers.Conv2D(8, 1, name="project")(x)
    outputs = keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, outputs)


def test_quantize_model_rounds_sigmoids_as_tflite(tmp_path):
    """Every sigmoid / swish becomes an Int8Sigmoid; a kernel layer's moves out behind a range on the
    layer's output; the gate's output gets no range of its own. The export then has one LOGISTIC per
    activation, each on TFLite's fixed grid, and no requantization: the old quantize_model put an
    8-bit range on the gate, a QUANTIZE from 1/256 to that range in every squeeze-excite block."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, 48)
    q, report = syq.quantize_model(squeeze_excite_model(), scheme="syq-w2a8", return_report=True)
    assert report["int8_sigmoids"] == ["stem_act", "expand_sigmoid", "reduce_swish"]
    assert "stem_act" not in report["passed_through"]
    assert [type(q.get_layer(n)).__name__ for n in ("stem_act", "reduce_swish", "expand_sigmoid")] == [
        "Int8Sigmoid"] * 3
    assert q.get_layer("reduce").activation.__name__ == "linear"
    assert type(q.get_layer("reduce_preactivation_range")).__name__ == "MovingAverageActivation"
    assert "expand" not in report["output_ranges"]  # LOGISTIC's grid is the gate's range
    q.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, batch_size=16, epochs=2, verbose=0)
    # the gate Keras computes is on the grid
    gate = keras.Model(q.inputs, q.get_layer("expand_sigmoid").output).predict(x, verbose=0)
    np.testing.assert_array_equal(gate * 256.0, np.round(gate * 256.0))

    path = os.path.join(tmp_path, "se.keras")
    q.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), q.predict(x, verbose=0))

    result = syq.export.to_tflite(q, x[:32], target="litert", verify_data=x)
    buffer = bytes(result)
    ops = flatbuffer.op_names(buffer)
    assert ops.count("LOGISTIC") == 3 and "QUANTIZE" not in ops and "DEQUANTIZE" not in ops, ops
    assert result.verification["top1_agreement"] == 1.0
    # each LOGISTIC's int8 output is TFLite's exact rounding of the sigmoid of its int8 input: the
    # grid Keras trained on
    interpreter = litert_interpreter(buffer, kernels="builtin", keep_tensors=True)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], quantize_input(x, *inp["quantization"]))
    interpreter.invoke()
    tensors = interpreter.get_tensor_details()
    for op in interpreter._get_ops_details():
        if op["op_name"] != "LOGISTIC":
            continue
        source, out = tensors[op["inputs"][0]], tensors[op["outputs"][0]]
        assert out["quantization"] == (1.0 / 256.0, -128)
        scale, zero = source["quantization"]
        t = (interpreter.get_tensor(source["index"]).astype(np.float64) - zero) * scale
        got = (interpreter.get_tensor(out["index"]).astype(np.float64) + 128.0) / 256.0
        np.testing.assert_array_equal(got, reference_sigmoid(t))


def test_sequential_keeps_a_kernel_layers_sigmoid_inside():
    """A Sequential model has no place for a layer after a kernel layer: its Activation layers become
    Int8Sigmoid, a Dense's own sigmoid stays in the Dense (float, as before)."""
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="d1"),
                              keras.layers.Activation("sigmoid", name="act"),
                              keras.layers.Dense(4, activation="swish", name="d2"),
                              keras.layers.Dense(2, name="d3")])
    q, report = syq.quantize_model(model, scheme="syq-w2a8", return_report=True)
    assert report["int8_sigmoids"] == ["act"]
    assert type(q.get_layer("act")).__name__ == "Int8Sigmoid"
    assert q.get_layer("d2").activation.__name__ == "silu"
