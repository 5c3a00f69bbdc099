"""SeparableConv2D: its depthwise and pointwise kernels quantized each with its own quantizer, in
syq_tf.quantize and in quantize_model, saved, reloaded and exported (litert int8 / int4, tflm) --
a MobileNetV2-style block (expand 1x1, depthwise, project 1x1, residual) end to end."""

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import compiled_classifier, separable_data, trained_classifier
from syq_tf import tfmot as st
from syq_tf.quantizers import SYQ, DoReFa, UniQ


def mobilenet_block_model():
    inp = tf.keras.Input((8, 8, 1))
    h = tf.keras.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    h = tf.keras.layers.BatchNormalization(momentum=0.9, name="bn0")(h)
    h = tf.keras.layers.ReLU(6.0, name="r0")(h)
    # inverted residual: expand, depthwise, project (MobileNetV2), then a separable conv
    r = syq_tf.quantize(tf.keras.layers.Conv2D(16, 1, use_bias=False, name="expand"),
                        kernel_quantizer=SYQ(2, "channel"), input_quantizer=DoReFa(8))(h)
    r = tf.keras.layers.BatchNormalization(momentum=0.9, name="bn1")(r)
    r = tf.keras.layers.ReLU(6.0, name="r1")(r)
    r = syq_tf.quantize(tf.keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw"),
                        kernel_quantizer=SYQ(2, "channel"), input_quantizer=DoReFa(8))(r)
    r = tf.keras.layers.BatchNormalization(momentum=0.9, name="bn2")(r)
    r = tf.keras.layers.ReLU(6.0, name="r2")(r)
    r = syq_tf.quantize(tf.keras.layers.Conv2D(8, 1, use_bias=False, name="project"),
                        kernel_quantizer=SYQ(2, "channel"), input_quantizer=DoReFa(8))(r)
    r = tf.keras.layers.BatchNormalization(momentum=0.9, name="bn3")(r)
    h = tf.keras.layers.Add(name="add")([h, r])
    h = syq_tf.quantize(tf.keras.layers.SeparableConv2D(16, 3, padding="same", depth_multiplier=2, name="sep"),
                        kernel_quantizer=SYQ(2, "channel"), depthwise_quantizer=UniQ(3, "channel"),
                        input_quantizer=DoReFa(8))(h)
    h = tf.keras.layers.ReLU(name="r3")(h)
    h = tf.keras.layers.GlobalAveragePooling2D(name="gap")(h)
    return compiled_classifier(tf.keras.Model(inp, tf.keras.layers.Dense(4, name="head")(h)))


@pytest.fixture(scope="module")
def trained():
    # 1280 examples: agreement on 640 held out (0.99 allows 6 disagreements, not 1 of 128)
    return trained_classifier(mobilenet_block_model(), seed=3, epochs=8, n=1280)


def test_separable_kernels_have_their_own_quantizers():
    layer = syq_tf.quantize(tf.keras.layers.SeparableConv2D(6, 3, depth_multiplier=2, name="s"),
                            kernel_quantizer=SYQ(2, "channel"))
    layer.build((None, 8, 8, 3))
    # the depthwise kernel's quantizer defaults to a copy marked depthwise: one alpha per depthwise channel
    assert type(layer.depthwise_quantizer) is SYQ and layer.depthwise_quantizer.depthwise
    assert tuple(layer.depthwise_quantizer.alpha.shape) == (1, 1, 3, 2)
    assert tuple(layer.kernel_quantizer.alpha.shape) == (1, 1, 1, 6) and not layer.kernel_quantizer.depthwise
    assert set(layer.float_kernels()) == {"depthwise_kernel", "pointwise_kernel"}
    q = layer.quantized_kernel("depthwise_kernel").numpy()
    alpha = layer.depthwise_quantizer.alpha.numpy()
    np.testing.assert_allclose(np.abs(q[q != 0]), np.broadcast_to(alpha, q.shape)[q != 0], rtol=1e-6)
    config = layer.get_config()
    again = type(layer).from_config(config)
    assert again.get_config()["depthwise_quantizer"]["config"] == config["depthwise_quantizer"]["config"]
    with pytest.raises(ValueError, match="depthwise_quantizer is for SeparableConv2D"):
        syq_tf.quantize(tf.keras.layers.Conv2D(4, 3), kernel_quantizer=SYQ(), depthwise_quantizer=SYQ())


