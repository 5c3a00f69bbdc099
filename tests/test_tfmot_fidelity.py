"""Export fidelity of ``quantize_model`` with low-bit activations (issue 23: 4-bit UniQ activations lost
LiteRT agreement on MLPerf Tiny's ResNet-8). Two causes, each pinned per tensor:

- a whole-map ``AveragePooling2D`` after a 4-bit activation became TFLite's AVERAGE_POOL_2D, which
  keeps its input's int8 scale (the 4-bit step) and so rounded the average to a whole step; the
  export now writes it as MEAN, which rounds once onto the pooling's own 8-bit range, as Keras;
- a kernel layer whose output no following layer quantizes (a projection shortcut read by an Add)
  computed in float in Keras while int8 TFLite stores it on an 8-bit range; it now has tfmot's
  8-bit range in Keras too (on its activation, as tfmot's own kernel configs).
"""

import numpy as np
import tensorflow as tf

import syq_tf
from conftest import separable_data
from syq_tf import tfmot as st
from syq_tf.export import flatbuffer

L = tf.keras.layers


def residual_net():
    """A ResNet-8-like block: stem, a strided residual block with a 1x1 projection shortcut, a
    whole-map AveragePooling2D and a Dense head."""
    inp = tf.keras.Input((8, 8, 1))
    h = L.ReLU(name="r0")(L.BatchNormalization(name="bn0")(L.Conv2D(8, 3, padding="same", name="stem")(inp)))
    y = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(L.Conv2D(16, 3, strides=2, padding="same", name="c1")(h)))
    y = L.BatchNormalization(name="bn2")(L.Conv2D(16, 3, padding="same", name="c2")(y))
    s = L.Conv2D(16, 1, strides=2, name="proj")(h)
    h = L.ReLU(name="r2")(L.Add(name="add")([s, y]))
    h = L.AveragePooling2D(pool_size=(4, 4), name="pool")(h)
    return tf.keras.Model(inp, L.Dense(4, name="head")(L.Flatten(name="flat")(h)))


def trained(scheme="uniq-w4a4"):
    x, y = separable_data(384)
    model = st.quantize_model(residual_net(), scheme)
    model.compile(tf.keras.optimizers.Adam(5e-3),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    syq_tf.calibrate(model, x[:128])
    model.fit(x[:256], y[:256], epochs=2, batch_size=32, verbose=0)
    return model, x


def litert_tensors(buffer, x):
    """{tensor name: dequantized values} of every int8 tensor of ``buffer`` on ``x`` (one example at
    a time), and {tensor name: scale}."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(buffer), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    scale, zero = inp["quantization"]
    details = [d for d in interpreter.get_tensor_details() if d["dtype"] == np.int8
               and len(d["quantization_parameters"]["scales"]) == 1 and len(d["shape"]) > 1]
    values = {d["name"]: [] for d in details}
    for example in x:
        q = np.clip(np.round(example[None] / scale) + zero, -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], q)
        interpreter.invoke()
        for d in details:
            p = d["quantization_parameters"]
            values[d["name"]].append((interpreter.get_tensor(d["index"]).astype(np.float64) - p["zero_points"][0])
                                     * p["scales"][0])
    scales = {d["name"]: float(d["quantization_parameters"]["scales"][0]) for d in details}
    return {k: np.concatenate(v) for k, v in values.items()}, scales


def test_whole_map_average_pooling_after_4bit_activations_rounds_once_onto_its_range():
    model, x = trained()
    result = syq_tf.export.to_tflite(model, x[:64], target="litert", verify_data=x[256:])
    ops = flatbuffer.op_names(result.flatbuffer)
    assert "MEAN" in ops and "AVERAGE_POOL_2D" not in ops
    values, scales = litert_tensors(result.flatbuffer, x[256:320])
    relu = next(k for k in values if "quant_r2" in k and k.endswith("Minimum"))  # the 4-bit grid
    pooled = next(k for k in values if "quant_pool" in k)
    step = model.get_layer("quant_r2").quantize_config.output_quantizer.impl.delta.numpy()
    # the pooling's input holds the UniQ grid at int8 scale step / 17 (the writer rounds at scale step, a
    # QUANTIZE multiplies by 17: the ops reading it get a finer bias grid); its values are the levels
    assert np.isclose(scales[relu] * 17, step)
    assert np.allclose(values[relu] / step, np.round(values[relu] / step), atol=1e-4)
    low, high = sorted(float(w.numpy()) for w in model.get_layer("quant_pool").weights
                       if "output_m" in w.name)  # tfmot's output range
    assert np.isclose(scales[pooled], (high - low) / 255, rtol=1e-3)
    # the mean of LiteRT's own input, computed here, rounded once onto the output scale; on the step
    # (the AVERAGE_POOL_2D of before) the error would reach step / 2, about 8x this
    reference = np.clip(values[relu].mean(axis=(1, 2), keepdims=True), low, high)
    error = np.abs(values[pooled] - reference)
    assert error.max() <= 0.5 * scales[pooled] + 1e-6 and scales[pooled] * 4 < step
    assert result.verification["top1_agreement"] >= 0.99


def test_an_unquantized_kernel_output_gets_tfmots_8bit_range_in_keras_and_litert():
    model, x = trained("uniq-w4a8")
    def ranged(name):
        return sorted(w.name.split("/")[-1] for w in model.get_layer(f"quant_{name}").weights if "activation_m" in w.name)

    # c1 and c2: a BatchNormalization follows (its output carries the range; tfmot's NoOpActivation
    # on the convolution); proj is read by the Add alone
    assert [ranged(n) for n in ("c1", "c2")] == [[], []]
    config = model.get_layer("quant_proj").quantize_config
    assert config.output_8bit and config.get_config()["output_8bit"] is True
    assert "output_8bit" not in st.QuantizeConfig(None, None).get_config()  # older saved configs compare equal
    proj = model.get_layer("quant_proj")
    names = sorted(w.name.split("/")[-1] for w in proj.weights if "activation" in w.name)
    assert names == ["post_activation_max:0", "post_activation_min:0"]
    low, high = sorted(float(w.numpy()) for w in proj.weights if "post_activation" in w.name)
    # Keras' output of the projection is on that 8-bit grid (tfmot's nudged FakeQuant: 256 levels)
    sub = tf.keras.Model(model.inputs, proj.output)
    out = sub.predict(x[:16], verbose=0)
    levels = (out - out.min()) / ((high - low) / 255)
    assert np.allclose(levels, np.round(levels), atol=2e-2)
    result = syq_tf.export.to_tflite(model, x[:64], target="litert", verify_data=x[256:])
    _, scales = litert_tensors(result.flatbuffer, x[:1])
    stored = [s for k, s in scales.items() if "quant_proj" in k]
    assert stored and np.isclose(stored[0], (high - low) / 255, rtol=1e-3)  # LiteRT stores it on the same range
    # and the configs still round-trip through a saved model
    with st.quantize_scope():
        restored = st.QuantizeConfig.from_config(config.get_config())
    assert restored.output_8bit and restored == config
    assert result.verification["top1_agreement"] >= 0.99
