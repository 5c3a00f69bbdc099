"""MaxAbsWeight (symmetric weights on max|W|) and MovingAverageActivation (a learned 8-bit range):
values against hand computation, the moving average, calibration, config round trips."""

import numpy as np
import pytest
import tensorflow as tf

from syq_tf.quantizers import MaxAbsWeight, MovingAverageActivation


def test_max_abs_weight_values_by_hand():
    # two output channels; bits=3 -> n = 3 levels per side, step = max|w| / 3
    w = np.array([[0.9, -0.2], [-0.45, 0.1], [0.15, 0.3]], np.float32)  # channel maxima 0.9 and 0.3
    q = MaxAbsWeight(3, "channel")
    out = q(tf.constant(w)).numpy()
    expected = np.array([[0.9, -0.2], [-0.6, 0.1], [0.3, 0.3]], np.float32)  # 0.45/0.3 = 1.5 -> 2 (half away)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    layer_wide = MaxAbsWeight(3, "layer")(tf.constant(w)).numpy()  # one step 0.3 for the whole kernel
    np.testing.assert_allclose(layer_wide, [[0.9, -0.3], [-0.6, 0.0], [0.3, 0.3]], rtol=1e-6, atol=1e-7)


def test_max_abs_weight_8_bit_levels_are_int8_and_gradient_passes_through():
    w = tf.constant(np.random.default_rng(0).normal(size=(3, 3, 4, 6)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(w)
        out = MaxAbsWeight(8, "channel")(w)
    k = out.numpy() / (np.max(np.abs(w.numpy()), axis=(0, 1, 2)) / 127)
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)  # integer multiples of the channel step
    assert np.max(np.abs(np.round(k))) == 127
    np.testing.assert_array_equal(tape.gradient(out, w).numpy(), np.ones(w.shape, np.float32))


def test_moving_average_range_updates_and_rounds():
    q = MovingAverageActivation(8, momentum=0.5)
    x1 = tf.constant([[0.5, 1.0, 2.0]])  # first batch: range [0, 2] (0 always inside)
    q(x1, training=True)
    assert (float(q.low.numpy()), float(q.high.numpy())) == (0.0, 2.0)
    q(tf.constant([[-1.0, 4.0]]), training=True)  # 0.5 * old + 0.5 * batch
    assert (float(q.low.numpy()), float(q.high.numpy())) == (-0.5, 3.0)
    out = q(tf.constant([[0.013, 10.0, -3.0]]), training=False).numpy()
    step = 3.5 / 255  # TensorFlow's FakeQuant on [-0.5, 3], nudged so that 0 is a level
    zero = round(0.5 / step)
    np.testing.assert_allclose(out, [[step * round(0.013 / step), (255 - zero) * step, -zero * step]], rtol=1e-5)
    assert q.export_range() == (-0.5, 3.0) and q.exact_in_int8()


def test_moving_average_needs_a_range_and_calibrates():
    q = MovingAverageActivation()
    with pytest.raises(tf.errors.InvalidArgumentError, match="no range yet"):
        q(tf.constant([[1.0]]), training=False)
    with pytest.raises(ValueError, match="no range yet; train the model before export"):
        q.export_range()
    q.start_calibration()
    q(tf.constant([[0.2, 1.5]]))
    q(tf.constant([[-0.25, 0.5]]))
    assert q.finish_calibration() == pytest.approx(1.75)
    assert q.export_range() == (-0.25, 1.5) and q.calibrated


@pytest.mark.parametrize("make", [lambda: MaxAbsWeight(4, "pixel"), lambda: MovingAverageActivation(6, momentum=0.9)])
def test_config_round_trip(make):
    q = make()
    again = type(q).from_config(q.get_config())
    assert again.get_config() == q.get_config()


def test_bad_arguments_name_the_allowed_values():
    with pytest.raises(ValueError, match="bits=9 is not supported; allowed: integers 2 to 8"):
        MaxAbsWeight(9)
    with pytest.raises(ValueError, match="unknown granularity 'row2'"):
        MaxAbsWeight(8, "row2")
    with pytest.raises(ValueError, match=r"momentum=1.0 must be a number in \[0, 1\)"):
        MovingAverageActivation(momentum=1.0)
