"""tfmot integration: QuantizeConfigs round-trip and save/load in the scope; quantize_model on a
ResNet-style functional model trains and exports with exact low-bit codebooks; unsupported layers
are reported; the larq path and the tfmot path compute the same outputs."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import syq_tf
from conftest import separable_data
from syq_tf import tfmot as st
from syq_tf.export import flatbuffer
from syq_tf.export.match import kernel_matches
from syq_tf.quantizers import SYQ, DoReFaActivation, LeastSquares, LossAware, UniQ

tq = tfmot.quantization.keras

CONFIGS = [
    st.SYQConfig(bits=2, granularity="pixel", activation_bits=4),
    st.UniQConfig(bits=3, activation_bits=4),
    st.LeastSquaresConfig("ls2", activation_mode="lsT"),
    st.LossAwareConfig("linear", bits=3, activation_bits=8),
    st.ActivationConfig(DoReFaActivation(2)),
    st.QuantizeConfig(SYQ(1, "channel"), None),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_configs_round_trip_through_keras_serialization(config):
    data = tf.keras.utils.serialize_keras_object(config)
    with st.quantize_scope():
        again = tf.keras.utils.deserialize_keras_object(data)
    assert type(again) is type(config) and again.get_config() == config.get_config()
    assert again == config
    for q, q2 in zip(config.quantizers(), again.quantizers()):
        assert q.quantizer.get_config() == q2.quantizer.get_config()


def test_configs_reject_quantizers_in_the_wrong_role():
    with pytest.raises(ValueError, match="weight_quantizer DoReFaActivation quantizes activations"):
        st.QuantizeConfig(DoReFaActivation(4), None)
    with pytest.raises(ValueError, match="output_quantizer SYQ quantizes weights"):
        st.QuantizeConfig(None, SYQ(2))
    with pytest.raises(TypeError, match="expected a syq_tf quantizer"):
        st.TfmotQuantizer("ste_sign")
    layer = tf.keras.layers.ReLU(name="r")
    with pytest.raises(ValueError, match="layer 'r' \\(ReLU\\) has no kernel"):
        st.SYQConfig().get_weights_and_quantizers(layer)


def _annotated_model():
    a = tq.quantize_annotate_layer
    inp = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(8, 3, name="c0")(inp)
    x = a(tf.keras.layers.ReLU(name="r0"), st.ActivationConfig(DoReFaActivation(4)))(x)
    x = a(tf.keras.layers.Conv2D(8, 3, name="c1"), st.SYQConfig(2, "pixel"))(x)
    x = a(tf.keras.layers.DepthwiseConv2D(3, name="dw"), st.QuantizeConfig(UniQ(3, "channel")))(x)
    x = tf.keras.layers.Flatten()(x)
    x = a(tf.keras.layers.Dense(16, name="d1"), st.LeastSquaresConfig("ls1"))(x)
    out = a(tf.keras.layers.Dense(4, name="d2"), st.LossAwareConfig("ternary_exact"))(x)
    return tf.keras.Model(inp, out)


@pytest.mark.parametrize("fmt", ["h5", "tf"])
def test_annotate_apply_train_save_and_load_in_the_scope(tmp_path, fmt):
    x, y = separable_data(128)
    with st.quantize_scope():
        model = tq.quantize_apply(_annotated_model())
    model.compile(syq_tf.LossAwareAdam(1e-2), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, verbose=0)
    # the quantizers' scales are the wrappers' weights, and the loss-aware kernel was projected
    names = {v.name.split("/")[-1] for v in model.weights}
    assert {"kernel_alpha:0", "depthwise_kernel_delta:0", "output_delta:0"} - names == {"output_delta:0"}
    la = model.get_layer("quant_d2").quantize_config.weight_quantizer.impl
    assert model.optimizer.loss_aware_quantizers == [la] and bool(la.alpha_initialized.numpy())
    path = str(tmp_path / ("m.h5" if fmt == "h5" else "m"))
    model.save(path, save_format=fmt)
    with st.quantize_scope():
        loaded = tf.keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    for layer in ("quant_c1", "quant_d2"):
        old = dict(st.wrapper_kernels(model.get_layer(layer)))
        new = dict(st.wrapper_kernels(loaded.get_layer(layer)))
        for key in old:
            np.testing.assert_array_equal(old[key][0](old[key][1]), new[key][0](new[key][1]))


def resnet_like():
    inp = tf.keras.Input((8, 8, 1))
    h = tf.keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inp)
    h = tf.keras.layers.BatchNormalization(momentum=0.8, name="bn0")(h)
    h = tf.keras.layers.ReLU(name="r0")(h)
    r = tf.keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(h)
    r = tf.keras.layers.BatchNormalization(momentum=0.8, name="bn1")(r)
    r = tf.keras.layers.ReLU(name="r1")(r)
    r = tf.keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(r)
    r = tf.keras.layers.BatchNormalization(momentum=0.8, name="bn2")(r)
    h = tf.keras.layers.Add(name="add")([h, r])
    h = tf.keras.layers.ReLU(name="r2")(h)
    h = tf.keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="c2")(h)
    h = tf.keras.layers.BatchNormalization(momentum=0.8, name="bn3")(h)
    h = tf.keras.layers.ReLU(name="r3")(h)
    h = tf.keras.layers.GlobalAveragePooling2D(name="gap")(h)
    return tf.keras.Model(inp, tf.keras.layers.Dense(4, name="head")(h))


@pytest.mark.parametrize("scheme", ["syq-w2a8", "lab-w1", "laq-w3a8", "uniq-w2a8"])
def test_quantize_model_trains_and_exports_exact_low_bit_layers(scheme):
    x, y = separable_data(640)
    model, report = st.quantize_model(resnet_like(), scheme, return_report=True)
    assert report["low_bit"] == ["c1", "c2", "dw"] and {"stem", "head"} <= set(report["eight_bit"])
    assert report["unsupported"] == [] and report["float"] == []
    assert type(model.get_layer("quant_stem").quantize_config).__name__ == "Default8BitConvQuantizeConfig"
    optimizer = syq_tf.LossAwareAdam(1e-2) if scheme.startswith("la") else tf.keras.optimizers.Adam(1e-2)
    model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(x[:512], y[:512], epochs=6, batch_size=32, verbose=0)
    assert history.history["accuracy"][-1] > 0.9
    result = syq_tf.export.to_tflite(model, representative_data=x[:128], verify_data=x[512:],
                                     verify_labels=y[512:], require_exact=True)
    assert {r.layer for r in result.layers if r.quantizer != "float"} == {"quant_c1", "quant_dw", "quant_c2"}
    assert all(r.exact for r in result.layers if r.quantizer != "float")
    for match in kernel_matches(model, result.flatbuffer):  # read back from the flatbuffer
        if match.quantizer is not None:
            stored = match.tensor.values
            assert match.tensor.dtype == "INT8" and np.array_equal(stored == 0, match.expected() == 0)
            bits = {"syq-w2a8": 3, "lab-w1": 2, "laq-w3a8": 7, "uniq-w2a8": 4}[scheme]
            per_channel = [np.unique(np.take(stored, c, axis=match.tensor.quantized_dimension)).size
                           for c in range(stored.shape[match.tensor.quantized_dimension])]
            assert max(per_channel) <= bits
    assert result.verification["top1_agreement"] >= 0.99
    assert flatbuffer.op_names(result.flatbuffer).count("CONV_2D") == 3


def test_eight_bit_keeps_named_kernel_layers_at_tfmot_8_bits():
    x, y = separable_data(256)
    float_model = resnet_like()
    model, report = st.quantize_model(float_model, "syq-w2a8", eight_bit=["dw"], return_report=True)
    assert report["low_bit"] == ["c1", "c2"] and {"stem", "dw", "head"} <= set(report["eight_bit"])
    assert type(model.get_layer("quant_dw").quantize_config).__name__.startswith("Default8Bit")
    result = syq_tf.export.to_tflite(model, representative_data=x[:64], verify_data=x, verify_labels=y,
                                     require_exact=True)
    assert {r.layer for r in result.layers if r.quantizer != "float"} == {"quant_c1", "quant_c2"}
    dw = [t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.op == "DEPTHWISE_CONV_2D"]
    assert len(dw) == 1 and dw[0].dtype == "INT8"
    # 8-bit per-channel weights: more than the 3 ternary levels in some channel
    assert max(np.unique(np.take(dw[0].values, c, axis=-1)).size for c in range(8)) > 3
    with pytest.raises(ValueError, match="eight_bit names layers without a kernel to quantize: \\['gap'\\]"):
        st.quantize_model(float_model, "syq-w2a8", eight_bit=["gap"])
    with pytest.raises(ValueError, match="layers \\['dw'\\] are in both keep_float and eight_bit"):
        st.quantize_model(float_model, "syq-w2a8", eight_bit=["dw"], keep_float=["dw"])


def test_low_bit_activation_schemes_quantize_activation_layers():
    model, report = st.quantize_model(resnet_like(), "syq-w1a2", return_report=True)
    assert report["low_bit_activations"] == ["r0", "r1", "r2", "r3"]
    out = model.get_layer("quant_r1").quantize_config.output_quantizer
    assert isinstance(out.quantizer, DoReFaActivation) and out.quantizer.bits == 2
    x, _ = separable_data(16)
    values = np.unique(tf.keras.Model(model.input, model.get_layer("quant_r1").output)(x).numpy())
    assert np.all(np.isin(np.round(values * 3, 5), [0, 1, 2, 3]))  # 2-bit DoReFa levels {0, 1/3, 2/3, 1}


def test_unsupported_layers_are_reported_or_kept_float_on_request():
    inp = tf.keras.Input((10, 4))
    x = tf.keras.layers.Conv1D(8, 3, name="c0")(inp)
    x = tf.keras.layers.LSTM(8, return_sequences=True, name="lstm")(x)
    x = tf.keras.layers.Conv1D(8, 3, name="c1")(x)
    x = tf.keras.layers.GlobalAveragePooling1D(name="gap")(x)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(3, name="head")(x))
    with pytest.raises(st.UnsupportedLayersError, match="'lstm' \\(LSTM\\): tfmot's default 8-bit registry"):
        st.quantize_model(model, "syq-w2a8")
    quantized, report = st.quantize_model(model, "syq-w2a8", on_unsupported="keep_float", keep_float=["gap"],
                                          return_report=True)
    assert report["float"] == ["gap", "lstm"] and report["low_bit"] == ["c1"] and "c0" in report["eight_bit"]
    assert report["unsupported"] == [{"layer": "lstm", "type": "LSTM", "why": report["unsupported"][0]["why"]}]
    assert not st.is_wrapper(quantized.get_layer("lstm"))
    with pytest.raises(ValueError, match="keep_float names layers the model does not have: \\['nope'\\]"):
        st.quantize_model(model, "syq-w2a8", keep_float=["nope"])
    with pytest.raises(ValueError, match="unknown scheme 'syq-w3a8'|unsupported bit widths"):
        st.quantize_model(model, "syq-w3a8")
    with pytest.raises(ValueError, match="unknown scheme 'foo'"):
        st.quantize_model(model, "foo")


def test_weightless_preprocessing_layers_pass_through_and_export():
    # EfficientNet's stem: Rescaling and Normalization (adapted statistics, no trainable weights)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (96, 8, 8, 3)).astype(np.float32)
    y = (x[..., 0].mean((1, 2)) > x[..., 1].mean((1, 2))).astype(np.int32)
    norm = tf.keras.layers.Normalization(name="norm")
    norm.adapt(x / 255.0)
    inp = tf.keras.Input((8, 8, 3))
    h = tf.keras.layers.Rescaling(1 / 255.0, name="rescale")(inp)
    h = norm(h)
    h = tf.keras.layers.Conv2D(8, 3, name="c0")(h)
    h = tf.keras.layers.ReLU(name="r0")(h)
    h = tf.keras.layers.Conv2D(8, 3, name="c1")(h)
    h = tf.keras.layers.ReLU(name="r1")(h)
    h = tf.keras.layers.GlobalAveragePooling2D(name="gap")(h)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(2, name="head")(h))
    quantized, report = st.quantize_model(model, "syq-w2a8", return_report=True)  # no flags needed
    assert report["passed_through"] == ["norm", "rescale"] and report["unsupported"] == []
    # c1 -> ReLU directly: tfmot alone would give c1 a no-op config (a float kernel); ours keeps it low-bit
    assert {"norm", "rescale"} <= set(report["float"]) and report["low_bit"] == ["c1"]
    assert not st.is_wrapper(quantized.get_layer("norm")) and not st.is_wrapper(quantized.get_layer("rescale"))
    quantized.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    quantized.fit(x, y, epochs=1, batch_size=32, verbose=0)
    result = syq_tf.export.to_tflite(quantized, x[:32], verify_data=x[32:])
    assert next(r for r in result.layers if r.layer == "quant_c1").exact
    assert result.verification["top1_agreement"] >= 0.95, result.verification


@pytest.mark.parametrize("weight,out", [(SYQ(2, "channel"), DoReFaActivation(4)),
                                        (LeastSquares("ls2"), None),
                                        (LossAware("linear", bits=3, curvature="constant"), DoReFaActivation(8))])
def test_larq_path_and_tfmot_path_compute_the_same(weight, out):
    """The same float kernel through a larq QuantDense (+ the activation quantizer as a layer) and
    through a tfmot wrapper with the same syq_tf quantizers gives the same outputs. (Layer level:
    tfmot adds its own 8-bit quantization of the model input, which larq does not.)"""
    x = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
    fc = lq.layers.QuantDense(5, kernel_quantizer=type(weight).from_config(weight.get_config()), name="fc")
    act = None if out is None else type(out).from_config(out.get_config())
    fc.build((None, 6))

    inp = tf.keras.Input((6,))
    h = tq.quantize_annotate_layer(tf.keras.layers.Dense(5, name="fc"), st.QuantizeConfig(weight, out))(inp)
    with st.quantize_scope():
        tfmot_model = tq.quantize_apply(tf.keras.Model(inp, h))
    wrapper = tfmot_model.get_layer("quant_fc")
    st.wrapper_kernels(wrapper)["kernel"][1].assign(fc.kernel.latent_variable)  # the float kernels agree ...
    wrapper.layer.bias.assign(fc.bias)
    expected = fc(x) if act is None else act(fc(x))
    np.testing.assert_allclose(wrapper(x, training=False).numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
    assert tfmot_model.layers[1].name == "quantize_layer"  # (the model-level difference)


def test_the_scheme_works_with_tfmots_own_quantize_apply():
    annotated = tq.quantize_annotate_model(resnet_like())
    with st.quantize_scope():
        model = tq.quantize_apply(annotated, scheme=st.SyqQuantizeScheme("syq-w1a8", eight_bit=["head"]))
    configs = {layer.layer.name: layer.quantize_config for layer in model.layers if st.is_wrapper(layer)}
    for name in ("stem", "c1", "dw", "c2"):  # every kernel but the one kept at 8 bits is binary SYQ
        assert isinstance(configs[name].weight_quantizer.quantizer, SYQ) and configs[name].weight_quantizer.quantizer.bits == 1
    assert type(configs["head"]).__name__ == "Default8BitQuantizeConfig"
    # tfmot's Conv+BatchNorm(+ReLU) transforms did their usual work around the low-bit convs
    assert type(configs["bn1"]).__name__ == "NoOpQuantizeConfig"
    assert type(configs["bn2"]).__name__ == "Default8BitOutputQuantizeConfig"


@pytest.mark.parametrize("scheme", ["uniq-w4a8", "syq-w2a8"])
def test_depthwise_scales_are_per_channel_for_every_scheme(scheme):
    """A DepthwiseConv2D [3, 3, 4, 1] under a per-channel scheme gets one scale per channel, UniQ
    too (it once got one step for the whole kernel)."""
    inp = tf.keras.Input((8, 8, 4))
    h = tf.keras.layers.Conv2D(4, 3, name="a")(inp)
    h = tf.keras.layers.DepthwiseConv2D(3, name="dw", depthwise_initializer="random_normal")(h)
    model = st.quantize_model(tf.keras.Model(inp, tf.keras.layers.Conv2D(4, 1, name="z")(h)), scheme)
    (impl, kernel), = st.wrapper_kernels(model.get_layer("quant_dw")).values()
    assert impl.depthwise and tuple(impl._scale.shape) == (1, 1, 4, 1)
    w = kernel.numpy()
    q = impl(tf.convert_to_tensor(w)).numpy()
    scaled = w.copy()
    scaled[:, :, 0] *= 3.0  # channel 0 only: a fresh quantizer's levels of the other channels stay
    fresh = type(impl).from_config(impl.get_config())
    q2 = fresh(tf.constant(scaled)).numpy()
    if scheme.startswith("uniq"):  # (SYQ's ternary threshold is a fraction of the whole kernel's max|W|)
        np.testing.assert_allclose(q2[:, :, 1:], q[:, :, 1:], rtol=1e-5)
    np.testing.assert_allclose(fresh._scale.numpy()[0, 0, 1:], impl._scale.numpy()[0, 0, 1:], rtol=1e-5)


def test_dense_batchnorm_relu_has_no_rounding_between_its_three_layers():
    """The converter fuses Dense + BatchNormalization + ReLU into one FULLY_CONNECTED that rounds at
    the ReLU's output only; Keras must not round the BatchNormalization's output (tfmot's own order
    of its Dense transforms puts an 8-bit fake-quant there, which put 3.4 % of the MLPerf Tiny
    autoencoder's first-layer 4-bit levels one off in LiteRT)."""
    L = tf.keras.layers
    inp = tf.keras.Input((24,))
    h = inp
    for i in range(3):
        h = L.ReLU(name=f"relu{i}")(L.BatchNormalization(name=f"bn{i}")(L.Dense(16, name=f"d{i}")(h)))
    model = tf.keras.Model(inp, L.Dense(24, name="out")(h))
    x = np.random.default_rng(0).uniform(0, 1, (64, 24)).astype(np.float32)
    q = st.quantize_model(model, "syq-w2a4")
    q.compile(tf.keras.optimizers.Adam(1e-3), "mse")
    q.fit(x, x, epochs=2, batch_size=16, verbose=0)  # the input's and the 8-bit layers' ranges
    for i in range(3):
        bn = q.get_layer(f"quant_bn{i}")
        assert type(bn.quantize_config).__name__ == "NoOpQuantizeConfig", i
        assert not [w.name for w in bn.weights if "output_m" in w.name]
    dense_out, bn_out = (tf.keras.Model(q.input, q.get_layer(n).output)(x).numpy() for n in ("quant_d0", "quant_bn0"))
    layer = q.get_layer("quant_bn0").layer
    expected = (dense_out - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + layer.epsilon) \
        * layer.gamma.numpy() + layer.beta.numpy()
    np.testing.assert_allclose(bn_out, expected, rtol=1e-5, atol=1e-5)  # not on an 8-bit grid
    assert np.unique(bn_out).size > 1000  # of 64 x 16 values: none rounded to a shared grid
