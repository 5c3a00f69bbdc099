"""LossAware quantizer + LossAwareAdam: one training step against a hand-written numpy reference of
the paper's algorithm, the codebook rules, the missing-optimizer error, recurrent layers, larq."""

import itertools

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from syq_tf.optimizers import LossAwareAdam
from syq_tf.quantizers import LossAware
from syq_tf.quantizers.loss_aware import laq_levels

LR, B1, B2, EPS = 0.01, 0.9, 0.999, 1e-8


def _dense_model(quantizer, units=3, inputs=4, use_bias=False, name="fc"):
    layer = syq_tf.quantize(tf.keras.layers.Dense(units, use_bias=use_bias, name=name),
                            kernel_quantizer=quantizer)
    return tf.keras.Sequential([tf.keras.Input((inputs,)), layer])


def _grad_at(q_kernel, x, y):
    """dL/dQ of the mean squared error of x @ Q against y (independent of the model code)."""
    q = tf.Variable(q_kernel.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(tf.constant(x) @ q - y))
    return tape.gradient(loss, q).numpy().astype(np.float64)


def _adam_reference(w, g, m, v, t):
    """tf.keras Adam's update as written in tf_keras (eps outside the bias-corrected sqrt)."""
    m = m + (g - m) * (1 - B1)
    v = v + (g * g - v) * (1 - B2)
    step = LR * np.sqrt(1 - B2**t) / (1 - B1**t)
    w = w - m * step / (np.sqrt(v) + EPS)
    return w, m, v


def _brute_ternary(w, d):
    """min over alpha >= 0, b in {-1,0,1}^n of sum d (alpha b - w)^2 with b = sign(w) on a support."""
    best = (np.inf, 0.0)
    for support in itertools.product([0, 1], repeat=w.size):
        s = np.array(support, bool)
        if not s.any():
            continue
        alpha = np.sum(d[s] * np.abs(w[s])) / np.sum(d[s])
        q = np.where(s, alpha * np.sign(w), 0.0)
        err = np.sum(d * (q - w) ** 2)
        best = min(best, (err, alpha))
    return best[1]


def _lab(w, d):
    return np.sum(d * np.abs(w)) / np.sum(d)


def _lab_levels(w, alpha):
    return alpha * np.where(w >= 0, 1.0, -1.0)


def _lat_levels(w, alpha):
    return np.where(np.abs(w) > alpha / 2, alpha * np.sign(w), 0.0)


@pytest.mark.parametrize("mode", ["binary", "ternary_exact"])
def test_two_steps_follow_the_paper_algorithm(mode):
    """forward at the stored scale -> gradient at Q -> Adam -> clip -> d = sqrt(v_hat)+eps -> project."""
    project = _lab if mode == "binary" else (lambda w, d: _brute_ternary(w.ravel(), d.ravel()))
    levels = _lab_levels if mode == "binary" else _lat_levels
    rng = np.random.default_rng(0)
    model = _dense_model(LossAware(mode), units=2, inputs=3)
    w = rng.uniform(-0.9, 0.9, (3, 2)).astype(np.float32)
    w[0, 0] = 0.999
    model.layers[0].kernel.assign(w)
    model.compile(LossAwareAdam(LR, epsilon=EPS), "mse")
    q = model.layers[0].kernel_quantizer
    w = w.astype(np.float64)
    alpha = project(w, np.ones_like(w))  # first use: d = 1 (Adam's v is still 0)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    # Targets whose residual drives w[0, 0] up (dL/dQ[0, 0] < 0): Adam pushes it past 1 -> clip.
    # (Column 1 gets a residual too, so that no gradient is at float-noise level.)
    y = (x @ levels(w, alpha) + np.outer(x[:, 0], [5.0, 0.0]) + np.outer(x[:, 1], [0.0, 0.5]) -
         np.outer(x[:, 2], [0.0, 0.7])).astype(np.float32)
    m = v = np.zeros_like(w)
    for t in (1, 2):
        g = _grad_at(levels(w, alpha), x, y)
        model.train_on_batch(x, y)
        w, m, v = _adam_reference(w, g, m, v, t)
        if t == 1:
            assert w[0, 0] > 1.0
        w = np.clip(w, -1, 1)
        d = np.sqrt(v / (1 - B2**t)) + EPS
        alpha = project(w, d)
        assert not np.isclose(alpha, project(w, np.ones_like(w)), rtol=1e-4)  # d matters here
        np.testing.assert_allclose(model.layers[0].kernel.numpy(), w, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(q.alpha.numpy().ravel(), [alpha], rtol=2e-5)
        np.testing.assert_allclose(model.layers[0].quantized_kernel().numpy(), levels(w, alpha),
                                   rtol=2e-5, atol=1e-6)
    assert model.layers[0].kernel.numpy()[0, 0] == 1.0


def _fit_briefly(model, optimizer, epochs=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, model.input_shape[-1])).astype(np.float32)
    y = rng.normal(size=(64, model.output_shape[-1])).astype(np.float32)
    model.compile(optimizer, "mse")
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0)
    return x


