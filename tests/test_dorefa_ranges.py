"""syq_tf.fit_dorefa_ranges: DoReFa's fixed [0, 1] range fitted to a float model's activations by
moving a scale from each BatchNormalization into the next kernel."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from syq_tf import quantizers as Q
from syq_tf.calibration import best_dorefa_scale, dorefa_chains, dorefa_range_error
from syq_tf.models import layer_kernels
from syq_tf.recipes import build_cnn, transfer_float_weights

WIDTHS = (4, 4, 8, 8, 16)


def test_range_error_hand_derived():
    # 1 bit, scale 2: levels {0, 2}; 0.9 -> round(0.45) = 0 -> error 0.81; 1.2 -> 2 -> 0.64;
    # 3 -> clipped to 2 -> 1; -1 -> 0 (a ReLU's zero, whatever the scale) -> 0. Mean 2.45 / 4.
    a = np.array([0.9, 1.2, 3.0, -1.0])
    assert dorefa_range_error(a, 2.0, 1) == pytest.approx(2.45 / 4)
    # 8 bits at the largest value: only rounding, at most half a step
    x = np.linspace(0, 5, 1001)
    assert dorefa_range_error(x, 5.0, 8) <= (5.0 / 255 / 2) ** 2


def test_best_scale_minimises_the_error_over_its_grid():
    rng = np.random.default_rng(0)
    a = np.abs(rng.normal(size=20000)) * 3
    a[0] = 40.0  # one outlier
    for bits in (8, 2):
        s = best_dorefa_scale(a, bits)
        grid = a.max() * np.geomspace(1 / 64, 1, 64)
        errors = [dorefa_range_error(a, g, bits) for g in grid]
        assert dorefa_range_error(a, s, bits) == pytest.approx(min(errors))
        assert dorefa_range_error(a, s, bits) <= dorefa_range_error(a, a.max(), bits)
    # 8 bits: the outlier's clipping costs more than the rounding saved (the largest value wins);
    # 2 bits: the rounding dominates
    assert best_dorefa_scale(a, 8) == pytest.approx(40.0)
    assert dorefa_range_error(a, best_dorefa_scale(a, 2), 2) < 0.5 * dorefa_range_error(a, 40.0, 2)
    # 2 bits clip far inside the bulk of a half-normal of std 3; 8 bits keep much more of it
    assert best_dorefa_scale(a, 2) < 10
    assert best_dorefa_scale(np.zeros(10), 8) is None
    assert best_dorefa_scale(-np.ones(10), 8) is None


def _float_and_quantized(weight_q, seed=0):
    tf.keras.utils.set_random_seed(seed)
    float_model = build_cnn(None, widths=WIDTHS)
    # BatchNorms that put most ReLU outputs far above DoReFa's 1
    for layer in float_model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([np.full_like(g, 3.0), np.full_like(b, 2.0), m, v])
    quantized = build_cnn(widths=WIDTHS, quantizers=(weight_q, weight_q and (lambda: Q.SYQ(2, "layer")),
                                                     lambda: Q.DoReFa(8)))
    quantized.set_weights(transfer_float_weights(quantized, float_model))
    syq_tf.reinitialize_scales(quantized)
    return float_model, quantized


def test_float_weights_recover_the_float_function():
    x = np.random.default_rng(1).uniform(0, 1, (64, 28, 28, 1)).astype(np.float32)
    float_model, quantized = _float_and_quantized(None)
    reference = float_model(x, training=False).numpy()
    before = quantized(x, training=False).numpy()
    scales = syq_tf.fit_dorefa_ranges(quantized, x, batches=1, batch_statistics=False)
    after = quantized(x, training=False).numpy()
    # every DoReFa consumer (conv2-conv4, dense, logits) got a scale above 1 (ranges up to ~8)
    assert sorted(scales) == sorted(l.name for l in quantized.layers if getattr(l, "input_quantizer", None))
    assert all(isinstance(s, float) and s > 2 for s in scales.values()), scales
    err_before = np.abs(before - reference).max() / np.abs(reference).max()
    err_after = np.abs(after - reference).max() / np.abs(reference).max()
    assert err_before > 0.3  # clipped at 1: a different function
    assert err_after < 0.02, err_after  # only 8-bit rounding left
    agree = (after.argmax(1) == reference.argmax(1)).mean()
    assert agree >= 0.95


def _latent(variable):
    return getattr(variable, "latent_variable", variable).numpy()


def test_rescale_goes_into_the_next_batchnorm_or_else_the_kernel():
    x = np.random.default_rng(2).uniform(0, 1, (32, 28, 28, 1)).astype(np.float32)
    _, quantized = _float_and_quantized(lambda: Q.SYQ(2, "pixel"))
    for layer in quantized.layers:  # moving statistics other than the defaults
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.linspace(-1, 1, layer.moving_mean.shape[0]))
            layer.moving_variance.assign(np.linspace(2, 4, layer.moving_variance.shape[0]))
    bn2, conv3, bn3 = (quantized.get_layer(n) for n in ("bn2", "conv3", "bn3"))
    logits, bn5 = quantized.get_layer("logits"), quantized.get_layer("bn5")
    old = {n: v.numpy().copy() for n, v in (("g2", bn2.gamma), ("b2", bn2.beta), ("m3", bn3.moving_mean),
                                            ("v3", bn3.moving_variance), ("g5", bn5.gamma),
                                            ("alpha3", conv3.kernel_quantizer.alpha), ("lb", logits.bias))}
    k3, kl = _latent(conv3.kernel), _latent(logits.kernel)
    scales = syq_tf.fit_dorefa_ranges(quantized, x, batches=1)
    s, t = scales["conv3"], scales["logits"]
    # conv3 is read by bn3: bn2's range moves into bn3's moving statistics, conv3 keeps its values
    np.testing.assert_allclose(bn2.gamma.numpy(), old["g2"] / s, rtol=1e-6)
    np.testing.assert_allclose(bn2.beta.numpy(), old["b2"] / s, rtol=1e-6)
    np.testing.assert_allclose(bn3.moving_mean.numpy(), old["m3"] / s, rtol=1e-6)
    eps = bn3.epsilon
    np.testing.assert_allclose(bn3.moving_variance.numpy(), (old["v3"] + eps) / s**2 - eps, rtol=1e-5)
    np.testing.assert_array_equal(_latent(conv3.kernel), k3)
    np.testing.assert_array_equal(conv3.kernel_quantizer.alpha.numpy(), old["alpha3"])
    # logits (float kernel, bias, nothing after it): bn5's range moves into its kernel
    np.testing.assert_allclose(bn5.gamma.numpy(), old["g5"] / t, rtol=1e-6)
    np.testing.assert_allclose(_latent(logits.kernel), kl * t, rtol=1e-6)
    np.testing.assert_array_equal(logits.bias.numpy(), old["lb"])


def test_kernel_route_rescales_the_syq_scale_with_the_kernel():
    # a quantized Dense read by nothing: its SYQ kernel takes the scale, alpha = mean|s W| = s alpha
    inp = tf.keras.Input((6,))
    h = tf.keras.layers.BatchNormalization(name="bn", gamma_initializer=tf.keras.initializers.Constant(4.0),
                                           beta_initializer=tf.keras.initializers.Constant(3.0))(inp)
    out = lq.layers.QuantDense(3, input_quantizer=Q.DoReFa(8), kernel_quantizer=Q.SYQ(2, "layer"), name="fc")(h)
    model = tf.keras.Model(inp, out)
    x = np.random.default_rng(3).normal(size=(64, 6)).astype(np.float32)
    syq_tf.reinitialize_scales(model)
    fc = model.get_layer("fc")
    kernel, alpha = _latent(fc.kernel), fc.kernel_quantizer.alpha.numpy()
    q_before = fc.kernel_quantizer(tf.constant(kernel)).numpy()
    s = syq_tf.fit_dorefa_ranges(model, x, batches=1, batch_statistics=False)["fc"]
    np.testing.assert_allclose(_latent(fc.kernel), kernel * s, rtol=1e-6)
    np.testing.assert_allclose(fc.kernel_quantizer.alpha.numpy(), alpha * s, rtol=1e-5)
    # SYQ's codebook follows: Q(s W) = s Q(W) (threshold relative to max|W|, alpha = mean|W|)
    np.testing.assert_allclose(fc.kernel_quantizer(tf.constant(_latent(fc.kernel))).numpy(), s * q_before,
                               rtol=1e-5, atol=1e-7)


def test_chains_that_cannot_be_rescaled_are_left_alone_with_the_reason():
    inp = tf.keras.Input((8, 8, 3))
    h = tf.keras.layers.Conv2D(4, 3, padding="same")(inp)
    h = tf.keras.layers.BatchNormalization(name="bn")(h)
    a = lq.layers.QuantConv2D(4, 3, padding="same", input_quantizer=Q.DoReFa(8), name="branch_a")(h)
    b = lq.layers.QuantConv2D(4, 3, padding="same", input_quantizer=Q.DoReFa(8), name="branch_b")(h)
    c = tf.keras.layers.BatchNormalization(name="bn_c")(tf.keras.layers.Add()([a, b]))
    d = lq.layers.QuantConv2D(4, 3, padding="same", input_quantizer=Q.DoReFa(8),
                              kernel_quantizer="ste_sign", name="binary")(c)
    e = lq.layers.QuantConv2D(4, 3, padding="same", input_quantizer=Q.DoReFa(8), name="first")(inp)
    model = tf.keras.Model(inp, [d, e])
    reasons = {consumer.name: reason for _, consumer, reason in dorefa_chains(model)}
    assert "'bn' feeds 2 layers" in reasons["branch_a"]
    assert "'bn' feeds 2 layers" in reasons["branch_b"]
    assert "SteSign has no scale set from the weights" in reasons["binary"]
    assert "from the model's input" in reasons["first"]
    _assert_left_alone(model, reasons)


def _assert_left_alone(model, reasons):
    """fit_dorefa_ranges returns exactly these reasons and changes no weight."""
    before = [w.copy() for w in model.get_weights()]
    out = syq_tf.fit_dorefa_ranges(model, np.ones((4, 8, 8, 3), np.float32), batches=1)
    assert out == reasons
    for w0, w1 in zip(before, model.get_weights()):
        np.testing.assert_array_equal(w0, w1)


@pytest.mark.parametrize("batches", [0, -1, 2.5, True])
def test_bad_batches(batches):
    _, quantized = _float_and_quantized(None)
    with pytest.raises(ValueError, match=r"fit_dorefa_ranges: batches=.* must be a positive integer"):
        syq_tf.fit_dorefa_ranges(quantized, np.zeros((2, 28, 28, 1), np.float32), batches=batches)


def test_nan_activations_are_an_error_naming_the_layer():
    _, quantized = _float_and_quantized(None)
    x = np.zeros((2, 28, 28, 1), np.float32)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="input of 'conv2' holds NaN or Inf"):
        syq_tf.fit_dorefa_ranges(quantized, x, batches=1)


# ------------------------------------------------------------------------------------------------
# tfmot models: DoReFa is the output quantizer of a wrapped ReLU, the kernel layer after it reads it.

def _bn(name, gamma=3.0, beta=2.0):
    return tf.keras.layers.BatchNormalization(name=name, gamma_initializer=tf.keras.initializers.Constant(gamma),
                                              beta_initializer=tf.keras.initializers.Constant(beta))


def _mobilenet_like(relu=lambda name: tf.keras.layers.ReLU(6.0, name=name)):
    """conv -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> conv -> BN -> ReLU6 -> average -> flatten ->
    dense: the MobileNet chain (BatchNorms that put the ReLU outputs far above 1)."""
    tf.keras.utils.set_random_seed(4)
    L = tf.keras.layers
    inp = tf.keras.Input((8, 8, 3))
    h = relu("relu0")(_bn("bn0")(L.Conv2D(4, 3, padding="same", use_bias=False, name="conv0")(inp)))
    h = relu("relu1")(_bn("bn1")(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw1")(h)))
    h = relu("relu2")(_bn("bn2")(L.Conv2D(6, 1, use_bias=False, name="pw2")(h)))
    h = L.Flatten(name="flat")(L.AveragePooling2D(8, name="pool")(h))
    model = tf.keras.Model(inp, L.Dense(5, name="fc")(h))
    for layer in model.layers:  # moving statistics that differ from the defaults
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(np.linspace(-0.5, 0.5, n))
            layer.moving_variance.assign(np.linspace(1.5, 3.0, n))
    return model


def test_tfmot_output_quantizers_recover_the_float_function():
    from syq_tf.quantizers import DoReFaActivation
    from syq_tf.tfmot import configs

    float_model = _mobilenet_like()
    tq = __import__("tensorflow_model_optimization").quantization.keras

    def annotate(layer):  # only the ReLUs quantized (8-bit DoReFa outputs), the rest float
        copy = layer.__class__.from_config(layer.get_config())
        if isinstance(layer, tf.keras.layers.ReLU):
            return tq.quantize_annotate_layer(copy, configs.ActivationConfig(DoReFaActivation(8)))
        return copy

    annotated = tf.keras.models.clone_model(float_model, clone_function=annotate)
    annotated.set_weights(float_model.get_weights())
    with configs.quantize_scope():
        quantized = tq.quantize_apply(annotated)
    x = np.random.default_rng(5).uniform(0, 1, (64, 8, 8, 3)).astype(np.float32)
    reference = float_model(x, training=False).numpy()
    before = quantized(x, training=False).numpy()
    scales = syq_tf.fit_dorefa_ranges(quantized, x, batches=1, batch_statistics=False)
    after = quantized(x, training=False).numpy()
    assert sorted(scales) == ["quant_relu0", "quant_relu1", "quant_relu2"], scales
    # ReLU6 outputs: every range fitted is above DoReFa's 1 and at most the cap
    assert all(isinstance(s, float) and 1.5 < s <= 6.0 for s in scales.values()), scales
    err_before = np.abs(before - reference).max() / np.abs(reference).max()
    err_after = np.abs(after - reference).max() / np.abs(reference).max()
    assert err_before > 0.3  # clipped at 1: a different function
    assert err_after < 0.02, err_after  # only 8-bit rounding left


def test_tfmot_quantize_model_chains_and_their_variables():
    float_model = _mobilenet_like()
    quantized = syq_tf.tfmot.quantize_model(float_model, scheme="syq-w2a4")
    chains = {owner.name: (producer, reason) for producer, owner, reason in dorefa_chains(quantized)}
    assert sorted(chains) == ["quant_relu0", "quant_relu1", "quant_relu2"]
    assert all(reason is None for _, reason in chains.values()), chains
    assert chains["quant_relu1"][0].name == "quant_bn1"
    get = quantized.get_layer
    pool, fc, dw1 = get("quant_pool"), get("quant_fc"), get("quant_dw1")
    ranges = {v.name.split("/")[-1]: v for v in pool.non_trainable_weights if "output_m" in v.name}
    assert sorted(ranges) == ["output_max:0", "output_min:0"]
    ranges["output_max:0"].assign(5.0)
    kernel_max = [v for v in fc.non_trainable_weights if v.name.endswith("kernel_max:0")][0]
    kernel_max.assign(np.full(kernel_max.shape, 0.5, np.float32))
    bn1, bn2 = get("quant_bn1").layer, get("quant_bn2").layer
    fc_kernel, dw_kernel = layer_kernels(fc)["kernel"][1], layer_kernels(dw1)["depthwise_kernel"][1]
    old = {k: v.numpy().copy() for k, v in (("g1", bn1.gamma), ("b1", bn1.beta), ("m2", bn2.moving_mean),
                                            ("v2", bn2.moving_variance), ("fc", fc_kernel), ("dw", dw_kernel))}
    x = np.random.default_rng(6).uniform(0, 1, (32, 8, 8, 3)).astype(np.float32)
    scales = syq_tf.fit_dorefa_ranges(quantized, x, batches=1)
    assert all(isinstance(s, float) for s in scales.values()), scales
    s0, s1, s2 = (scales[f"quant_relu{i}"] for i in range(3))
    # relu1 (bn1 -> relu1 -> pw2 -> bn2): bn1 divided, bn2's moving statistics take it, pw2 kept
    np.testing.assert_allclose(bn1.gamma.numpy(), old["g1"] / s1, rtol=1e-6)
    np.testing.assert_allclose(bn1.beta.numpy(), old["b1"] / s1, rtol=1e-6)
    np.testing.assert_allclose(bn2.moving_mean.numpy(), old["m2"] / s1, rtol=1e-6)
    np.testing.assert_allclose(bn2.moving_variance.numpy(), (old["v2"] + bn2.epsilon) / s1**2 - bn2.epsilon,
                               rtol=1e-5)
    np.testing.assert_array_equal(dw_kernel.numpy(), old["dw"])  # relu0's reader: bn1 took it
    # relu2 -> pool -> flatten -> fc (8-bit, nothing after): the pool's range divided, fc's kernel and
    # its 8-bit range multiplied
    np.testing.assert_allclose(ranges["output_max:0"].numpy(), 5.0 / s2, rtol=1e-6)
    np.testing.assert_allclose(fc_kernel.numpy(), old["fc"] * s2, rtol=1e-6)
    np.testing.assert_allclose(kernel_max.numpy(), 0.5 * s2, rtol=1e-6)
    assert s0 > 1.0


def test_tfmot_chains_left_alone_with_the_reason():
    L = tf.keras.layers
    inp = tf.keras.Input((8, 8, 3))
    h = L.ReLU(name="relu_in")(inp)  # reads the model's input
    h = L.Conv2D(4, 3, padding="same", name="conv0")(h)
    h = L.ReLU(name="relu_shared")(_bn("bn0")(L.Conv2D(4, 3, padding="same", name="conv1")(h)))
    a = L.Conv2D(4, 1, name="a")(h)
    b = L.Conv2D(4, 1, name="b")(h)
    h = L.Add(name="add")([a, b])
    h = L.ReLU(name="relu_add")(h)  # from an Add, not a BatchNormalization
    out = L.Dense(3, name="fc")(L.Flatten()(L.Conv2D(4, 1, name="c")(h)))
    model = tf.keras.Model(inp, out)
    quantized = syq_tf.tfmot.quantize_model(model, scheme="syq-w2a4")
    reasons = {owner.name: reason for _, owner, reason in dorefa_chains(quantized)}
    assert "from the model's input" in reasons["quant_relu_in"]
    assert "'quant_relu_shared' feeds 2 layers" in reasons["quant_relu_shared"]
    assert "(Add) lies between it and a BatchNormalization" in reasons["quant_relu_add"]
    _assert_left_alone(quantized, reasons)


def test_the_recipe_fits_the_ranges_unless_told_not_to():
    from syq_tf.recipes import prepare_finetune

    float_model, _ = _float_and_quantized(None)  # BatchNorms with gamma 3, beta 2
    x = np.random.default_rng(7).uniform(0, 1, (64, 28, 28, 1)).astype(np.float32)
    # the recipe fits on batch statistics (as training runs): compare in training mode
    reference = float_model(x, training=True).numpy()
    errors = {}
    for fit in (True, False):
        model = build_cnn(widths=WIDTHS, quantizers=(None, None, lambda: Q.DoReFa(8)))
        prepare_finetune(model, float_model, x, fit_ranges=fit, calibration_batches=1)
        gamma = model.get_layer("bn2").gamma.numpy()
        if fit:
            assert np.all(gamma < 1.5), gamma  # 3 / s with s > 2
        else:
            np.testing.assert_array_equal(gamma, np.full_like(gamma, 3.0))
        out = model(x, training=True).numpy()
        errors[fit] = np.abs(out - reference).max() / np.abs(reference).max()
    assert errors[True] < 0.02 < 0.3 < errors[False], errors
