"""syq_tf.quantize (class, decorator, instance) and larq layers with syq_tf quantizers."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import separable_data
from syq_tf.quantizers import SYQ, DoReFa

STOCK = [
    (tf.keras.layers.Conv2D, dict(filters=6, kernel_size=3), (2, 7, 7, 3), "kernel"),
    (tf.keras.layers.DepthwiseConv2D, dict(kernel_size=3, depth_multiplier=2), (2, 7, 7, 3), "depthwise_kernel"),
    (tf.keras.layers.Dense, dict(units=5), (2, 9), "kernel"),
]


def _plain_output(layer, x, kernel_attr, quantized_kernel, input_q=None):
    """The stock layer's result computed with the given kernel (independent of the wrapper)."""
    cfg = {k: v for k, v in layer.get_config().items() if k not in ("kernel_quantizer", "input_quantizer")}
    stock = next(c for c in type(layer).__mro__ if not issubclass(c, syq_tf.layers.QuantizedLayerMixin))
    plain = stock.from_config({**cfg, "name": "plain"})
    plain.build(x.shape)
    weights = {w.name.split("/")[-1]: w.numpy() for w in layer.weights}
    weights[f"{kernel_attr}:0"] = quantized_kernel
    plain.set_weights([weights[w.name.split("/")[-1]] for w in plain.weights])
    return plain(input_q(x) if input_q else x)


@pytest.mark.parametrize("cls,kwargs,in_shape,attr", STOCK)
@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_quantized_class_computes_with_quantized_kernel(cls, kwargs, in_shape, attr, granularity):
    x = tf.random.uniform(in_shape, -0.5, 1.5)
    Quantized = syq_tf.quantize(cls, kernel_quantizer=SYQ(2, granularity), input_quantizer=DoReFa(4))
    layer = Quantized(**kwargs)
    y = layer(x)
    float_kernel = getattr(layer, attr).numpy()
    qk = layer.quantized_kernel().numpy()
    # the kernel is the ternary codebook of the float kernel, per subgroup
    eta = 0.05 * np.abs(float_kernel).max()
    assert np.all((qk == 0) == (np.abs(float_kernel) <= eta))
    ref = _plain_output(layer, x, attr, qk, DoReFa(4))
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    if cls is tf.keras.layers.DepthwiseConv2D and granularity == "channel":
        assert layer.kernel_quantizer.alpha.shape == (1, 1, 3, 2)  # one per output channel
    assert isinstance(getattr(layer, attr), tf.Variable)  # the float kernel stays the variable


def test_quantize_instance_keeps_config_and_weights():
    base = tf.keras.layers.Conv2D(4, 3, padding="same", name="c")
    x = tf.random.uniform((1, 5, 5, 2))
    base(x)
    q = syq_tf.quantize(base, kernel_quantizer=SYQ(1, "pixel"))
    y = q(x)
    assert q.name == "c" and q.padding == "same" and q.filters == 4
    np.testing.assert_array_equal(q.kernel.numpy(), base.kernel.numpy())
    ref = _plain_output(q, x, "kernel", q.quantized_kernel().numpy())
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    # alphas were initialised from the copied float kernel
    np.testing.assert_allclose(q.kernel_quantizer.alpha.numpy().ravel(),
                               np.abs(base.kernel.numpy()).mean(axis=(2, 3)).ravel(), rtol=1e-6)


def test_decorator_on_user_subclass():
    @syq_tf.quantize(kernel_quantizer=SYQ(2, "channel"))
    class MyDense(tf.keras.layers.Dense):
        def __init__(self, units, scale=1.0, **kwargs):
            super().__init__(units, **kwargs)
            self.scale = scale

        def call(self, inputs):
            return super().call(inputs) * self.scale

        def get_config(self):
            return {**super().get_config(), "scale": self.scale}

    layer = MyDense(3, scale=2.0)
    x = tf.random.uniform((2, 4))
    y = layer(x)
    ref = 2.0 * (x.numpy() @ layer.quantized_kernel().numpy() + layer.bias.numpy())
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5)
    clone = MyDense.from_config(layer.get_config())
    assert clone.scale == 2.0 and clone.kernel_quantizer.granularity == "channel"
    assert MyDense.__name__ == "MyDense"


def test_each_layer_gets_its_own_quantizer_copy():
    q = SYQ(2, "layer")
    Conv = syq_tf.quantize(tf.keras.layers.Conv2D, kernel_quantizer=q)
    a, b = Conv(2, 3), Conv(4, 3)
    x = tf.random.uniform((1, 6, 6, 1))
    a(x), b(x)
    assert a.kernel_quantizer is not b.kernel_quantizer and a.kernel_quantizer is not q
    assert a.kernel_quantizer.alpha is not b.kernel_quantizer.alpha


