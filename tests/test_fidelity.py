"""The eight differences from the authors' code (issue 20, README "Fidelity"), each pinned with
hand-computed values: the default form, and the official form where an option gives it."""

import math

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from syq_tf.optimizers import LossAwareAdam
from syq_tf.quantizers import LeastSquares, LeastSquaresActivation, LossAware, UniQ, UniQActivation
from syq_tf.quantizers.least_squares import least_squares_ste
from syq_tf.quantizers.loss_aware import lat2_project, lat_approx_project, lat_exact_project
from syq_tf.quantizers.syq import syq_quantize
from syq_tf.quantizers.uniq import uniq_activation_quantize, uniq_initial_step, uniq_weight_quantize


def _grads(fn, *tensors, upstream):
    tensors = [tf.constant(t, tf.float32) for t in tensors]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        out = fn(*tensors)
    return out.numpy(), [g.numpy() for g in tape.gradient(out, tensors, output_gradients=tf.constant(upstream))]


# ---- 1. UniQ activation step gradient --------------------------------------------------------

@pytest.mark.parametrize("step_grad, n", [("per_example", 3), ("official", 6)])
def test_uniq_activation_step_gradient_scale(step_grad, n):
    # bits 2 (levels 0..3 delta), delta 1, batch 2 x 3 features
    a = np.array([[0.2, 1.7, 5.0], [-1.0, 2.4, 0.6]], np.float32)
    g = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    q, (ga, gd) = _grads(lambda a, d: uniq_activation_quantize(a, d, 2, step_grad), a, 1.0, upstream=g)
    np.testing.assert_array_equal(q, [[0, 2, 3], [0, 2, 1]])
    # dQ/ddelta: round(u) - u inside, 3 above, 0 below:  -0.2, 0.3, 3 | 0, -0.4, 0.4
    raw = 1 * -0.2 + 2 * 0.3 + 3 * 3 + 4 * 0 + 5 * -0.4 + 6 * 0.4
    assert gd == pytest.approx(raw / math.sqrt(n * 3), rel=1e-5)
    np.testing.assert_array_equal(ga, [[1, 2, 0], [0, 5, 6]])


def test_uniq_activation_step_grad_option_config_and_errors():
    q = UniQActivation(4, initial_step=0.5, step_grad="official", name="ua")
    again = UniQActivation.from_config(q.get_config())
    assert again.step_grad == "official" and again.get_config() == q.get_config()
    assert UniQActivation(4).step_grad == "per_example"
    with pytest.raises(ValueError, match="UniQActivation ua: step_grad='batch'; allowed: 'per_example'"):
        UniQActivation(4, step_grad="batch", name="ua")


def test_uniq_official_step_gradient_trains_inside_a_model():
    model = tf.keras.Sequential([tf.keras.Input((3,)), syq_tf.quantize(
        tf.keras.layers.Dense(2), input_quantizer=UniQActivation(2, initial_step=1.0, step_grad="official"))])
    x = np.array([[0.2, 1.7, 5.0], [-1.0, 2.4, 0.6]], np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x))
    delta = [v for v in model.trainable_variables if "delta" in v.name][0]
    kernel_rows = np.sum(model.layers[0].kernel.numpy(), axis=1)  # dL/dQ(a) = sum of kernel row
    g = np.tile(kernel_rows, (2, 1))
    dq = np.array([[-0.2, 0.3, 3.0], [0.0, -0.4, 0.4]])
    expected = np.sum(g * dq) / math.sqrt(6 * 3)
    assert tape.gradient(loss, delta).numpy() == pytest.approx(expected, rel=1e-5)


# ---- 2. UniQ weight step initialisation: unbiased std ---------------------------------------

def test_uniq_weight_step_starts_from_the_unbiased_std():
    w = tf.constant([[1.0], [2.0], [3.0], [4.0]])
    # mean 2.5, squared deviations 5 -> unbiased std sqrt(5/3), biased sqrt(5/4)
    # one step group, kept as [1, 1] (it broadcasts against w); .item(), not float(): numpy 2 (3.13)
    # deprecates converting an array of ndim > 0 to a scalar
    step = uniq_initial_step(w, 2, (0, 1)).numpy()
    assert step.shape == (1, 1) and step.item() == pytest.approx(0.99569 * math.sqrt(5 / 3), rel=1e-6)
    assert uniq_initial_step(w, 2, (0, 1), unbiased=False).numpy().item() == pytest.approx(
        0.99569 * math.sqrt(5 / 4), rel=1e-6)
    q = UniQ(2)
    q(w)
    assert np.asarray(q.delta.numpy()).item() == pytest.approx(0.99569 * math.sqrt(5 / 3), rel=1e-6)


