import numpy as np
import pytest
import tensorflow as tf

from syq_tf.quantizers import DoReFa


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_values_and_straight_through_gradient(bits):
    x = tf.constant([-0.5, 0.0, 0.1, 0.26, 0.5, 0.74, 0.99, 1.0, 1.7])
    n = 2**bits - 1
    q = DoReFa(bits)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = q(x)
    grad = tape.gradient(y, x).numpy()
    ref = np.floor(np.clip(x.numpy(), 0, 1) * n + 0.5) / n
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6)
    np.testing.assert_array_equal(grad, [0, 1, 1, 1, 1, 1, 1, 1, 0])
    assert len(np.unique(q(tf.linspace(-1.0, 2.0, 1001)).numpy())) == n + 1
    assert q.precision == bits


def test_two_bit_levels_hand_derived():
    # n = 3: levels 0, 1/3, 2/3, 1; 0.5 -> round(1.5) = 2 (half-up) -> 2/3
    y = DoReFa(2)(tf.constant([0.1, 0.2, 0.5, 0.9]))
    np.testing.assert_allclose(y.numpy(), [0.0, 1 / 3, 2 / 3, 1.0], rtol=1e-6)


@pytest.mark.parametrize("bits", [0, 9, 2.5, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="allowed: integers 1 to 8"):
        DoReFa(bits)