def test_larq_layer_with_syq_quantizer():
    x = tf.random.uniform((2, 6, 6, 3))
    layer = lq.layers.QuantConv2D(4, 3, kernel_quantizer=SYQ(2, "pixel"), input_quantizer=DoReFa(8))
    y = layer(x)
    q = layer.kernel_quantizer
    assert any(w is q.alpha for w in layer.trainable_weights)
    qk = q(layer.kernel.latent_variable).numpy()
    ref = tf.nn.conv2d(DoReFa(8)(x), qk, 1, "VALID") + layer.bias
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_larq_summary_reports_bit_widths():
    model = tf.keras.Sequential([
        tf.keras.Input((6, 6, 1)),
        lq.layers.QuantConv2D(4, 3, kernel_quantizer=SYQ(2, "pixel"), input_quantizer=DoReFa(8), name="a"),
        tf.keras.layers.Flatten(),
        syq_tf.quantize(tf.keras.layers.Dense(3, name="b"), kernel_quantizer=SYQ(1, "layer")),
    ])
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        lq.models.summary(model)
    text = buf.getvalue()
    assert "# 1-bit" in text and "# 2-bit" in text
    row_a = next(line for line in text.splitlines() if line.strip().startswith("| a "))
    assert " 36 " in row_a  # 3*3*1*4 two-bit weights
    row_b = next(line for line in text.splitlines() if line.strip().startswith("| b "))
    assert " 192 " in row_b  # (4*4*4)*3 one-bit weights


def test_fit_lowers_loss_and_changes_alpha():
    x, y = separable_data(256)
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        syq_tf.quantize(tf.keras.layers.Conv2D(8, 3), kernel_quantizer=SYQ(2, "pixel")),
        tf.keras.layers.BatchNormalization(),
        tf.keras.layers.Flatten(),
        lq.layers.QuantDense(4, kernel_quantizer=SYQ(1, "channel"), input_quantizer=DoReFa(8)),
    ])
    model.compile(tf.keras.optimizers.Adam(1e-2),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model(x[:1])
    alpha0 = [q.alpha.numpy().copy() for _, q, _ in syq_tf.quantized_kernels(model)]
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    last = model.evaluate(x, y, verbose=0)
    assert last < 0.5 * first
    for a0, (_, q, _) in zip(alpha0, syq_tf.quantized_kernels(model)):
        assert not np.allclose(a0, q.alpha.numpy())


def test_reinitialize_scales_from_float_weights():
    model = tf.keras.Sequential([
        tf.keras.Input((4,)),
        syq_tf.quantize(tf.keras.layers.Dense(3, name="d"), kernel_quantizer=SYQ(2, "channel")),
    ])
    model(tf.ones((1, 4)))
    layer = model.get_layer("d")
    layer.kernel.assign(layer.kernel * 5)
    assert syq_tf.reinitialize_scales(model) == ["d"]
    np.testing.assert_allclose(layer.kernel_quantizer.alpha.numpy().ravel(),
                               np.abs(layer.kernel.numpy()).mean(0), rtol=1e-6)
    layer.kernel.assign(layer.kernel * 2)
    cb = syq_tf.ReinitializeScales()
    cb.set_model(model)
    cb.on_train_begin()
    np.testing.assert_allclose(layer.kernel_quantizer.alpha.numpy().ravel(),
                               np.abs(layer.kernel.numpy()).mean(0), rtol=1e-6)


# ---- errors -------------------------------------------------------------------------------------


def test_layer_without_kernel():
    with pytest.raises(TypeError, match=r"MaxPooling2D\) has no kernel to quantize.*Conv2D"):
        syq_tf.quantize(tf.keras.layers.MaxPooling2D(), kernel_quantizer=SYQ())
    with pytest.raises(TypeError, match="has no kernel to quantize"):
        syq_tf.quantize(tf.keras.layers.ReLU, kernel_quantizer=SYQ())


def test_unsupported_kernel_layer():
    for cls in (tf.keras.layers.Conv3DTranspose, tf.keras.layers.SeparableConv1D):
        with pytest.raises(TypeError, match=f"{cls.__name__}, which is not supported yet"):
            syq_tf.quantize(cls(2, 3), kernel_quantizer=SYQ())


def test_granularity_not_fitting_layer_names_the_layer():
    layer = syq_tf.quantize(tf.keras.layers.Dense(3, name="head"), kernel_quantizer=SYQ(2, "pixel"))
    with pytest.raises(ValueError, match=r"layer 'head' \(QuantizedDense\).*'pixel' needs a convolution"):
        layer(tf.ones((1, 4)))


def test_quantizer_roles_are_checked():
    with pytest.raises(ValueError, match="layer 'c'.*DoReFaActivation quantizes activations.*kernel_quantizer"):
        syq_tf.quantize(tf.keras.layers.Conv2D(2, 3, name="c"), kernel_quantizer=DoReFa(8))
    with pytest.raises(ValueError, match="SYQ quantizes weights and cannot be used as input_quantizer"):
        syq_tf.quantize(tf.keras.layers.Dense, input_quantizer=SYQ())


def test_already_quantized_and_missing_quantizers():
    layer = syq_tf.quantize(tf.keras.layers.Dense(2, name="x"), kernel_quantizer=SYQ())
    with pytest.raises(ValueError, match="'x' is already quantized"):
        syq_tf.quantize(layer, kernel_quantizer=SYQ())
    with pytest.raises(ValueError, match="give a kernel_quantizer, an input_quantizer or both"):
        syq_tf.quantize(tf.keras.layers.Dense(2))


def test_string_aliases_in_larq_layers():
    layer = lq.layers.QuantDense(3, kernel_quantizer="syq", input_quantizer="syq_dorefa")
    layer(tf.ones((1, 4)))
    assert isinstance(layer.kernel_quantizer, SYQ) and layer.kernel_quantizer.bits == 2
    assert isinstance(layer.input_quantizer, DoReFa) and layer.input_quantizer.bits == 8
    # larq's own DoReFa keeps its name: both load side by side
    assert tf.keras.utils.get_custom_objects()["DoReFa"] is lq.quantizers.DoReFa