# ---- 3. least-squares backward ------------------------------------------------------------------

@pytest.mark.parametrize("mode, x, total", [
    ("ls1", [[0.5, -2.0, 0.9, -0.2]], 0.9),          # v = mean|x| = 0.9
    ("ls2", [[0.5, -0.5, 1.5, -1.5]], 1.5),          # v1 = 1, v2 = 0.5: exact, v1 + v2 = 1.5
    ("lsT", [[0.0, 0.0, 1.5, -1.5]], 1.5),           # v = 0.75, levels {0, +-1.5}: 2v = 1.5
    ("gf2", [[0.5, -0.5, 1.5, -1.5]], 1.5),          # v1 = 1, residual +-0.5: v2 = 0.5
])
def test_least_squares_official_backward_scales_by_the_scalars_inside_unit_window(mode, x, total):
    g = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    inside = np.abs(np.array(x)) <= 1
    _, (gx,) = _grads(lambda t: least_squares_ste(t, mode, backward="official"), x, upstream=g)
    np.testing.assert_allclose(gx, np.where(inside, total * g, 0), rtol=1e-6)
    _, (gx,) = _grads(lambda t: least_squares_ste(t, mode), x, upstream=g)  # weights, default: identity
    np.testing.assert_array_equal(gx, g)
    # activations, default: identity inside [-c, c]
    _, (gx,) = _grads(lambda t: least_squares_ste(t, mode, clip=1.0), x, upstream=g)
    np.testing.assert_array_equal(gx, np.where(inside, g, 0))


def test_least_squares_backward_option_in_the_keras_quantizers():
    w = tf.constant([[0.5, 0.1], [-2.0, -0.1], [0.9, 0.3], [-0.2, -0.3]])  # [c_in=4, c_out=2]
    for quantizer, total in ((LeastSquares("ls1", backward="official"), np.array([0.9, 0.2])),
                             (LeastSquares("ls1"), None)):
        with tf.GradientTape() as tape:
            tape.watch(w)
            q = quantizer(w)
        gw = tape.gradient(q, w).numpy()
        expected = np.ones((4, 2)) if total is None else np.where(np.abs(w.numpy()) <= 1, total, 0)
        np.testing.assert_allclose(gw, expected, rtol=1e-6)
    act = LeastSquaresActivation("ls2", backward="official", name="la")
    again = LeastSquaresActivation.from_config(act.get_config())
    assert again.backward == "official" and again.get_config() == act.get_config()
    assert LeastSquares.from_config(LeastSquares("lsT", backward="official").get_config()).backward == "official"
    x = tf.constant([[0.5, -0.5, 1.5, -1.5]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = act(x)
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), [[1.5, 1.5, 0, 0]], rtol=1e-6)
    with pytest.raises(ValueError, match="LeastSquares: backward='paper'; allowed: 'ste'"):
        LeastSquares("ls1", backward="paper")
    with pytest.raises(ValueError, match="LeastSquaresActivation la: backward='x'"):
        LeastSquaresActivation("ls1", backward="x", name="la")


# ---- 4. ls2 / lsT: exact optimum, also on short rows ----------------------------------------------

def test_ls2_and_lst_find_the_optimum_on_a_four_element_row():
    # the official skip-3 search has no candidate on a row of 4; the exact search:
    # |x| = 0.1, 0.2, 1.0, 1.2 -> ls2 clusters {0.1, 0.2} {1.0, 1.2}: v1 = 0.625, v2 = 0.475
    x = tf.constant([[0.1, -0.2, 1.0, -1.2]])
    v = syq_tf.quantizers.least_squares.least_squares_scalars(x, "ls2").numpy()
    np.testing.assert_allclose(v, [[0.625, 0.475]], rtol=1e-6)
    # lsT: levels {0, 2v}; support {1.0, 1.2}: 2v = 1.1, error 0.01 + 0.04 + 0.01 + 0.01 = 0.07
    # (support {1.2} alone: 2v = 1.2, error 0.01 + 0.04 + 1.0 = 1.05; all four: 2v = 0.625, worse)
    v = syq_tf.quantizers.least_squares.least_squares_scalars(x, "lsT").numpy()
    np.testing.assert_allclose(v, [[0.55]], rtol=1e-6)


