"""Numpy scalars are accepted wherever Python numbers are (and stored as Python numbers, so configs
stay JSON); bools, floats for integer arguments and non-finite values are refused; calibration data
holding NaN is refused instead of giving NaN steps."""

import json

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import separable_data

Q = syq_tf.quantizers


@pytest.mark.parametrize("make, key, expected", [
    (lambda: Q.SYQ(np.int64(2), eta=np.float32(0.25)), "eta", 0.25),
    (lambda: Q.SYQ(np.int32(1), "channel"), "bits", 1),
    (lambda: Q.DoReFa(np.int64(4)), "bits", 4),
    (lambda: Q.UniQ(np.uint8(3), "channel"), "bits", 3),
    (lambda: Q.UniQActivation(np.int16(4), initial_step=np.float64(0.5)), "initial_step", 0.5),
    (lambda: Q.LeastSquaresActivation("ls1", clip=np.float32(2.0), momentum=np.float16(0.5)), "momentum", 0.5),
    (lambda: Q.LossAware("linear", bits=np.int64(3)), "bits", 3),
])
def test_numpy_scalars_are_numbers(make, key, expected):
    config = make().get_config()
    assert config[key] == expected and type(config[key]) is type(expected)
    json.dumps(config)  # Python numbers, not numpy ones
    assert syq_tf.LossAwareAdam(clip=np.float32(0.5)).clip == 0.5


@pytest.mark.parametrize("make, message", [
    (lambda: Q.SYQ(True), "SYQ: bits=True is not supported; allowed: 1 (binary) or 2 (ternary)."),
    (lambda: Q.SYQ(2.0), "SYQ: bits=2.0 is not supported; allowed: 1 (binary) or 2 (ternary)."),
    (lambda: Q.SYQ(2, eta=np.float32("nan")), "SYQ: eta=nan must be a number in [0, 1)"),
    (lambda: Q.DoReFa(np.bool_(True)), "DoReFa: bits=True is not supported; allowed: integers 1 to 8."),
    (lambda: Q.UniQActivation(4, initial_step=np.float32("inf")),
     "UniQActivation: initial_step=inf must be a positive number or None."),
    (lambda: syq_tf.LossAwareAdam(clip=np.float64("nan")), "LossAwareAdam: clip=nan must be a finite number > 0"),
    (lambda: Q.LeastSquares("ls9"), "LeastSquares: unknown mode 'ls9'; allowed:"),
    (lambda: Q.LeastSquaresActivation("gf5", name="act"), "LeastSquaresActivation act: unknown mode 'gf5'"),
    (lambda: syq_tf.CheckFinite(every="2"), "CheckFinite: every='2' must be an integer >= 1 (batches)."),
    (lambda: syq_tf.QuantizerLogger("logs", every=2.5), "QuantizerLogger: every=2.5 must be an integer >= 1 (epochs)."),
])
def test_bools_floats_for_integers_and_non_finite_values_are_refused(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value).startswith(message), str(err.value)


def test_calibration_data_with_nan_is_refused():
    model = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.Flatten(),
                                 syq_tf.quantize(tf.keras.layers.Dense(4), input_quantizer=Q.UniQActivation(4))])
    x, _ = separable_data(16)
    x[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^syq_tf.calibrate: calibration batch 0 holds NaN or Inf values; the "
                                         r"activation steps would be NaN \(check the data\)$"):
        syq_tf.calibrate(model, x, batch_size=8)
    quantizer = syq_tf.calibration.calibratable_quantizers(model)[0]
    assert not quantizer.calibrated
    steps = syq_tf.calibrate(model, np.nan_to_num(x), batch_size=8)
    assert all(np.isfinite(v) and v > 0 for v in steps.values())


def test_model_helpers_name_themselves_for_a_non_model_and_for_examples_of_the_wrong_shape():
    model = tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.Flatten(),
                                 syq_tf.quantize(tf.keras.layers.Dense(4), input_quantizer=Q.UniQActivation(4))],
                                name="small")
    for helper, args in ((syq_tf.calibrate, (np.zeros((4, 8, 8, 1)),)), (syq_tf.fit_dorefa_ranges, (np.zeros(4),)),
                         (syq_tf.reinitialize_scales, ()), (syq_tf.summary, ())):
        with pytest.raises(TypeError, match=rf"^syq_tf.{helper.__name__}: expected a Keras 2 model"
                                            rf"( or layer)?, got str\.$"):
            helper("model.keras", *args)
    with pytest.raises(ValueError, match=r"^syq_tf.calibrate: data has examples of shape \(8, 8\); model 'small' "
                                         r"takes \(8, 8, 1\)\.$"):
        syq_tf.calibrate(model, np.zeros((4, 8, 8), np.float32))
    quantizer = syq_tf.calibration.calibratable_quantizers(model)[0]
    assert not quantizer.calibrated  # refused before any pass
    assert list(syq_tf.calibrate(model, np.ones((4, 8, 8, 1), np.float32)).values())[0] > 0
