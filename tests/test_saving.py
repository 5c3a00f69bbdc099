"""Save/load round trips keep alphas, config and outputs; loading needs only `import syq_tf`."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import run_python, separable_data
from syq_tf.quantizers import SYQ, DoReFa


def make_model():
    inp = tf.keras.Input((8, 8, 1))
    x = syq_tf.quantize(tf.keras.layers.Conv2D(4, 3, name="conv"),
                        kernel_quantizer=SYQ(2, "pixel", eta=0.1), input_quantizer=DoReFa(6))(inp)
    x = syq_tf.quantize(tf.keras.layers.DepthwiseConv2D(3, name="dw"), kernel_quantizer=SYQ(1, "channel"))(x)
    x = tf.keras.layers.BatchNormalization()(x)
    x = lq.layers.QuantConv2D(4, 1, kernel_quantizer=SYQ(2, "row"), input_quantizer=DoReFa(8), name="lq")(x)
    x = tf.keras.layers.Flatten()(x)
    out = syq_tf.quantize(tf.keras.layers.Dense, kernel_quantizer=SYQ(2, "channel"))(4, name="head")(x)
    model = tf.keras.Model(inp, out)
    model.compile(tf.keras.optimizers.Adam(1e-2),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = separable_data(64)
    model.fit(x, y, epochs=2, verbose=0)
    return model, x


def _alphas(model):
    return {layer.name: q.alpha.numpy() for layer, q, _ in syq_tf.quantized_kernels(model)}


@pytest.mark.parametrize("fmt", ["h5", "tf"])
def test_round_trip(tmp_path, fmt):
    model, x = make_model()
    path = str(tmp_path / ("model.h5" if fmt == "h5" else "model_tf"))
    model.save(path, save_format=fmt)
    loaded = tf.keras.models.load_model(path)  # no custom_objects: registered by import syq_tf
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    before, after = _alphas(model), _alphas(loaded)
    assert before.keys() == after.keys() == {"conv", "dw", "lq", "head"}
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    cfg = loaded.get_layer("conv").kernel_quantizer.get_config()
    assert (cfg["bits"], cfg["granularity"], cfg["eta"]) == (2, "pixel", 0.1)
    assert loaded.get_layer("conv").input_quantizer.bits == 6
    assert loaded.get_layer("dw").kernel_quantizer.depthwise is True
    assert loaded.get_layer("lq").kernel_quantizer.granularity == "row"
    # loaded alphas are marked initialised: they are not reset from the weights on first use
    assert all(bool(q.alpha_initialized.numpy()) for _, q, _ in syq_tf.quantized_kernels(loaded))


def test_load_in_fresh_process_without_scope(tmp_path):
    model, x = make_model()
    path = str(tmp_path / "model.h5")
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    code = f"""
import syq_tf, numpy as np, tensorflow as tf
m = tf.keras.models.load_model({path!r})
y = m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0)
np.testing.assert_allclose(y, np.load({str(tmp_path / 'y.npy')!r}), rtol=1e-5, atol=1e-6)
print("OK")
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout


def make_uniq_model():
    from syq_tf.quantizers import UniQ, UniQActivation

    inp = tf.keras.Input((8, 8, 1))
    x = syq_tf.quantize(tf.keras.layers.Conv2D(4, 3, name="conv"), kernel_quantizer=UniQ(3, "channel"),
                        input_quantizer=UniQActivation(4))(inp)
    x = tf.keras.layers.ReLU()(x)
    x = lq.layers.QuantDepthwiseConv2D(3, depthwise_quantizer=UniQ(2, "layer"), input_quantizer=UniQActivation(2),
                                       name="dw")(x)
    x = tf.keras.layers.Flatten()(x)
    out = lq.layers.QuantDense(4, kernel_quantizer="uniq", input_quantizer="uniq_activation", name="head")(x)
    model = tf.keras.Model(inp, out)
    model.compile(tf.keras.optimizers.Adam(1e-2),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = separable_data(64)
    syq_tf.calibrate(model, x, batches=1)
    model.fit(x, y, epochs=2, verbose=0)
    return model, x


def _steps(model):
    out = {}
    for m in model.submodules:
        for v in getattr(m, "weights", []):
            if "delta" in v.name:
                out[v.name] = v.numpy()
    return out


@pytest.mark.parametrize("fmt", ["h5", "tf"])
def test_uniq_round_trip_keeps_steps_and_calibration(tmp_path, fmt):
    model, x = make_uniq_model()
    path = str(tmp_path / ("model.h5" if fmt == "h5" else "model_tf"))
    model.save(path, save_format=fmt)
    loaded = tf.keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    before, after = _steps(model), _steps(loaded)
    assert len(before) == 6 * 2 - 0 and before.keys() == after.keys()  # 3 weight + 3 activation, each delta + flag
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    assert loaded.get_layer("conv").input_quantizer.calibrated  # no recalibration needed after loading
    assert loaded.get_layer("conv").kernel_quantizer.get_config()["bits"] == 3


@pytest.mark.parametrize("fmt", ["h5", "tf"])
def test_least_squares_round_trip_keeps_moving_scalars(tmp_path, fmt):
    from syq_tf.quantizers import LeastSquares, LeastSquaresActivation

    inp = tf.keras.Input((8, 8, 1))
    x = syq_tf.quantize(tf.keras.layers.Conv2D(4, 3, name="conv"), kernel_quantizer=LeastSquares("ls2"),
                        input_quantizer=LeastSquaresActivation("gf2", momentum=0.9))(inp)
    x = tf.keras.layers.Flatten()(x)
    out = lq.layers.QuantDense(4, kernel_quantizer=LeastSquares("lsT", "layer"),
                               input_quantizer="least_squares_activation", name="head")(x)
    model = tf.keras.Model(inp, out)
    model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data, y = separable_data(64)
    model.fit(data, y, epochs=1, verbose=0)
    q = model.get_layer("conv").input_quantizer
    assert bool(q.moving_initialized.numpy()) and np.all(q.moving_scalars.numpy() > 0)
    path = str(tmp_path / ("model.h5" if fmt == "h5" else "model_tf"))
    model.save(path, save_format=fmt)
    loaded = tf.keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(data, verbose=0), model.predict(data, verbose=0), rtol=1e-5, atol=1e-6)
    lq2 = loaded.get_layer("conv").input_quantizer
    np.testing.assert_array_equal(lq2.moving_scalars.numpy(), q.moving_scalars.numpy())
    assert (lq2.mode, lq2.momentum) == ("gf2", 0.9)
    assert loaded.get_layer("head").kernel_quantizer.get_config()["mode"] == "lsT"
