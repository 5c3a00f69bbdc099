"""to_tflite(..., target="lce") on quantize_model (tfmot) models: the binary schemes bit-pack."""

import importlib.util
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import separable_data

import syq_tf
from syq_tf.export import codebook, flatbuffer, lce_format, to_tflite
from syq_tf.export.tfmot_layers import TfmotKernel, as_quantized_layers
from syq_tf.tfmot import wrapper_kernels

HAVE_LCE = importlib.util.find_spec("larq_compute_engine") is not None
NO_LCE = "larq-compute-engine is not installed on Python %d.%d" % sys.version_info[:2]
needs_lce = pytest.mark.skipif(not HAVE_LCE, reason=NO_LCE)

PACKED = ["conv1", "conv2", "fc1"]  # between the first and last weighted layers (8-bit in every scheme)


def _cnn():
    inp = tf.keras.Input((8, 8, 1))
    h = tf.keras.layers.Conv2D(16, 3, padding="same", name="conv0")(inp)
    h = tf.keras.layers.BatchNormalization(name="bn0")(h)
    h = tf.keras.layers.ReLU(name="relu0")(h)
    h = tf.keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv1")(h)
    h = tf.keras.layers.BatchNormalization(name="bn1")(h)
    h = tf.keras.layers.ReLU(name="relu1")(h)
    h = tf.keras.layers.MaxPooling2D(name="pool1")(h)
    h = tf.keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv2")(h)
    h = tf.keras.layers.BatchNormalization(name="bn2")(h)
    h = tf.keras.layers.ReLU(name="relu2")(h)
    h = tf.keras.layers.Flatten(name="flat")(h)
    h = tf.keras.layers.Dense(32, name="fc1")(h)
    h = tf.keras.layers.ReLU(name="relu3")(h)
    return tf.keras.Model(inp, tf.keras.layers.Dense(4, name="fc")(h))


def _trained(scheme, seed=0):
    tf.keras.utils.set_random_seed(seed)
    model = syq_tf.quantize_model(_cnn(), scheme=scheme)
    optimizer = syq_tf.LossAwareAdam(1e-2) if scheme.startswith("la") else tf.keras.optimizers.Adam(1e-2)
    model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    syq_tf.reinitialize_scales(model)
    x, y = separable_data(512, seed=seed)
    if scheme.startswith("uniq"):
        syq_tf.calibrate(model, x[:128])  # UniQ's activation steps
    history = model.fit(x[:384], y[:384], epochs=3, batch_size=32, verbose=0)
    return model, x[384:], history.history["accuracy"][-1]


@pytest.fixture(scope="module")
def w1a1():
    if not HAVE_LCE:
        pytest.skip(NO_LCE)
    model, x, accuracy = _trained("syq-w1a1")
    assert accuracy >= 0.9  # it learned something: the agreement below is not between two constants
    return model, x, to_tflite(model, x[:32], target="lce", verify_data=x)


def _report(result, name):
    return next(r for r in result.layers if r.layer == name)


def _keras_kernel(model, name):
    """The kernel a wrapper computes with: its syq_tf quantizer's output, or tfmot's 8-bit one."""
    wrapper = model.get_layer(f"quant_{name}")
    quantizer, variable = wrapper_kernels(wrapper)["kernel"]
    if quantizer is None:
        (variable, tfmot_quantizer, ranges), = wrapper._weight_vars
        return np.asarray(tfmot_quantizer(variable, False, ranges))
    return np.asarray(quantizer(tf.convert_to_tensor(variable)))


def _bn_scale(model, name):
    bn = model.get_layer(f"quant_{name}").layer
    return bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)


def test_syq_tf_form_computes_like_the_tfmot_model(w1a1):
    model, x, _ = w1a1
    layers = as_quantized_layers(model)
    np.testing.assert_array_equal(layers.predict(x, verbose=0), model.predict(x, verbose=0))
    conv1 = layers.get_layer("conv1")
    # the scheme's SYQ with the trained alpha; the 1-bit DoReFa of relu0's output as its input quantizer
    impl = model.get_layer("quant_conv1").quantize_config.weight_quantizer.impl
    assert type(conv1.kernel_quantizer) is type(impl)
    np.testing.assert_array_equal(conv1.kernel_quantizer.alpha.numpy(), impl.alpha.numpy())
    assert type(conv1.input_quantizer).__name__ == "DoReFaActivation" and conv1.input_quantizer.bits == 1
    # through max pooling and flatten the grid holds: conv2 and fc1 take it too
    assert layers.get_layer("conv2").input_quantizer.bits == layers.get_layer("fc1").input_quantizer.bits == 1
    # the first and last layers keep tfmot's 8-bit weights with their trained ranges
    assert isinstance(layers.get_layer("conv0").kernel_quantizer, TfmotKernel)
    assert layers.get_layer("conv0").kernel_quantizer.bits == 8
    assert type(layers.get_layer("fc_output_quantizer")).__name__ == "Int8Input"