# ---- 5. SYQ edges ----------------------------------------------------------------------------------

def test_syq_binary_zero_weight_is_plus_alpha_with_scaled_gradient():
    w, g = np.array([0.0, 0.5, -0.5], np.float32), np.array([1.0, 2.0, 4.0], np.float32)
    q, (gw, ga) = _grads(lambda w, a: syq_quantize(w, a, ternary=False), w, 2.0, upstream=g)
    np.testing.assert_array_equal(q, [2.0, 2.0, -2.0])  # official: 0 at w = 0
    np.testing.assert_array_equal(gw, [2.0, 4.0, 8.0])  # official: g (unscaled) at w = 0
    assert ga == pytest.approx(1.0 + 2.0 - 4.0)  # official leaves w = 0 out: 2 - 4


def test_syq_ternary_weight_exactly_at_the_threshold_is_zero():
    w = np.array([1.0, 0.25, -0.25, 0.1], np.float32)  # eta = 0.25 * max|w| = 0.25 exactly
    g = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
    q, (gw, ga) = _grads(lambda w, a: syq_quantize(w, a, eta_ratio=0.25), w, 3.0, upstream=g)
    np.testing.assert_array_equal(q, [3.0, 0.0, 0.0, 0.0])  # official: +-1 (unscaled) at |w| == eta
    np.testing.assert_array_equal(gw, [3.0, 2.0, 4.0, 8.0])
    assert ga == pytest.approx(1.0)


def test_syq_binary_ignores_eta():
    w = np.array([[1.0], [0.01], [-0.02]], np.float32)  # official binary with eta > 0: +-1 below eta
    q = syq_tf.quantizers.SYQ(1, eta=0.05)
    q(tf.constant(w))
    q.alpha.assign(tf.reshape(tf.constant(0.5), q.alpha.shape))
    np.testing.assert_array_equal(q(tf.constant(w)).numpy(), [[0.5], [0.5], [-0.5]])


# ---- 6. UniQ ties ----------------------------------------------------------------------------------

def test_uniq_ties_round_half_up_and_zero_weight_is_plus_half_step():
    q = uniq_weight_quantize(tf.constant([0.0, 1.0, -1.0, 2.0]), tf.constant(1.0), 2)
    np.testing.assert_array_equal(q.numpy(), [0.5, 1.5, -1.5, 1.5])  # 0 -> +delta/2 (official: half-to-even)
    q = uniq_activation_quantize(tf.constant([0.5, 1.5, 2.5]), tf.constant(1.0), 2)
    np.testing.assert_array_equal(q.numpy(), [1.0, 2.0, 3.0])  # official (half-to-even): 0, 2, 2


# ---- 7. LossAwareAdam curvature --------------------------------------------------------------------

@pytest.mark.parametrize("curvature", ["bias_corrected", "raw"])
def test_loss_aware_adam_curvature_option(curvature):
    layer = syq_tf.quantize(tf.keras.layers.Dense(3, use_bias=False), kernel_quantizer=LossAware("binary"))
    model = tf.keras.Sequential([tf.keras.Input((4,)), layer])
    eps = 0.1  # comparable with sqrt(v): d's eps then changes alpha
    opt = LossAwareAdam(0.01, epsilon=eps, curvature=curvature)
    rng = np.random.default_rng(0)
    model.compile(opt, "mse")
    model.fit(rng.normal(size=(32, 4)), rng.normal(size=(32, 3)), batch_size=8, epochs=1, verbose=0)
    w = layer.kernel.numpy().astype(np.float64)
    v = opt._velocities[0].numpy().astype(np.float64)
    t = int(opt.iterations.numpy())

    def lab(d):
        return np.sum(d * np.abs(w)) / np.sum(d)

    raw, corrected = lab(np.sqrt(v) + eps), lab(np.sqrt(v / (1 - 0.999**t)) + eps)
    assert abs(raw - corrected) > 1e-4 * corrected
    expected = raw if curvature == "raw" else corrected
    assert layer.kernel_quantizer.alpha.numpy().item() == pytest.approx(expected, rel=1e-5)
    again = LossAwareAdam.from_config(opt.get_config())
    assert again.curvature == curvature
    with pytest.raises(ValueError, match="LossAwareAdam: curvature='v'; allowed: 'bias_corrected'"):
        LossAwareAdam(curvature="v")