def test_mobilenet_block_trains_reloads_and_exports_exactly(trained, tmp_path):
    model, x, y, accuracy = trained
    assert accuracy >= 0.9
    path = str(tmp_path / "m.h5")
    model.save(path)
    again = tf.keras.models.load_model(path)
    np.testing.assert_array_equal(model.predict(x[:16], verbose=0), again.predict(x[:16], verbose=0))
    for weights in ("int8", "int4"):
        result = syq_tf.export.to_tflite(model, x[:128], weights=weights, verify_data=x[640:],
                                         verify_labels=y[640:], require_exact=True)
        layers = {r.layer: r for r in result.layers}
        for name, op in (("sep/depthwise_kernel", "DEPTHWISE_CONV_2D"), ("sep/pointwise_kernel", "CONV_2D"),
                         ("dw", "DEPTHWISE_CONV_2D"), ("expand", "CONV_2D"), ("project", "CONV_2D")):
            assert layers[name].op == op and layers[name].exact and layers[name].storage == weights, layers[name]
        assert layers["sep/pointwise_kernel"].stored_levels <= 3 and layers["sep/depthwise_kernel"].stored_levels <= 8
        assert result.verification["keras_accuracy"] >= 0.9, result.verification  # trained in inference too
        assert result.verification["top1_agreement"] >= 0.99, result.verification
    tflm = syq_tf.export.to_tflite(model, x[:64], target="tflm", verify_data=x[640:700])
    compression = {r.layer: r for r in tflm.compression}
    assert compression["sep/pointwise_kernel"].compressed
    # 3x3 depthwise, 8 levels: 3-bit indices and an 8-entry table per channel take more than int8's 9 bytes
    depthwise = compression["sep/depthwise_kernel"]
    assert not depthwise.compressed and depthwise.note.startswith("LUT would store") and depthwise.stored_bytes == 144
    assert tflm.verification["tflm_compressed_equals_uncompressed"]


def test_quantize_model_splits_separable_convs_into_named_low_bit_parts():
    x, y = separable_data(768, seed=4)
    inp = tf.keras.Input((8, 8, 1))
    h = tf.keras.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    h = tf.keras.layers.BatchNormalization(name="bn0")(h)
    h = tf.keras.layers.ReLU(name="r0")(h)
    h = tf.keras.layers.SeparableConv2D(16, 3, padding="same", name="sep")(h)
    h = tf.keras.layers.BatchNormalization(name="bn1")(h)
    h = tf.keras.layers.ReLU(name="r1")(h)
    h = tf.keras.layers.GlobalAveragePooling2D(name="gap")(h)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(4, name="head")(h))
    quantized, report = st.quantize_model(model, "syq-w2a8", return_report=True)
    assert report["low_bit"] == ["sep_depthwise", "sep_pointwise"] and report["unsupported"] == []
    assert {"stem", "head"} <= set(report["eight_bit"])
    quantized.compile(tf.keras.optimizers.Adam(1e-2), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    assert quantized.fit(x[:640], y[:640], epochs=6, batch_size=32, verbose=0).history["accuracy"][-1] >= 0.9
    result = syq_tf.export.to_tflite(quantized, x[:128], verify_data=x[640:], require_exact=True)
    low = {r.layer: r for r in result.layers if r.quantizer != "float"}
    assert set(low) == {"quant_sep_depthwise", "quant_sep_pointwise"} and all(r.exact for r in low.values())
    assert low["quant_sep_depthwise"].op == "DEPTHWISE_CONV_2D"
    assert result.verification["top1_agreement"] >= 0.99, result.verification
    # a separable conv as the first weighted layer keeps both parts at 8 bits, as the papers do
    first = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.SeparableConv2D(4, 3, name="s0"),
                                 tf.keras.layers.Conv2D(4, 3, name="c1"), tf.keras.layers.Flatten(),
                                 tf.keras.layers.Dense(4, name="d")])
    _, report = st.quantize_model(first, "syq-w2a8", return_report=True)
    assert {"s0_depthwise", "s0_pointwise", "d"} <= set(report["eight_bit"]) and report["low_bit"] == ["c1"]
