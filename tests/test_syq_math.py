"""SYQ forward values and gradients against hand-derived and independent numpy references."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from syq_tf.quantizers import SYQ, syq_quantize


def subgroup_index(shape, granularity, depthwise=False):
    """Independent statement of the subgroups: for every weight position, the key of its scale."""
    def key(pos):
        if granularity == "layer":
            return ()
        if granularity == "pixel":
            return tuple(pos[:-2])
        if granularity == "row":
            return (pos[0],)
        if granularity == "channel":
            return tuple(pos[-2:]) if depthwise else (pos[-1],)
    return {pos: key(pos) for pos in itertools.product(*[range(d) for d in shape])}


def reference(w, g, granularity, bits, eta_ratio, depthwise=False):
    """Element-by-element SYQ of METHODS.md §1 in numpy: (init alphas, Q, dL/dw, dL/dalpha)."""
    groups = subgroup_index(w.shape, granularity, depthwise)
    members = {}
    for pos, k in groups.items():
        members.setdefault(k, []).append(pos)
    alpha = {k: np.mean([abs(w[p]) for p in ps]) for k, ps in members.items()}
    eta = eta_ratio * np.abs(w).max()
    q = np.zeros_like(w)
    gw = np.zeros_like(w)
    ga = {k: 0.0 for k in members}
    for pos, k in groups.items():
        s = 1.0 if w[pos] >= 0 else -1.0
        above = bits == 1 or abs(w[pos]) > eta
        q[pos] = alpha[k] * s if above else 0.0
        gw[pos] = alpha[k] * g[pos] if above else g[pos]
        if above:
            ga[k] += s * g[pos]
    return alpha, q, gw, ga


CASES = [
    ((3, 3, 4, 5), "layer"), ((3, 3, 4, 5), "row"), ((3, 3, 4, 5), "pixel"), ((3, 3, 4, 5), "channel"),
    ((6, 7), "layer"), ((6, 7), "channel"), ((5, 3, 4), "pixel"),
]


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("shape,granularity", CASES)
def test_forward_and_gradients_match_reference(shape, granularity, bits):
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.1, shape).astype(np.float32)
    w.flat[0] = 0.0  # sign(0) := +1
    g = rng.normal(0, 1, shape).astype(np.float32)
    q = SYQ(bits=bits, granularity=granularity, eta=0.3)
    wv = tf.Variable(w)
    with tf.GradientTape() as tape:
        out = q(wv)
        loss = tf.reduce_sum(out * g)
    grad_w, grad_alpha = tape.gradient(loss, [wv, q.alpha])

    alpha_ref, q_ref, gw_ref, ga_ref = reference(w, g, granularity, bits, 0.3)
    alpha = q.alpha.numpy()
    for k, a in alpha_ref.items():
        idx = _alpha_index(alpha.shape, shape, granularity, k)
        np.testing.assert_allclose(alpha[idx], a, rtol=1e-6)
        np.testing.assert_allclose(grad_alpha.numpy()[idx], ga_ref[k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.numpy(), q_ref, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grad_w.numpy(), gw_ref, rtol=1e-6, atol=1e-7)
    # w == 0: binary gives +alpha (sign(0) := +1); ternary zeroes it (0 is under the threshold)
    expected_zero = alpha.ravel()[0] if bits == 1 else 0.0
    assert out.numpy().flat[0] == pytest.approx(expected_zero)


def _alpha_index(alpha_shape, shape, granularity, key):
    idx = [0] * len(shape)
    if granularity == "pixel":
        idx[: len(key)] = key
    elif granularity == "row":
        idx[0] = key[0]
    elif granularity == "channel":
        idx[-1] = key[-1]
    return tuple(idx)


def test_hand_derived_dense_example():
    # w = [[0.5, -0.02], [-0.3, 0.01]], eta = 0.05 * 0.5 = 0.025, alpha = mean|w| = 0.2075
    w = tf.Variable([[0.5, -0.02], [-0.3, 0.01]])
    g = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    for bits, q_ref, ga_ref, gw_ref in [
        (2, [[0.2075, 0.0], [-0.2075, 0.0]], 1.0 - 3.0, [[0.2075, 2.0], [0.6225, 4.0]]),
        (1, [[0.2075, -0.2075], [-0.2075, 0.2075]], 1.0 - 2.0 - 3.0 + 4.0,
         [[0.2075, 0.415], [0.6225, 0.83]]),
    ]:
        q = SYQ(bits=bits, granularity="layer", eta=0.05)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(q(w) * g)
            out = q(w)
        gw, ga = tape.gradient(loss, [w, q.alpha])
        np.testing.assert_allclose(out.numpy(), q_ref, rtol=1e-6)
        np.testing.assert_allclose(ga.numpy().ravel(), [ga_ref], rtol=1e-6)
        np.testing.assert_allclose(gw.numpy(), gw_ref, rtol=1e-6)


def test_depthwise_channel_has_one_alpha_per_input_channel_and_multiplier():
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 2)).astype(np.float32)
    q = SYQ(bits=2, granularity="channel", depthwise=True)
    q(tf.constant(w))
    assert q.alpha.shape == (1, 1, 4, 2)
    np.testing.assert_allclose(q.alpha.numpy()[0, 0], np.abs(w).mean(axis=(0, 1)), rtol=1e-6)


def test_scale_counts_per_granularity():
    shape = (3, 5, 4, 6)
    expected = {"layer": 1, "row": 3, "pixel": 15, "channel": 6}
    for granularity, n in expected.items():
        q = SYQ(2, granularity)
        q(tf.zeros(shape) + 0.1)
        assert int(np.prod(q.alpha.shape)) == n, granularity


def test_lazy_init_in_graph_mode_and_reinitialize():
    w = tf.Variable(np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32))
    q = SYQ(2, "channel")

    @tf.function
    def run():
        return q(w)

    run()
    np.testing.assert_allclose(q.alpha.numpy().ravel(), np.abs(w.numpy()).mean(0), rtol=1e-6)
    assert bool(q.alpha_initialized.numpy())
    q.alpha.assign(q.alpha * 3)
    run()  # already initialised: no reset
    np.testing.assert_allclose(q.alpha.numpy().ravel(), 3 * np.abs(w.numpy()).mean(0), rtol=1e-6)
    w.assign(w * 2)
    q.initialize_from(w)
    np.testing.assert_allclose(q.alpha.numpy().ravel(), np.abs(w.numpy()).mean(0), rtol=1e-6)


def test_all_zero_kernel_gets_finite_scale():
    q = SYQ(1, "layer")
    out = q(tf.zeros((3, 3)))
    assert np.all(np.isfinite(out.numpy())) and q.alpha.numpy().ravel()[0] == 1.0


def test_pure_function_matches_layer():
    w = tf.constant(np.random.default_rng(2).normal(size=(3, 3, 2, 4)).astype(np.float32))
    alpha = tf.constant(np.full((3, 3, 1, 1), 0.7, np.float32))
    out = syq_quantize(w, alpha, 0.05, True, (2, 3))
    eta = 0.05 * np.abs(w.numpy()).max()
    ref = np.where(np.abs(w.numpy()) > eta, 0.7 * np.where(w.numpy() >= 0, 1, -1), 0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 3}, r"bits=3 .*allowed: 1 \(binary\) or 2 \(ternary\)"),
    ({"bits": 0}, "bits=0"),
    ({"granularity": "kernel"}, r"unknown granularity 'kernel'.*'layer', 'row', 'pixel', 'channel'"),
    ({"eta": 1.0}, r"eta=1.0 must be a number in \[0, 1\)"),
    ({"eta": -0.1}, r"eta=-0.1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SYQ(**kwargs)


def test_granularity_that_does_not_fit_rank():
    with pytest.raises(ValueError, match="granularity 'pixel' needs a convolution kernel"):
        SYQ(2, "pixel")(tf.zeros((4, 3)))
    with pytest.raises(ValueError, match="granularity 'row' needs a 2-D convolution kernel"):
        SYQ(2, "row")(tf.zeros((3, 4, 3)))


def test_quantizer_reused_on_other_shape_is_an_error():
    q = SYQ(2, "layer", name="shared")
    q(tf.ones((3, 3, 2, 2)))
    with pytest.raises(ValueError, match="'shared' was built for a kernel of shape"):
        q(tf.ones((3, 3, 2, 4)))


def test_used_on_activations_is_an_error():
    inp = tf.keras.Input((4,))
    with pytest.raises(ValueError, match="Use it as kernel_quantizer, not as input_quantizer"):
        SYQ(2)(inp)
