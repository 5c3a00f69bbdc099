"""UniQ: levels, clipping, LSQ step gradients and the Gaussian-optimal initial steps, against
numpy references written from METHODS.md §2."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from syq_tf.quantizers import UniQ, UniQActivation, uniq_activation_quantize, uniq_weight_quantize
from syq_tf.quantizers import uniq as uniq_module


def ref_weight(w, delta, bits):
    """(Q, dQ/ddelta per element, dQ/dw mask) straight from the formulas (numpy rounding)."""
    L = 2**bits
    c = (L - 1) / 2
    u = w / delta + c
    q = (np.round(np.clip(u, 0, L - 1)) - c) * delta
    inside = (u >= 0) & (u <= L - 1)
    d_delta = np.where(inside, np.round(u) - u, np.where(u < 0, -c, c))
    return q, d_delta, inside.astype(np.float64)


def ref_activation(a, delta, bits):
    L = 2**bits
    u = a / delta
    q = np.round(np.clip(u, 0, L - 1)) * delta
    inside = (u >= 0) & (u <= L - 1)
    d_delta = np.where(inside, np.round(u) - u, np.where(u < 0, 0.0, L - 1))
    return q, d_delta, inside.astype(np.float64)


def grads(fn, x, delta, upstream):
    x, delta = tf.constant(x), tf.Variable(delta)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x, delta)
    gx, gd = tape.gradient(y, [x, delta], output_gradients=tf.constant(upstream))
    return y.numpy(), gx.numpy(), gd.numpy()


# ---- initial step constants ------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_weight_constants_are_the_gaussian_mse_optimum(bits):
    assert uniq_module.gaussian_optimal_step(bits) == pytest.approx(uniq_module.K_WEIGHT[bits], abs=1e-4)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_activation_constants_are_the_rectified_gaussian_optimum(bits):
    got = uniq_module.gaussian_optimal_step(bits, rectified=True)
    assert got == pytest.approx(uniq_module.K_ACTIVATION[bits], abs=1e-4)


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_gaussian_mse_matches_sampled_error(bits):
    x = np.random.default_rng(bits).standard_normal(400_000).astype(np.float32)
    delta = uniq_module.weight_step_constant(bits)
    q = uniq_weight_quantize(tf.constant(x), tf.constant(delta), bits).numpy()
    assert np.mean((x - q) ** 2) == pytest.approx(uniq_module.gaussian_mse(delta, bits), rel=0.03)
    a = np.maximum(x, 0)
    delta_a = uniq_module.activation_step_constant(bits)
    qa = uniq_activation_quantize(tf.constant(a), tf.constant(delta_a), bits).numpy()
    assert np.mean((a - qa) ** 2) == pytest.approx(
        uniq_module.gaussian_mse(delta_a, bits, rectified=True), rel=0.03)


# ---- weights -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_weight_levels_are_mid_rise_without_zero(bits):
    delta = 0.25
    w = np.linspace(-3 * 2**bits * delta, 3 * 2**bits * delta, 20001).astype(np.float32)
    q = uniq_weight_quantize(tf.constant(w), tf.constant(delta), bits).numpy()
    c = (2**bits - 1) / 2
    expected = (np.arange(2**bits) - c) * delta
    np.testing.assert_allclose(np.unique(q), expected, rtol=1e-6)
    assert 0.0 not in q
    if bits == 1:
        np.testing.assert_array_equal(np.unique(q), [-delta / 2, delta / 2])


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_weight_forward_and_gradients_match_formulas(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(0, 1, (3, 3, 4, 5)).astype(np.float32)
    g = rng.normal(0, 1, w.shape).astype(np.float32)
    delta = np.float32(0.7 / bits)  # small enough that some weights clip
    q, gw, gd = grads(lambda x, d: uniq_weight_quantize(x, d, bits), w, delta, g)
    rq, rdd, rmask = ref_weight(w.astype(np.float64), float(delta), bits)
    np.testing.assert_allclose(q, rq, rtol=1e-6, atol=1e-6)
    assert 0 < rmask.mean() < 1  # both regimes exercised
    np.testing.assert_array_equal(gw, g * rmask)
    q_p = max(2 ** (bits - 1) - 1, 1)
    expected = np.sum(g * rdd) / np.sqrt(w.size * q_p)
    assert gd == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_weight_symmetric_and_ties_away_from_centre():
    delta = tf.constant(0.5)
    w = tf.constant([0.0, 0.5, 1.0, -0.5, -1.0, 0.2, -0.2])
    q = uniq_weight_quantize(w, delta, 2).numpy()
    np.testing.assert_allclose(q, [0.25, 0.75, 0.75, -0.75, -0.75, 0.25, -0.25])
    x = tf.constant(np.random.default_rng(0).normal(size=1000).astype(np.float32))
    np.testing.assert_array_equal(uniq_weight_quantize(-x, delta, 3).numpy(),
                                  -uniq_weight_quantize(x, delta, 3).numpy())


def test_channel_steps_and_their_gradients():
    rng = np.random.default_rng(5)
    w = rng.normal(0, 1, (3, 3, 2, 4)).astype(np.float32)
    g = rng.normal(0, 1, w.shape).astype(np.float32)
    delta = np.array([0.2, 0.5, 1.0, 2.0], np.float32).reshape(1, 1, 1, 4)
    q, _, gd = grads(lambda x, d: uniq_weight_quantize(x, d, 2, (0, 1, 2)), w, delta, g)
    for c in range(4):
        rq, rdd, _ = ref_weight(w[..., c].astype(np.float64), float(delta.ravel()[c]), 2)
        np.testing.assert_allclose(q[..., c], rq, rtol=1e-6, atol=1e-6)
        expected = np.sum(g[..., c] * rdd) / np.sqrt(w[..., c].size * 1)
        assert gd.ravel()[c] == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_weight_step_initialises_from_std(granularity):
    w = np.random.default_rng(2).normal(0, 0.1, (3, 3, 4, 6)).astype(np.float32)
    w[..., 1] *= 5
    q = UniQ(3, granularity)
    q(tf.constant(w))
    axes = (0, 1, 2, 3) if granularity == "layer" else (0, 1, 2)
    expected = 0.58602 * w.std(axis=axes, keepdims=True, ddof=1)  # unbiased, as torch std()
    np.testing.assert_allclose(q.delta.numpy(), expected, rtol=1e-5)
    assert bool(q.delta_initialized.numpy())
    q.delta.assign(q.delta * 2)  # trained value survives further calls
    before = q.delta.numpy()
    tf.function(lambda: q(tf.constant(w)))()
    np.testing.assert_array_equal(q.delta.numpy(), before)


def test_weight_step_initialises_inside_graph_and_xla():
    w = tf.constant(np.random.default_rng(3).normal(0, 1, (16, 8)).astype(np.float32))
    eager = UniQ(4, "channel")
    expected = eager(w).numpy()
    q = UniQ(4, "channel")
    got = tf.function(lambda x: q(x), jit_compile=True)(w).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_zero_variance_channels_get_a_finite_step():
    w = np.zeros((4, 3), np.float32)
    w[:, 1] = 0.5
    w[:, 2] = np.array([1, -1, 2, -2])
    q = UniQ(2, "channel")
    out = q(tf.constant(w)).numpy()
    delta = q.delta.numpy().ravel()
    assert np.all(np.isfinite(delta)) and np.all(delta > 0)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[:, 1], 0.5 * np.ones(4), rtol=1e-6)  # constant channel is exact


# ---- activations -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_activation_forward_and_gradients_match_formulas(bits):
    rng = np.random.default_rng(10 + bits)
    a = rng.normal(0.3, 1.0, (8, 5, 5, 3)).astype(np.float32)
    g = rng.normal(0, 1, a.shape).astype(np.float32)
    delta = np.float32(1.5 / 2**bits)
    q, ga, gd = grads(lambda x, d: uniq_activation_quantize(x, d, bits), a, delta, g)
    rq, rdd, rmask = ref_activation(a.astype(np.float64), float(delta), bits)
    np.testing.assert_allclose(q, rq, rtol=1e-6, atol=1e-7)
    assert set(np.round(np.unique(q) / delta).astype(int)) <= set(range(2**bits))
    np.testing.assert_array_equal(ga, g * rmask)
    features = a.size // a.shape[0]
    expected = np.sum(g * rdd) / np.sqrt(features * (2**bits - 1))
    assert gd == pytest.approx(expected, rel=1e-4, abs=1e-5)


def _calibration_model():
    inp = tf.keras.Input((6, 6, 2))
    x = tf.keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = tf.keras.layers.BatchNormalization(name="bn")(x)
    x = tf.keras.layers.ReLU(name="relu")(x)
    x = syq_tf.quantize(tf.keras.layers.Conv2D(3, 3, name="c2"), kernel_quantizer=UniQ(2, "channel"),
                        input_quantizer=UniQActivation(2))(x)
    x = tf.keras.layers.Flatten()(x)
    out = lq.layers.QuantDense(2, kernel_quantizer=UniQ(4), input_quantizer=UniQActivation(4), name="fc")(x)
    return tf.keras.Model(inp, out)


def test_calibrate_sets_steps_from_data_without_touching_batchnorm():
    model = _calibration_model()
    x = np.random.default_rng(0).normal(1.0, 2.0, (96, 6, 6, 2)).astype(np.float32)
    bn = model.get_layer("bn")
    bn.moving_mean.assign([0.5, -0.5, 0.1, 0.0])
    before = [v.numpy().copy() for v in bn.weights]
    steps = syq_tf.calibrate(model, x, batches=3, batch_size=32)
    for v, b in zip(bn.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)
    # independent reference: the input of c2 with batch statistics, per batch of 32, on a copy
    relu_out = tf.keras.Model(model.input, model.get_layer("relu").output)
    copy = tf.keras.models.clone_model(relu_out)
    copy.set_weights(relu_out.get_weights())
    sigma = max(float(np.sqrt(2 * np.mean(copy(x[i:i + 32], training=True).numpy() ** 2)))
                for i in (0, 32, 64))
    q = model.get_layer("c2").input_quantizer
    assert steps[q.name] == pytest.approx(0.65077 * sigma, rel=1e-5)
    assert q.delta.numpy() == pytest.approx(0.65077 * sigma, rel=1e-5)
    assert model.get_layer("fc").input_quantizer.calibrated
    # inference-mode calibration uses the moving statistics instead
    inference = max(float(np.sqrt(2 * np.mean(relu_out(x[i:i + 32], training=False).numpy() ** 2)))
                    for i in (0, 32, 64))
    steps = syq_tf.calibrate(model, x, batches=3, batch_size=32, batch_statistics=False)
    assert steps[q.name] == pytest.approx(0.65077 * inference, rel=1e-5)
    assert abs(inference - sigma) > 0.01 * sigma  # the two modes really differ here
    for v, b in zip(bn.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_uncalibrated_step_never_reaches_training_or_inference():
    model = _calibration_model()
    x = np.random.default_rng(0).normal(size=(32, 6, 6, 2)).astype(np.float32)
    y = np.zeros(32, np.int64)
    with pytest.raises(tf.errors.InvalidArgumentError, match="never set.*syq_tf.calibrate"):
        model(x)
    model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(tf.errors.InvalidArgumentError, match="never set"):
        model.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(uniq_module.NotCalibratedError, match="before export"):
        model.get_layer("c2").input_quantizer.export_grid()
    # the callback calibrates first, then training runs
    model.fit(x, y, epochs=1, verbose=0, callbacks=[syq_tf.Calibrate(x, batches=1)])
    q = model.get_layer("c2").input_quantizer
    trained = q.delta.numpy()
    assert q.calibrated
    # a second fit with the callback keeps the learned step (no recalibration)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[syq_tf.Calibrate(x[:4] * 100, batches=1)])
    assert abs(q.delta.numpy() - trained) < 0.1 * trained


def test_initial_step_skips_calibration_and_export_grid_is_the_step():
    q = UniQActivation(3, initial_step=0.1)
    q(tf.zeros((1, 4)))
    assert q.calibrated
    step, levels = q.export_grid()
    assert step == pytest.approx(0.1) and levels == 8


# ---- as Keras/larq quantizers, and errors -----------------------------------------------------


def test_larq_aliases_and_config_round_trip():
    assert isinstance(lq.quantizers.get("uniq"), UniQ)
    assert isinstance(lq.quantizers.get("uniq_activation"), UniQActivation)
    q = UniQ(5, "channel", name="k")
    assert UniQ.from_config(q.get_config()).get_config() == q.get_config()
    a = UniQActivation(3, initial_step=0.2, name="a")
    assert UniQActivation.from_config(a.get_config()).get_config() == a.get_config()
    assert q.precision == 5 and a.precision == 3


@pytest.mark.parametrize("bits", [0, 9, 2.5, True, "2"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits=.*allowed: integers 1 to 8"):
        UniQ(bits)
    with pytest.raises(ValueError, match="bits=.*allowed: integers 1 to 8"):
        UniQActivation(bits)


def test_bad_granularity_and_step():
    with pytest.raises(ValueError, match="granularity 'pixel'.*'layer', 'channel'"):
        UniQ(2, "pixel")
    with pytest.raises(ValueError, match="initial_step"):
        UniQActivation(2, initial_step=-1.0)


def test_wrong_role_is_refused():
    with pytest.raises(ValueError, match="UniQActivation quantizes activations"):
        syq_tf.quantize(tf.keras.layers.Dense(3, name="d"), kernel_quantizer=UniQActivation(2))
    with pytest.raises(ValueError, match="UniQ quantizes weights"):
        syq_tf.quantize(tf.keras.layers.Dense(3, name="d"), input_quantizer=UniQ(2))
    from syq_tf.quantizers import LeastSquares, LeastSquaresActivation
    with pytest.raises(ValueError, match="LeastSquaresActivation quantizes activations"):
        syq_tf.quantize(tf.keras.layers.Conv2D(3, 3, name="c"), kernel_quantizer=LeastSquaresActivation("ls2"))
    with pytest.raises(ValueError, match="LeastSquares quantizes weights"):
        syq_tf.quantize(tf.keras.layers.Conv2D(3, 3, name="c"), input_quantizer=LeastSquares("ls2"))
    # a weight quantizer handed activations directly (e.g. as a larq input_quantizer) refuses them
    with pytest.raises(ValueError, match="Use it as kernel_quantizer, not as input_quantizer"):
        tf.keras.Sequential([tf.keras.Input((4,)), UniQ(2)])


def test_depthwise_channel_steps():
    layer = syq_tf.quantize(tf.keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw"),
                            kernel_quantizer=UniQ(2, "channel"))
    layer(tf.zeros((1, 5, 5, 3)))
    assert layer.kernel_quantizer.delta.shape == (1, 1, 3, 2)