# ---- 8. LAT ----------------------------------------------------------------------------------------

def test_lat_approximate_iterates_to_the_fixed_point():
    # support starts at w != 0: alpha 0.46 -> {|w| > 0.23} = {0.3, 0.6, 1.1}: alpha 2/3 ->
    # {|w| > 1/3} = {0.6, 1.1}: alpha 0.85 -> {|w| > 0.425}: fixed (official: stops when alpha moves
    # by less than 1e-6, the same here).
    w = tf.constant([[0.3, -0.6, 1.1, 0.1, -0.2, 0.0]])  # mean over w != 0: 2.3 / 5 = 0.46
    alpha, q, support = lat_approx_project(w, tf.ones_like(w))
    assert np.asarray(alpha).item() == pytest.approx(0.85)
    np.testing.assert_allclose(q.numpy(), [[0, -0.85, 0.85, 0, 0, 0]], rtol=1e-6)
    alpha, _, _ = lat_approx_project(w, tf.ones_like(w), iterations=1)  # one step: {0.3, 0.6, 1.1}
    assert np.asarray(alpha).item() == pytest.approx(2.0 / 3.0)


def test_lat_exact_keeps_every_weight_when_that_is_optimal():
    # official: only k < n and a fallback 0.7 mean|W| = 0.63; optimum keeps all: alpha 0.9
    alpha, q = lat_exact_project(tf.constant([[1.0, -0.9, 0.8]]), tf.ones((1, 3)))
    assert np.asarray(alpha).item() == pytest.approx(0.9)
    np.testing.assert_allclose(q.numpy(), [[0.9, -0.9, 0.9]], rtol=1e-6)


def test_lat_two_scale_starts_each_side_from_its_nonzero_weights():
    # zeros are in neither side's start (official: W >= 0 on the positive side): positive side
    # {0.8, 0.2}: alpha 0.5 -> {0.8} (0.2 < 0.25): alpha 0.8; negative side {0.4}: alpha 0.4.
    w = tf.constant([[0.8, 0.2, 0.0, 0.0, -0.4]])
    alpha_pos, alpha_neg, q = lat2_project(w, tf.ones_like(w), exact=False)
    assert np.asarray(alpha_pos).item() == pytest.approx(0.8) and np.asarray(alpha_neg).item() == pytest.approx(0.4)
    np.testing.assert_allclose(q.numpy(), [[0.8, 0, 0, 0, -0.4]], rtol=1e-6)


def _laq_reference(w, d, levels, alpha, iterations, tol):
    """The LAQ alternation in numpy: assign (nearest level, ties down), weighted LS scale; stop at a
    fixed point of the assignment, after ``iterations``, or (tol > 0) when alpha moves < tol."""
    mids = 0.5 * (levels[1:] + levels[:-1])
    level = None
    for _ in range(iterations):
        new_level = levels[np.searchsorted(mids, np.abs(w) / alpha, side="left")]
        new_alpha = np.sum(d * new_level * np.abs(w)) / np.sum(d * new_level**2)
        stop = level is not None and np.array_equal(new_level, level)
        stop = stop or (tol > 0 and abs(new_alpha - alpha) < tol)
        alpha, level = new_alpha, new_level
        if stop:
            break
    return alpha