def test_binary_layers_pack_and_the_8bit_ones_stay_int8(w1a1):
    _, _, result = w1a1
    assert [r.layer for r in result.layers if r.packed] == PACKED
    assert len(lce_format.bconv_ops(result.flatbuffer)) == 3
    for name in PACKED:
        r = _report(result, name)
        assert r.exact and r.op == "LceBconv2d" and r.bits == 1 and r.stored_levels == 2
        assert r.input_quantizer == "DoReFa(1) ({0, 1})"
    for name, op in (("conv0", "CONV_2D"), ("fc", "FULLY_CONNECTED")):
        r = _report(result, name)
        assert not r.packed and r.op == op and r.storage == "int8" and r.exact and r.bits == 8
        assert r.quantizer == "TfmotKernel bits=8"
        assert "values per output channel; LCE's multiplier is one scale per output channel" in r.note
    assert result.totals()["int8_layers"] == ["conv0", "fc"]
    assert "LceBconv2d" in result.ops and "DEQUANTIZE" in result.ops


def test_packed_filters_decode_to_the_keras_codebook(w1a1):
    model, _, result = w1a1
    bconvs = lce_format.bconv_ops(result.flatbuffer)
    for op, name, c_in in zip(bconvs, ("conv1", "conv2"), (16, 32)):
        q = _keras_kernel(model, name)
        assert q.shape[-1] == 32 and set(np.unique(np.abs(q) / np.abs(q).max(axis=(0, 1, 2)))) == {1.0}
        # {0, 1} inputs: the negated kernel's signs, +1 padding; alpha x h/2 x the folded BatchNorm
        np.testing.assert_array_equal(lce_format.unpack_signs(op.filter, c_in), -np.sign(q))
        assert op.options["pad_values"] == 1
        np.testing.assert_allclose(op.multiplier, np.abs(q[0, 0, 0]) / 2 * _bn_scale(model, f"bn{name[-1]}"),
                                   rtol=1e-5)
    # fc1: a Dense on the flattened 4x4x32 grid, a 1x1 LceBconv2d of 512 inputs (16 words)
    q = _keras_kernel(model, "fc1")
    assert bconvs[2].filter.shape == (32, 1, 1, 16)
    np.testing.assert_array_equal(lce_format.unpack_signs(bconvs[2].filter, 512), -np.sign(q).reshape(1, 1, 512, 32))


def test_int8_layers_hold_tfmots_8bit_kernels(w1a1):
    model, _, result = w1a1
    stored = {t.op: t for t in flatbuffer.weight_tensors(result.flatbuffer) if t.dequantized}
    fc = stored["FULLY_CONNECTED"]
    q = _keras_kernel(model, "fc").T  # tfmot's per-tensor 8-bit kernel, [out, in] as TFLite stores it
    np.testing.assert_allclose(codebook.dequantized(fc), q, rtol=1e-6, atol=1e-7)
    assert fc.values.dtype == np.int8 and fc.scales.size == 4
    conv0 = stored["CONV_2D"]  # the following BatchNorm's scale folded in by the converter
    q = np.transpose(_keras_kernel(model, "conv0") * _bn_scale(model, "bn0"), (3, 0, 1, 2))
    np.testing.assert_allclose(codebook.dequantized(conv0), q, rtol=1e-5, atol=1e-6)


def test_lce_interpreter_agrees_with_the_tfmot_model(w1a1):
    model, x, result = w1a1
    v = result.verification
    assert v["data"] == "verify_data" and v["examples"] == len(x) == 128
    assert v["top1_agreement"] >= 0.99 and v["max_abs_diff"] < 1e-4, v
    np.testing.assert_allclose(lce_format.lce_predict(result.flatbuffer, x[:16]), model.predict(x[:16], verbose=0),
                               atol=1e-4)


