"""Low-bit activation grids in full-integer TFLite: the fine form (1-, 2- and 4-bit grids held at int8
scale ``top / 255``, read by ops whose int32 bias lies on a grid 255, 85 or 17 times finer than at the
grid's step) and its restored rounding (``flatbuffer.round_to_grids``); the usual form where the
converter cannot take the fine one."""

import contextlib

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from syq_tf.errors import MalformedModelError
from syq_tf.export import flatbuffer
from syq_tf.export import int8 as int8_export
from syq_tf.export.runtime import litert_interpreter, quantize_input

Q = syq_tf.quantizers
L = tf.keras.layers


@pytest.fixture
def usual_form(monkeypatch):
    """Exports in this test convert the usual form (grids at scale step, a MINIMUM clip)."""
    def use():
        monkeypatch.setattr(int8_export, "fine_grid_scales", lambda: contextlib.nullcontext({}))
    return use


def int8_outputs(buffer, x):
    """LiteRT's int8 outputs on ``x`` and the output's (scale, zero point)."""
    interpreter = litert_interpreter(buffer)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], quantize_input(x, *inp["quantization"]))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]).astype(np.int64), out["quantization"]


def test_the_op_reading_a_grid_adds_its_bias_on_the_fine_grid(usual_form):
    # a DoReFa 2-bit grid read by a Dense with ternary (int8-exact) weights: the inputs and weights are
    # exact in int8, so the int32 bias is the only rounding before the output's; at the grid's step 1/3
    # it moves outputs across an output rounding boundary, at 1/255 (85 times finer) next to never
    bits = 2
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((4,))
    out = lq.layers.QuantDense(32, input_quantizer=Q.DoReFa(bits), kernel_quantizer=Q.SYQ(2, "channel"),
                               bias_initializer=tf.keras.initializers.RandomNormal(stddev=1.0), name="head")(inp)
    model = tf.keras.Model(inp, out)
    x = np.random.default_rng(0).uniform(0, 1, (4000, 4)).astype(np.float32)
    keras = model.predict(x, verbose=0)
    fine = syq_tf.export.to_tflite(model, x[:200])
    usual_form()
    usual = syq_tf.export.to_tflite(model, x[:200])

    assert flatbuffer.op_names(fine.flatbuffer) == ["QUANTIZE", "FULLY_CONNECTED"]  # input at the step, x m
    assert flatbuffer.op_names(usual.flatbuffer) == ["MINIMUM", "FULLY_CONNECTED"]
    assert flatbuffer.io_quantization(fine.flatbuffer, "input")[0] == pytest.approx(1 / (2**bits - 1), rel=1e-6)
    (w_fine,), (w_usual,) = flatbuffer.weight_tensors(fine.flatbuffer), flatbuffer.weight_tensors(usual.flatbuffer)
    assert w_fine.input_scale == pytest.approx(1 / 255, rel=1e-6)
    assert w_usual.input_scale == pytest.approx(1 / (2**bits - 1), rel=1e-6)
    assert not fine.notes  # (the usual form's bias was also stored at the wrong scale: re-expressed)

    def off(result):
        values, (scale, zero) = int8_outputs(result.flatbuffer, x)
        return np.mean(values != np.clip(np.floor(keras / scale + 0.5) + zero, -128, 127))

    assert off(usual) >= 0.002 and off(fine) <= off(usual) / 10, (off(fine), off(usual))


def pooled_grid_model(first):
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((8, 8, 1))
    h = L.MaxPooling2D()(first(inp))
    out = lq.layers.QuantConv2D(4, 3, kernel_quantizer=Q.SYQ(2, "layer"), input_quantizer=Q.DoReFa(4), name="q")(h)
    return tf.keras.Model(inp, L.Flatten()(out))


def test_a_grid_after_a_pooling_is_rounded_by_the_converters_requantization():
    # the converter puts the float convolution's output at the grid's step (the pooling keeps its
    # input's scale) and requantizes the pooled tensor: that QUANTIZE now multiplies by 17
    model = pooled_grid_model(L.Conv2D(4, 3, activation="relu"))
    x = np.random.default_rng(0).uniform(0, 1, (256, 8, 8, 1)).astype(np.float32)
    result = syq_tf.export.to_tflite(model, x[:64])
    assert flatbuffer.op_names(result.flatbuffer) == ["CONV_2D", "MAX_POOL_2D", "QUANTIZE", "CONV_2D", "RESHAPE"]
    graph = flatbuffer.read(result.flatbuffer).subgraphs[0]
    pooled, read = (graph.tensors[int(graph.operators[2].inputs[0])], graph.tensors[int(graph.operators[2].outputs[0])])
    assert pooled.quantization.scale[0] == pytest.approx(1 / 15, rel=1e-6)  # the convolution rounds to the levels
    assert read.quantization.scale[0] == pytest.approx(1 / 255, rel=1e-6)
    assert not result.notes