def test_laq_tolerance_stops_the_alternation_like_the_authors_code():
    from syq_tf.quantizers.loss_aware import laq_levels, laq_project

    rng = np.random.default_rng(3)
    w, d = rng.normal(size=(1, 400)), rng.uniform(0.1, 2.0, (1, 400))
    levels = laq_levels(3)
    for tol in (0.0, 0.05):
        expected = _laq_reference(w[0], d[0], levels, np.max(np.abs(w)), 10, tol)
        alpha, _ = laq_project(tf.constant(w), tf.constant(d), 3, tol=tol)
        assert np.asarray(alpha).item() == pytest.approx(expected, rel=1e-12)
    fixed = _laq_reference(w[0], d[0], levels, np.max(np.abs(w)), 10, 0.0)
    early = _laq_reference(w[0], d[0], levels, np.max(np.abs(w)), 10, 0.05)
    assert fixed != early  # the tolerance did stop earlier here


def test_loss_aware_warm_projection_runs_warm_iterations_steps():
    from syq_tf.quantizers.loss_aware import laq_levels

    rng = np.random.default_rng(4)
    w = rng.uniform(-1, 1, (6, 5)).astype(np.float64)
    d = rng.uniform(0.5, 2.0, (6, 5))
    levels = laq_levels(3)
    for warm, steps in ((1, 1), (2, 2), (None, 10)):
        q = LossAware("linear", bits=3, warm_iterations=warm, tol=0.0, dtype="float64")
        q.build(w.shape)
        q.alpha.assign(tf.reshape(tf.constant(0.9, tf.float64), q.alpha.shape))
        (alpha,) = q.project(tf.constant(w), tf.constant(d), previous=True)
        expected = _laq_reference(w.ravel(), d.ravel(), levels, 0.9, steps, 0.0)
        assert np.asarray(alpha).item() == pytest.approx(expected, rel=1e-12)
    q = LossAware("ternary", tol=1e-5, warm_iterations=None, name="q")
    again = LossAware.from_config(q.get_config())
    assert again.tol == 1e-5 and again.warm_iterations is None and again.get_config() == q.get_config()
    assert LossAware("binary").warm_iterations is None and LossAware("binary").tol == 1e-6
    # default 'auto': one warm step for LAQ (measured: no accuracy lost, half the step time), the
    # authors' rule for the others (approximate LAT lost 1.8 points with one step)
    for mode, bits, warm in (("binary", None, None), ("ternary", None, None), ("ternary_two_scale", None, None),
                             ("ternary_exact", None, None), ("linear", 3, 1), ("log", 4, 1)):
        q = LossAware(mode, bits=bits)
        assert q.warm_iterations == warm, mode
        assert LossAware.from_config(q.get_config()).warm_iterations == warm  # stored resolved
    assert LossAware("linear", bits=3, warm_iterations=None).warm_iterations is None
    with pytest.raises(ValueError, match="LossAware: tol=-1 must be a finite number >= 0"):
        LossAware("ternary", tol=-1)
    for bad in (0, 2.0, True, "fast"):
        with pytest.raises(ValueError, match=r"LossAware: warm_iterations=.*; allowed: 'auto' \(1 for LAQ, None "
                                             r"otherwise\), None .* or an integer >= 1"):
            LossAware("ternary", warm_iterations=bad)


@pytest.mark.parametrize("mode, bits", [("ternary", None), ("ternary_two_scale", None), ("linear", 3), ("log", 3)])
def test_compiled_loss_aware_paths_equal_the_unfused_ones(mode, bits, monkeypatch):
    """Large kernels use XLA-compiled level rules and projections (XLA_MIN_SIZE); the same values."""
    from syq_tf.quantizers import loss_aware

    rng = np.random.default_rng(5)
    w = tf.constant(rng.uniform(-1, 1, (8, 6)).astype(np.float32))
    d = tf.constant(rng.uniform(0.5, 2.0, (8, 6)).astype(np.float32))
    results = []
    for size in (10**9, 0):  # unfused, then compiled
        monkeypatch.setattr(loss_aware, "XLA_MIN_SIZE", size)
        q = LossAware(mode, bits=bits, tol=0.0, warm_iterations=None)
        q.build(w.shape)
        q.set_scales(q.project(w))
        with tf.GradientTape() as tape:  # a tape around the compiled forward must not fail
            tape.watch(w)
            out = q._levels(w)
        scales = q.project(w * 1.01, d, previous=w)
        results.append([out.numpy()] + [s.numpy() for s in scales])
    for unfused, compiled in zip(*results):
        np.testing.assert_allclose(compiled, unfused, rtol=1e-6, atol=1e-7)