def test_channel_granularity_projects_every_output_channel_with_its_own_curvature():
    model = _dense_model(LossAware("binary", granularity="channel"), units=5, inputs=6)
    opt = LossAwareAdam(LR)
    _fit_briefly(model, opt)
    layer = model.layers[0]
    w = layer.kernel.numpy().astype(np.float64)
    index = opt._index_dict[opt._var_key(layer.kernel)]
    v = opt._velocities[index].numpy().astype(np.float64)
    d = np.sqrt(v / (1 - B2 ** int(opt.iterations.numpy()))) + EPS
    alpha = layer.kernel_quantizer.alpha.numpy()
    assert alpha.shape == (1, 5)
    np.testing.assert_allclose(alpha[0], np.sum(d * np.abs(w), 0) / np.sum(d, 0), rtol=1e-5)
    assert not np.allclose(alpha[0], np.abs(w).mean(0), rtol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "log"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_laq_kernel_lies_on_its_levels(kind, bits):
    model = _dense_model(LossAware(kind, bits=bits), units=8, inputs=16)
    _fit_briefly(model, LossAwareAdam(LR))
    layer = model.layers[0]
    alpha = layer.kernel_quantizer.alpha.numpy().item()
    qk = layer.quantized_kernel().numpy()
    levels = laq_levels(bits, kind)
    signed = np.concatenate([-levels[1:], levels]) * alpha
    assert np.all(np.min(np.abs(qk.ravel()[:, None] - signed[None, :]), axis=1) <= 1e-6 * alpha)
    assert len(np.unique(qk)) <= 2**bits - 1
    # the forward assignment is the nearest level of w / alpha
    w = layer.kernel.numpy()
    nearest = signed[np.argmin(np.abs(w.ravel()[:, None] - signed[None, :]), axis=1)]
    np.testing.assert_allclose(qk.ravel(), nearest, atol=1e-6)
    assert layer.kernel_quantizer.precision == bits


def test_two_scale_ternary_stores_both_scales():
    model = _dense_model(LossAware("ternary_two_scale"), units=8, inputs=16)
    _fit_briefly(model, LossAwareAdam(LR))
    q = model.layers[0].kernel_quantizer
    a_pos, a_neg = q.alpha.numpy().item(), q.alpha_neg.numpy().item()
    assert a_pos > 0 and a_neg > 0 and a_pos != a_neg
    values = model.layers[0].quantized_kernel().numpy().ravel()
    allowed = np.array([0.0, a_pos, -a_neg])
    assert np.all(np.min(np.abs(values[:, None] - allowed[None, :]), axis=1) <= 1e-7)
    assert np.any(values > 0) and np.any(values < 0)


def test_training_without_the_loss_aware_optimizer_fails_naming_the_quantizer():
    model = _dense_model(LossAware("binary"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="fc_kernel_quantizer.*LossAwareAdam"):
        _fit_briefly(model, tf.keras.optimizers.Adam(LR))
    # inference needs no optimizer
    assert model(np.ones((1, 4), np.float32)).shape == (1, 3)


def test_without_the_optimizer_under_xla_the_gradient_is_nan_not_silently_wrong():
    model = _dense_model(LossAware("binary"))
    model.compile(tf.keras.optimizers.Adam(LR), "mse", jit_compile=True)  # XLA drops the Assert
    x = np.ones((8, 4), np.float32)
    model.fit(x, np.zeros((8, 3), np.float32), epochs=1, verbose=0)
    assert np.all(np.isnan(model.layers[0].kernel.numpy()))


def test_constant_curvature_is_the_unweighted_projection_with_any_optimizer():
    model = _dense_model(LossAware("binary", curvature="constant"))
    layer = model.layers[0]
    w0 = layer.kernel.numpy()
    _fit_briefly(model, tf.keras.optimizers.Adam(0.01))
    w = layer.kernel.numpy()
    assert not np.allclose(w, w0)
    assert layer.kernel_quantizer.weights == []
    np.testing.assert_allclose(layer.quantized_kernel().numpy(), np.abs(w).mean() * np.where(w >= 0, 1, -1),
                               rtol=1e-6)
    layer.kernel.assign(3.0 * w0)  # weights beyond [-1, 1] ...
    assert np.abs(3.0 * w0).max() > 1.1
    model.compile(LossAwareAdam(0.01), "mse")
    model.train_on_batch(np.ones((2, 4), np.float32), np.zeros((2, 3), np.float32))
    assert np.abs(layer.kernel.numpy()).max() == 1.0  # ... are clipped by LossAwareAdam


def test_approximate_ternary_warm_starts_from_the_previous_support():
    q = LossAware("ternary", iterations=1)
    w = tf.constant([[0.9, 0.5, 0.3, 0.05]])
    q.build(w.shape)
    q.set_scales((tf.constant([[0.9]]),))  # previous support: only |w| > 0.45 -> {0.9, 0.5}
    (alpha,) = q.project(w, previous=w)
    # one iteration from {0.9, 0.5}: alpha = mean(0.9, 0.5) = 0.7, support {|w| > 0.35} -> alpha of it
    np.testing.assert_allclose(alpha.numpy().ravel(), [0.7], rtol=1e-6)
    # cold start from w != 0: alpha = mean of all = 0.4375, one step -> support {|w| > 0.21875}
    (cold,) = q.project(w)
    np.testing.assert_allclose(cold.numpy().ravel(), [(0.9 + 0.5 + 0.3) / 3], rtol=1e-6)


@pytest.mark.parametrize("cls", [tf.keras.layers.LSTM, tf.keras.layers.GRU])
def test_recurrent_layers_quantize_both_kernels_and_compute_with_them(cls):
    layer = syq_tf.quantize(cls, kernel_quantizer=LossAware("linear", bits=3))(6, return_sequences=True,
                                                                                name="rnn")
    model = tf.keras.Sequential([tf.keras.Input((5, 4)), layer])
    xs = np.random.default_rng(1).normal(size=(8, 5, 4)).astype(np.float32)
    model.compile(LossAwareAdam(LR), "mse")
    model.fit(xs, np.zeros((8, 5, 6), np.float32), epochs=2, verbose=0)
    kernels = layer.float_kernels()
    assert set(kernels) == {"kernel", "recurrent_kernel"}
    k_q, r_q = layer.kernel_quantizer, layer.recurrent_quantizer
    assert k_q is not r_q and isinstance(r_q, LossAware) and r_q.bits == 3
    for name, q in (("kernel", k_q), ("recurrent_kernel", r_q)):
        levels = layer.quantized_kernel(name).numpy() / q.alpha.numpy()
        assert set(np.round(levels.ravel() * 3, 4)) <= {-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0}
    # same output as the stock layer holding the quantized kernels
    stock = cls(6, return_sequences=True)
    stock_model = tf.keras.Sequential([tf.keras.Input((5, 4)), stock])
    stock.cell.kernel.assign(layer.quantized_kernel("kernel"))
    stock.cell.recurrent_kernel.assign(layer.quantized_kernel("recurrent_kernel"))
    stock.cell.bias.assign(layer.cell.bias)
    np.testing.assert_allclose(model(xs).numpy(), stock_model(xs).numpy(), rtol=1e-5, atol=1e-6)


def test_recurrent_quantizer_can_differ_and_is_rejected_for_dense():
    layer = syq_tf.quantize(tf.keras.layers.LSTM(4, name="l"), kernel_quantizer=LossAware("binary"),
                            recurrent_quantizer=LossAware("ternary_exact"))
    assert layer.recurrent_quantizer.mode == "ternary_exact" and layer.kernel_quantizer.mode == "binary"
    with pytest.raises(ValueError, match="recurrent_quantizer is for recurrent layers.*Dense"):
        syq_tf.quantize(tf.keras.layers.Dense(3), kernel_quantizer=LossAware(), recurrent_quantizer=LossAware())


def test_larq_layer_kernel_is_projected_by_the_optimizer():
    layer = lq.layers.QuantDense(3, kernel_quantizer=LossAware("binary"), use_bias=False, name="lq")
    model = tf.keras.Sequential([tf.keras.Input((4,)), layer])
    opt = LossAwareAdam(LR)
    _fit_briefly(model, opt)
    assert opt.loss_aware_quantizers == [layer.kernel_quantizer]
    w = layer.kernel.latent_variable.numpy().astype(np.float64)
    v = opt._velocities[0].numpy().astype(np.float64)
    d = np.sqrt(v / (1 - B2 ** int(opt.iterations.numpy()))) + EPS
    np.testing.assert_allclose(layer.kernel_quantizer.alpha.numpy().item(), _lab(w, d), rtol=1e-5)


def test_config_round_trip_and_bad_arguments():
    q = LossAware("log", bits=4, granularity="channel", iterations=5, name="q")
    again = LossAware.from_config(q.get_config())
    assert again.get_config() == q.get_config()
    assert tf.keras.utils.get_registered_object("syq_tf>LossAware") is LossAware
    opt = LossAwareAdam(0.01, clip=0.5)
    assert LossAwareAdam.from_config(opt.get_config()).clip == 0.5
    with pytest.raises(ValueError, match="unknown mode 'quaternary'"):
        LossAware("quaternary")
    with pytest.raises(ValueError, match="'linear'.*needs bits"):
        LossAware("linear")
    with pytest.raises(ValueError, match="bits=9 must be an integer in 2..8"):
        LossAware("log", bits=9)
    with pytest.raises(ValueError, match="fixed bit width"):
        LossAware("binary", bits=3)
    with pytest.raises(ValueError, match="granularity 'pixel'"):
        LossAware("binary", granularity="pixel")
    with pytest.raises(ValueError, match="curvature='adam'"):
        LossAware("binary", curvature="adam")
    with pytest.raises(ValueError, match="clip=0 must be"):
        LossAwareAdam(clip=0)
    for kwargs, message in (
            (dict(learning_rate=-1e-3), "learning_rate=-0.001 must be a finite number >= 0, a LearningRateSchedule"),
            (dict(learning_rate=np.float32("nan")), "learning_rate=nan must be a finite number >= 0"),
            (dict(learning_rate="1e-3"), "learning_rate='1e-3' must be a finite number >= 0"),
            (dict(beta_1=1.0), r"beta_1=1.0 must be a number in \[0, 1\) \(an exponential decay rate\)"),
            (dict(beta_2=-0.5), r"beta_2=-0.5 must be a number in \[0, 1\)"),
            (dict(epsilon=0.0), r"epsilon=0.0 must be a finite number > 0 \(the curvature d = sqrt\(v\) \+ eps")):
        with pytest.raises(ValueError, match="^LossAwareAdam: " + message):
            LossAwareAdam(**kwargs)
    schedule = tf.keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)  # Keras's to check, accepted
    assert LossAwareAdam(schedule).get_config()["learning_rate"]["class_name"] == "ExponentialDecay"
    assert float(LossAwareAdam(0.0).learning_rate) == 0.0  # a frozen step is allowed, as in Adam
    layer = syq_tf.quantize(tf.keras.layers.Dense(3, name="fc"), kernel_quantizer=LossAware())
    layer.build((None, 4))
    with pytest.raises(ValueError, match="built for a kernel of shape"):
        layer.kernel_quantizer(tf.zeros((5, 3)))
