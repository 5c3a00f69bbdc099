"""The Keras 3 frontend: quantized Keras 3 layers compute with their quantized kernels, train with
plain ``fit``, save to ``.keras`` and reload without custom objects, and export through the one
export pipeline; wrong inputs get one clear error."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, reloaded_in_a_fresh_process, run_python, separable_data

import keras
import syq_tf.keras3 as syq
from syq_tf.quantizers.syq import syq_initial_alpha

Q = syq.quantizers


def _reference(layer, x, *args):
    """The stock Keras 3 layer with the same weights, each kernel replaced by its quantized value and
    the input by the input quantizer's output: computed without syq_tf's layer code."""
    stock_class = [c for c in type(layer).__mro__ if c.__module__.startswith("keras.")][0]
    config = {k: v for k, v in layer.get_config().items()
              if k not in ("kernel_quantizer", "input_quantizer", "recurrent_quantizer", "depthwise_quantizer")}
    stock = stock_class.from_config({**config, "name": "reference"})
    stock(x, *args)
    quantized = {id(v): q(v) for q, v in (layer.float_kernels().values())}
    own = [w for w in layer.weights if not any(w is qw for q in (getattr(layer, a, None) for a in
           ("kernel_quantizer", "input_quantizer", "recurrent_quantizer", "depthwise_quantizer"))
           if q is not None for qw in q.weights)]
    assert len(own) == len(stock.weights)
    for src, dst in zip(own, stock.weights):
        dst.assign(quantized.get(id(src), src))
    inputs = layer.input_quantizer(x) if layer.input_quantizer is not None else x
    return np.asarray(stock(inputs, *args))


LAYERS = [
    (keras.layers.Dense, {"units": 5}, (4, 7), Q.SYQ(2, "channel")),
    (keras.layers.Conv1D, {"filters": 4, "kernel_size": 3}, (2, 9, 3), Q.UniQ(4, "channel")),
    (keras.layers.Conv2D, {"filters": 4, "kernel_size": 3}, (2, 6, 6, 3), Q.SYQ(2, "pixel")),
    (keras.layers.DepthwiseConv2D, {"kernel_size": 3}, (2, 6, 6, 3), Q.SYQ(1, "channel")),
    (keras.layers.SeparableConv2D, {"filters": 4, "kernel_size": 3}, (2, 6, 6, 3), Q.LossAware("ternary", curvature="constant")),
    (keras.layers.EinsumDense, {"equation": "abc,cd->abd", "output_shape": (None, 6), "bias_axes": "d"}, (2, 5, 3), Q.SYQ(2)),
    (keras.layers.Conv1DTranspose, {"filters": 4, "kernel_size": 3, "strides": 2}, (2, 5, 3), Q.SYQ(2, "channel")),
    (keras.layers.Conv2DTranspose, {"filters": 4, "kernel_size": 3, "strides": 2, "padding": "same"}, (2, 4, 4, 3),
     Q.LeastSquares("ls1", "channel")),
    (keras.layers.Conv3D, {"filters": 2, "kernel_size": 2}, (2, 3, 4, 4, 2), Q.SYQ(2, "channel")),
    (keras.layers.SimpleRNN, {"units": 4}, (2, 5, 3), Q.UniQ(2, "channel")),
    (keras.layers.LSTM, {"units": 4}, (2, 5, 3), Q.LeastSquares("ls2")),
    (keras.layers.GRU, {"units": 4}, (2, 5, 3), Q.SYQ(2, "channel")),
]


@pytest.mark.parametrize("cls,kwargs,shape,quantizer", LAYERS, ids=[c[0].__name__ for c in LAYERS])
def test_quantized_keras3_layer_computes_with_its_quantized_kernels(cls, kwargs, shape, quantizer):
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    layer = syq.quantize(cls(**kwargs), kernel_quantizer=quantizer, input_quantizer=Q.DoReFa(4))
    out = np.asarray(layer(x))
    kernels = layer.float_kernels()
    assert kernels and all(q is not None for q, _ in kernels.values())
    for q, variable in kernels.values():  # quantizing changes the kernel: a float call would differ
        assert np.max(np.abs(np.asarray(q(variable)) - variable.numpy())) > 1e-3
    np.testing.assert_allclose(out, _reference(layer, x), rtol=1e-5, atol=1e-6)


def test_syq_scale_starts_at_mean_abs_and_quantize_keeps_weights():
    dense = keras.layers.Dense(3)
    dense.build((None, 4))
    layer = syq.quantize(dense, kernel_quantizer=Q.SYQ(2, "channel"))
    np.testing.assert_array_equal(layer.float_kernels()["kernel"][1].numpy(), dense.kernel.numpy())
    layer(np.ones((1, 4), np.float32))
    alpha = layer.kernel_quantizer.alpha.numpy().ravel()
    np.testing.assert_allclose(alpha, np.mean(np.abs(dense.kernel.numpy()), axis=0), rtol=1e-6)
    np.testing.assert_allclose(alpha, np.asarray(syq_initial_alpha(tf.constant(dense.kernel.numpy()), (0,))).ravel())


def test_multi_head_attention_quantizes_all_four_projections():
    x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
    mha = syq.quantize(keras.layers.MultiHeadAttention(2, 4), kernel_quantizer=Q.SYQ(1))
    mha(x, x)
    kernels = mha.float_kernels()
    assert sorted(kernels) == ["attention_output", "key", "query", "value"]
    for q, variable in kernels.values():
        assert len(np.unique(np.abs(np.asarray(q(variable))))) == 1  # binary, one scale per layer
    # the float projections are not also listed: 4 x (kernel, bias, alpha, alpha_initialized)
    assert len(mha.weights) == 16


def _cnn():
    inp = keras.Input((8, 8, 1))
    h = syq.quantize(keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                     kernel_quantizer=Q.SYQ(2, "channel"), input_quantizer=Q.DoReFa(8))(inp)
    h = keras.layers.MaxPooling2D()(h)
    h = syq.quantize(keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                     kernel_quantizer=Q.LossAware("ternary"), input_quantizer=Q.DoReFa(8))(h)
    h = keras.layers.Flatten()(h)
    out = syq.quantize(keras.layers.Dense(4), kernel_quantizer=Q.UniQ(4, "channel"),
                       input_quantizer=Q.UniQActivation(4))(h)
    return keras.Model(inp, out)


def test_fit_save_and_reload_in_a_fresh_process(tmp_path):
    x, y = separable_data(256)
    model = _cnn()
    assert syq.calibrate(model, x)  # UniQ's activation step from data
    model.compile(syq.LossAwareAdam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    before = model.evaluate(x, y, verbose=0)[0]
    history = model.fit(x, y, epochs=4, batch_size=32, verbose=0, callbacks=[syq.CheckFinite()])
    assert history.history["loss"][-1] < before
    quantizer = model.layers[3].kernel_quantizer  # LossAware: its scale set by the optimizer
    assert quantizer in model.optimizer.loss_aware_quantizers and float(quantizer.alpha.numpy().ravel()[0]) > 0
    assert reloaded_in_a_fresh_process(
        model, x[:16], tmp_path, "type(m.layers[1]).__name__, type(m.layers[1].kernel_quantizer).__name__",
        save=syq.save_model) == "QuantizedConv2D SYQ"


def test_summary_and_reinitialize_scales(capsys):
    model = _cnn()
    syq.calibrate(model, separable_data(32)[0])
    assert syq.reinitialize_scales(model) == ["conv2d", "conv2d_1", "dense"]  # SYQ, LossAware, UniQ
    syq.summary(model)
    out = capsys.readouterr().out
    assert "SYQ" in out and "UniQ" in out and "ternary" in out


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_export_from_keras3_is_exact_and_agrees(weights):
    x, y = separable_data(512)
    model = _cnn()
    syq.calibrate(model, x)
    model.compile(syq.LossAwareAdam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=6, batch_size=32, verbose=0)
    result = syq.export.to_tflite(model, x[:200], target="litert", weights=weights, verify_data=x, verify_labels=y)
    rows = {r.layer: r for r in result.layers}
    assert sorted(rows) == ["conv2d", "conv2d_1", "dense"]
    assert all(r.exact for r in rows.values()), [r for r in rows.values() if not r.exact]
    assert result.verification["top1_agreement"] >= 0.99
    if weights == "int4":
        assert result.verification["int4_equals_int8_twin_builtin"] is True


def test_quantize_model_report_and_exact_export():
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Rescaling(2.0, offset=-1.0)(inp)
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.SeparableConv2D(8, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(4)(h)
    model, report = syq.quantize_model(keras.Model(inp, out), "syq-w2a4", return_report=True)
    assert report["low_bit"] == ["conv2d_1", "separable_conv2d"]
    assert report["low_bit_activations"] == ["conv2d_1", "separable_conv2d"]  # after a ReLU
    assert report["eight_bit"] == ["conv2d", "dense"]
    assert report["normalization"] == ["batch_normalization", "batch_normalization_1"]
    assert report["passed_through"] == ["global_average_pooling2d", "re_lu", "re_lu_1", "rescaling"]
    assert isinstance(model.get_layer("conv2d").kernel_quantizer, Q.MaxAbsWeight)
    assert isinstance(model.get_layer("conv2d").input_quantizer, Q.MovingAverageActivation)
    assert isinstance(model.get_layer("conv2d_1").input_quantizer, Q.DoReFa)
    x, y = separable_data(512)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=4, batch_size=32, verbose=0)
    low, high = model.get_layer("conv2d").input_quantizer.export_range()
    assert low == pytest.approx(-1.0, abs=0.05) and high > 0.5  # the rescaled inputs' range, learned
    result = syq.export.to_tflite(model, x[:200], target="litert", verify_data=x, verify_labels=y)
    rows = {r.layer: r for r in result.layers}
    assert all(r.exact for r in rows.values()), [r for r in rows.values() if not r.exact]
    assert set(rows) == {"conv2d", "conv2d_1", "separable_conv2d/depthwise_kernel",
                         "separable_conv2d/pointwise_kernel", "dense"}
    assert result.verification["top1_agreement"] >= 0.98


def test_quantize_model_keeps_named_kernel_layers_at_8_bits():
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    h = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(h)
    h = keras.layers.Conv2D(8, 1, activation="relu", name="pw")(h)
    out = keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling2D(name="gap")(h))
    float_model = keras.Model(inp, out)
    model, report = syq.quantize_model(float_model, "syq-w2a4", eight_bit=["dw"], return_report=True)
    assert report["low_bit"] == ["pw"] and report["low_bit_activations"] == ["pw"]
    assert report["eight_bit"] == ["dw", "head", "stem"]
    dw = model.get_layer("dw")
    assert isinstance(dw.kernel_quantizer, Q.MaxAbsWeight) and dw.kernel_quantizer.bits == 8
    assert isinstance(dw.input_quantizer, Q.MovingAverageActivation)
    assert isinstance(model.get_layer("pw").kernel_quantizer, Q.SYQ)
    with pytest.raises(ValueError, match=r"eight_bit names layers the model does not have: \['nope'\]"):
        syq.quantize_model(float_model, "syq-w2a8", eight_bit=["nope"])
    with pytest.raises(ValueError, match=r"eight_bit names layers without a kernel to quantize: \['gap'\]"):
        syq.quantize_model(float_model, "syq-w2a8", eight_bit=["gap"])
    with pytest.raises(ValueError, match=r"layers \['dw'\] are in both keep_float and eight_bit"):
        syq.quantize_model(float_model, "syq-w2a8", eight_bit=["dw"], keep_float=["dw"])
    with pytest.raises(ValueError, match="eight_bit takes a list of layer names, not the string 'dw'"):
        syq.quantize_model(float_model, "syq-w2a8", eight_bit="dw")


def test_quantize_model_refuses_what_it_cannot_quantize():
    inp = keras.Input((4,))
    out = keras.layers.Dense(2)(keras.layers.PReLU()(keras.layers.Dense(3)(inp)))
    with pytest.raises(ValueError, match=r"'p_re_lu' \(PReLU\): syq_tf has no quantized form"):
        syq.quantize_model(keras.Model(inp, out), "syq-w2a8")
    with pytest.raises(ValueError, match="scheme 'syq-w3a8' has unsupported bit widths"):
        syq.quantize_model(keras.Model(inp, out), "syq-w3a8")


def test_model_helpers_refuse_a_keras2_model_and_examples_of_the_wrong_shape():
    import tf_keras  # the other Keras in this process: its model is no Keras 3 model

    other = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(2)])
    for helper in (syq.summary, syq.reinitialize_scales):
        with pytest.raises(TypeError, match=rf"^syq_tf.{helper.__name__}: expected a Keras 3 model, got "
                                            r"tf_keras\.src\.engine\.sequential\.Sequential\.$"):
            helper(other)
    with pytest.raises(ValueError, match=r"^syq_tf.calibrate: data has examples of shape \(3,\); model '.*' "
                                         r"takes \(8, 8, 1\)\.$"):
        syq.calibrate(_cnn(), np.zeros((4, 3), np.float32))


def test_keras2_only_parts_say_so_in_one_line():
    model = _cnn()
    syq.calibrate(model, np.zeros((4, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="target 'lce' is Keras 2 only"):
        syq.export.to_tflite(model, np.zeros((4, 8, 8, 1), np.float32), target="lce")
    r = run_python("import syq_tf.keras3 as syq, tf_keras\n"
                   "syq.quantize(tf_keras.layers.Dense(2), kernel_quantizer=syq.quantizers.SYQ())")
    assert r.returncode != 0
    assert "Dense comes from Keras 2 (module tf_keras" in r.stderr
    assert REPO  # the snippets run against this checkout


def test_quantizer_logger_reads_keras3_scales_and_adam_curvature(tmp_path):
    import glob  # noqa: PLC0415

    x, y = separable_data(64)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        syq.quantize(keras.layers.Conv2D(4, 3, name="conv"), kernel_quantizer=Q.SYQ(2, "channel")),
        keras.layers.Flatten(),
        syq.quantize(keras.layers.Dense(4, name="fc"), kernel_quantizer=Q.LossAware("ternary_exact")),
    ])
    optimizer = syq.LossAwareAdam(1e-2)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, verbose=0, callbacks=[syq.QuantizerLogger(str(tmp_path))])
    found = {}
    for path in glob.glob(f"{tmp_path}/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, tf.make_ndarray(value.tensor)))
    assert [step for step, _ in found["conv/kernel/alpha/3"]] == [1, 2]
    assert np.isclose(float(found["conv/kernel/alpha/3"][-1][1]),
                      model.get_layer("conv").kernel_quantizer.alpha.numpy().ravel()[3])
    # d = sqrt(v_hat) + eps from Keras 3's Adam slots, as LossAwareAdam's projection uses it
    kernel = model.get_layer("fc").float_kernels()["kernel"][1]
    v = optimizer._velocities[optimizer._get_variable_index(kernel)].numpy()
    d = np.sqrt(v / (1 - 0.999 ** int(optimizer.iterations.numpy()))) + 1e-8
    np.testing.assert_allclose(float(found["fc/kernel/curvature/mean"][-1][1]), d.mean(), rtol=1e-5)


def test_conv2d_transpose_scales_per_output_channel_and_exports_exactly():
    """Keras 3 Conv2DTranspose: SYQ 'channel' scales run along c_out (kernel axis -2, as under Keras
    2), and the TRANSPOSE_CONV weights of the litert and tflm files hold the codebook exactly."""
    x = np.random.default_rng(2).uniform(0, 1, (16, 6, 6, 2)).astype(np.float32)
    inputs = keras.Input((6, 6, 2))
    h = syq.quantize(keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv"),
                     kernel_quantizer=Q.SYQ(2, "channel"), input_quantizer=Q.DoReFa(8))(inputs)
    out = syq.quantize(keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same", name="up"),
                       kernel_quantizer=Q.SYQ(2, "channel"), input_quantizer=Q.DoReFa(8))(h)
    model = keras.Model(inputs, out)
    up = model.get_layer("up")
    q, kernel = up.float_kernels()["kernel"]
    assert up.kernel_quantizer.transposed
    levels = np.asarray(q(kernel))                       # (kh, kw, c_out, c_in)
    alpha = up.kernel_quantizer.alpha.numpy().ravel()
    assert alpha.shape == (3,)
    for o in range(3):  # ternary: 0 and one magnitude per output channel, the channel's own alpha
        np.testing.assert_allclose(np.unique(np.abs(levels[:, :, o, :])), [0.0, alpha[o]], rtol=1e-6)
    for target in ("litert", "tflm"):
        result = syq.export.to_tflite(model, x, target=target, verify_data=x)
        rows = {r.layer: r for r in result.layers}
        assert rows["up"].op == "TRANSPOSE_CONV" and rows["up"].exact, (target, rows["up"])
        assert result.verification["max_abs_diff"] < 0.02
    assert result.verification["tflm_equals_litert_ref"]


def test_embedding_looks_up_its_quantized_table():
    ids = np.array([[0, 3, 3, 7], [9, 1, 0, 2]], np.int32)
    layer = syq.quantize(keras.layers.Embedding(10, 6), kernel_quantizer=Q.SYQ(2, "channel"))
    out = np.asarray(layer(ids))
    q, table = list(layer.float_kernels().values())[0]
    levels = np.asarray(q(table))
    assert np.max(np.abs(levels - table.numpy())) > 1e-3 and len(np.unique(np.abs(levels))) <= 7
    np.testing.assert_array_equal(out, levels[ids])


def test_fit_dorefa_ranges_recovers_the_float_function():
    """A Keras 3 float model with ReLU outputs far above 1; the same model with DoReFa(8) inputs
    (float kernels, SYQ ternary in the Dense) computes it again once the ranges are fitted."""
    Q = syq.quantizers

    def build(quantized):
        def q(layer, kernel=None):
            if not quantized:
                return layer
            return syq.quantize(layer, kernel_quantizer=kernel, input_quantizer=Q.DoReFa(8))

        inp = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(6, 3, padding="same", name="c1")(inp)
        h = keras.layers.BatchNormalization(name="bn1")(h)
        if not quantized:
            h = keras.layers.ReLU()(h)
        h = keras.layers.MaxPooling2D(name="pool")(h)
        h = q(keras.layers.Conv2D(6, 3, padding="same", name="c2"))(h)
        h = keras.layers.BatchNormalization(name="bn2")(h)
        if not quantized:
            h = keras.layers.ReLU()(h)
        h = keras.layers.Flatten()(h)
        return keras.Model(inp, q(keras.layers.Dense(5, name="fc"), Q.SYQ(2, "channel"))(h))

    keras.utils.set_random_seed(0)
    reference_model = build(False)
    model = build(True)
    for bn in ("bn1", "bn2"):
        layer = reference_model.get_layer(bn)
        layer.set_weights([np.full(6, 3.0), np.full(6, 2.0), *layer.get_weights()[2:]])
    for layer in (reference_model.get_layer(n) for n in ("c1", "bn1", "c2", "bn2", "fc")):
        own = {v.name: v for v in model.get_layer(layer.name).weights}
        for v in layer.weights:
            own[v.name].assign(v)
    syq.reinitialize_scales(model)
    x = np.random.default_rng(0).uniform(0, 1, (32, 8, 8, 3)).astype(np.float32)
    # the float reference with the Dense kernel as SYQ stores it, scaled as fit_dorefa_ranges will
    before = model(x, training=False).numpy()
    scales = syq.fit_dorefa_ranges(model, x, batches=1, batch_statistics=False)
    assert set(scales) == {"c2", "fc"} and all(isinstance(s, float) and s > 2 for s in scales.values()), scales
    after = model(x, training=False).numpy()
    fc = model.get_layer("fc")
    kernel = fc.float_kernels()["kernel"][1]
    reference_model.get_layer("fc").kernel.assign(fc.kernel_quantizer(kernel) / scales["fc"])
    reference = reference_model(x, training=False).numpy()
    scale = np.abs(reference).max()
    assert np.abs(before - reference).max() / scale > 0.3
    assert np.abs(after - reference).max() / scale < 0.02


def test_fit_dorefa_ranges_through_quantize_model_relu6_and_output_ranges():
    """quantize_model's syq-w2a4 MobileNet chain (BatchNorm -> ReLU6 -> DoReFa input), one of them
    through the 8-bit output range quantize_model puts before an average pooling: every DoReFa
    range fitted, at most the cap; the output range divided with the tensor it ranges."""
    L = keras.layers

    def bn(name):
        return L.BatchNormalization(name=name, gamma_initializer=keras.initializers.Constant(3.0),
                                    beta_initializer=keras.initializers.Constant(2.0))

    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 3))
    h = L.ReLU(6.0, name="r0")(bn("bn0")(L.Conv2D(4, 3, padding="same", use_bias=False, name="c0")(inp)))
    h = L.ReLU(6.0, name="r1")(bn("bn1")(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw1")(h)))
    h = L.ReLU(6.0, name="r2")(bn("bn2")(L.Conv2D(6, 1, use_bias=False, name="pw2")(h)))
    h = L.Flatten(name="flat")(L.AveragePooling2D(8, name="pool")(h))
    model = keras.Model(inp, L.Dense(5, name="out")(L.Dense(7, name="fc")(h)))
    quantized, report = syq.quantize_model(model, scheme="syq-w2a4", return_report=True)
    assert report["low_bit_activations"] == ["dw1", "fc", "pw2"]
    assert "r2" in report["output_ranges"]
    x = np.random.default_rng(2).uniform(0, 1, (32, 8, 8, 3)).astype(np.float32)
    quantized(x, training=True)  # the output range takes its first batch's range
    out_range = quantized.get_layer("r2_output_range")
    high = float(out_range.high.numpy())
    scales = syq.fit_dorefa_ranges(quantized, x, batches=1)
    assert sorted(scales) == ["dw1", "fc", "pw2"]
    assert all(isinstance(s, float) and 1.0 < s <= 6.0 for s in scales.values()), scales
    np.testing.assert_allclose(out_range.high.numpy(), high / scales["fc"], rtol=1e-6)