def test_a_pooled_grid_is_computed_as_keras_does():
    # int8-exact everywhere before the grid (inputs on the int8 input grid, a ternary first kernel):
    # LiteRT rounds to the same levels as Keras, whichever form the export took
    model = pooled_grid_model(lq.layers.QuantConv2D(4, 3, kernel_quantizer=Q.SYQ(2, "layer"), activation="relu"))
    x = (np.random.default_rng(0).integers(0, 256, (256, 8, 8, 1)) / 255).astype(np.float32)
    x[0, 0, 0, 0], x[0, 0, 1, 0] = 0.0, 1.0  # the input range is [0, 1]: scale 1/255
    result = syq_tf.export.to_tflite(model, x[:64])
    assert flatbuffer.io_quantization(result.flatbuffer, "input") == (pytest.approx(1 / 255, rel=1e-6), -128)
    values, (scale, zero) = int8_outputs(result.flatbuffer, x)
    keras = np.clip(np.floor(model.predict(x, verbose=0) / scale + 0.5) + zero, -128, 127)
    assert np.mean(values != keras) <= 0.01 and np.abs(values - keras).max() <= 1


def test_the_usual_form_where_the_converter_refuses_the_fine_one(usual_form):
    # one tensor read through a 4-bit and a 2-bit grid: the converter cannot give the MINIMUM of each a
    # scale of its own ("same scale constraint"), so the export converts the usual form -- the same
    # flatbuffer as with the fine form off
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((8, 8, 1))
    h = L.Conv2D(4, 3, activation="relu")(inp)
    a = lq.layers.QuantConv2D(4, 3, kernel_quantizer=Q.SYQ(2, "layer"), input_quantizer=Q.DoReFa(4))(h)
    b = lq.layers.QuantConv2D(4, 3, kernel_quantizer=Q.SYQ(2, "layer"), input_quantizer=Q.DoReFa(2))(h)
    model = tf.keras.Model(inp, L.Flatten()(L.Add()([a, b])))
    x = np.random.default_rng(0).uniform(0, 1, (64, 8, 8, 1)).astype(np.float32)
    result = syq_tf.export.to_tflite(model, x[:32])
    assert "MINIMUM" in flatbuffer.op_names(result.flatbuffer)
    usual_form()
    assert bytes(result.flatbuffer) == bytes(syq_tf.export.to_tflite(model, x[:32]).flatbuffer)


def test_two_grids_at_one_fine_scale_take_the_usual_form(usual_form):
    # DoReFa 4-bit and 2-bit on [0, 1] both hold their levels at 1/255 in the fine form: their tensors
    # cannot be told apart by scale, so the export converts the usual form (the same flatbuffer)
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((6,))
    h = L.Dense(8, activation="relu")(inp)
    h = lq.layers.QuantDense(8, input_quantizer=Q.DoReFa(4), kernel_quantizer=Q.SYQ(2, "channel"))(h)
    out = lq.layers.QuantDense(4, input_quantizer=Q.DoReFa(2), kernel_quantizer=Q.SYQ(2, "channel"))(h)
    model = tf.keras.Model(inp, out)
    x = np.random.default_rng(0).uniform(0, 1, (64, 6)).astype(np.float32)
    with int8_export.fine_grid_scales() as grids:
        int8_export.convert.int8(int8_export.inference.build(model), x[:32], 32)
    assert list(grids.values()) == [None]
    result = syq_tf.export.to_tflite(model, x[:32])
    assert flatbuffer.op_names(result.flatbuffer).count("MINIMUM") == 2
    usual_form()
    assert bytes(result.flatbuffer) == bytes(syq_tf.export.to_tflite(model, x[:32]).flatbuffer)


def test_round_to_grids_reads_untrusted_files():
    with pytest.raises(MalformedModelError):
        flatbuffer.round_to_grids(b"TFL3" * 8, {1 / 255: (1.0, 255)})
    # a model without grids comes back unchanged; ambiguous grids refuse
    buffer = tf.lite.TFLiteConverter.from_keras_model(
        tf.keras.Sequential([tf.keras.Input((4,)), L.Dense(2)])).convert()
    assert flatbuffer.round_to_grids(buffer, {1 / 255: (1.0, 255)}) == (buffer, 0)
    assert flatbuffer.round_to_grids(buffer, {1 / 255: None}) == (buffer, None)