@needs_lce
@pytest.mark.parametrize("scheme, kernel", [("lab-w1a1", "LossAware mode=binary"), ("uniq-w1a1", "UniQ bits=1")])
def test_other_binary_schemes_pack_the_same_layers(scheme, kernel):
    """Loss-aware binary weights; UniQ's 1-bit weights and calibrated {0, delta} activations (the
    step copied into each packed layer's input quantizer)."""
    model, x, _ = _trained(scheme, seed=1)
    result = to_tflite(model, x[:32], target="lce", verify_data=x)
    assert [r.layer for r in result.layers if r.packed] == PACKED
    assert all(_report(result, n).quantizer.startswith(kernel) for n in PACKED)
    if scheme.startswith("uniq"):
        delta = model.get_layer("quant_relu0").quantize_config.output_quantizer.impl.delta.numpy()
        assert _report(result, "conv1").input_quantizer == f"UniQActivation(1) ({{0, {float(delta):.6g}}})"
    assert result.verification["top1_agreement"] >= 0.99 and result.verification["max_abs_diff"] < 1e-4


def _ranged(scheme):
    """A quantize_model model whose tfmot activation ranges are set (one training-mode call)."""
    tf.keras.utils.set_random_seed(2)
    model = syq_tf.quantize_model(_cnn(), scheme=scheme)
    x, _ = separable_data(64, seed=2)
    model(x, training=True)
    return model, x


def test_tfmot_model_with_nothing_to_pack_is_refused_naming_the_layers():
    model, x = _ranged("syq-w1a8")  # binary weights, but tfmot's 8-bit activations
    with pytest.raises(ValueError) as err:
        to_tflite(model, x[:8], target="lce")
    msg = str(err.value)
    assert "no layer can be bit-packed" in msg
    for name in PACKED:
        assert f"'{name}': int8 inputs (an 8-bit activation range, tfmot's" in msg
    assert "'conv0'" in msg and "'fc'" in msg and "values per output channel" in msg
    assert "syq-w1a1" in msg and "target='litert'" in msg
    model, x = _ranged("syq-w1a2")  # 2-bit activations: four levels
    with pytest.raises(ValueError, match=r"'conv1': input quantizer DoReFa\(2\) has 4 levels"):
        to_tflite(model, x[:8], target="lce")


def test_untrained_tfmot_ranges_are_refused():
    model = syq_tf.quantize_model(_cnn(), scheme="syq-w1a1")
    with pytest.raises(ValueError, match=r"layer 'quantize_layer': tfmot's activation range \[0, 0\] is empty"):
        to_tflite(model, np.zeros((2, 8, 8, 1), np.float32), target="lce")


@needs_lce
def test_residual_block_with_depthwise_and_int8_ops():
    """A residual Add (two inputs), a DepthwiseConv2D (LCE packs no depthwise: int8 weights, with the reason) and a last Dense
    between two tfmot FakeQuant ranges, which LCE's converter makes a full int8 op."""
    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(3)
    inp = tf.keras.Input((8, 8, 1))
    h = layers.ReLU(name="r0")(layers.BatchNormalization(name="bn0")(layers.Conv2D(32, 3, padding="same", name="stem")(inp)))
    r = layers.Conv2D(32, 3, padding="same", use_bias=False, name="c1")(h)
    r = layers.ReLU(name="r1")(layers.BatchNormalization(name="bn1")(r))
    r = layers.BatchNormalization(name="bn2")(layers.Conv2D(32, 3, padding="same", use_bias=False, name="c2")(r))
    h = layers.ReLU(name="r2")(layers.Add(name="add")([h, r]))
    h = layers.ReLU(name="r3")(layers.DepthwiseConv2D(3, padding="same", name="dw")(h))
    out = layers.Dense(4, name="fc")(layers.GlobalAveragePooling2D(name="gap")(h))
    model = syq_tf.quantize_model(tf.keras.Model(inp, out), scheme="syq-w1a1")
    model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    syq_tf.reinitialize_scales(model)
    x, y = separable_data(256, seed=3)
    model.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_array_equal(as_quantized_layers(model).predict(x, verbose=0), model.predict(x, verbose=0))
    result = to_tflite(model, x[:16], target="lce", verify_data=x)
    assert [r.layer for r in result.layers if r.packed] == ["c1", "c2"]
    dw, fc = _report(result, "dw"), _report(result, "fc")
    assert "DepthwiseConv2D layer" in dw.note and dw.storage == "int8" and dw.exact
    assert fc.op == "FULLY_CONNECTED" and "an int8 op" in fc.note and fc.exact and fc.scale_bytes == 4
    assert result.verification["top1_agreement"] >= 0.99 and result.verification["max_abs_diff"] < 1e-4
