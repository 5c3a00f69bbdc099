"""Crafted .tflite files (issue 18, items 2-5): each test exports a small model, edits one field of
the flatbuffer through the object API (or crafts the file from it), and checks that run_tflite,
packed_layers and inspect's reading code refuse it with MalformedModelError naming the op (index
and name) and the tensor -- no read past an array, no hang, no unbounded allocation, no other
exception type."""

import os
import time

import flatbuffers
import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema

import syq_tf
from syq_tf import cli
from syq_tf import kernels as K
from syq_tf.errors import MalformedModelError
from syq_tf.export import flatbuffer
from syq_tf.quantizers import SYQ, DoReFa

from conftest import run_python


@pytest.fixture(scope="module", autouse=True)
def _library():
    K._lib.lib()


def _data():
    return np.random.default_rng(0).uniform(0, 1, (32, 8, 8, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def net():
    """CONV_2D (int8 weights, 16 channels) -> packed ternary CONV_2D (32 channels) -> MAX_POOL_2D ->
    RESHAPE -> FULLY_CONNECTED."""
    x = _data()
    tf.keras.utils.set_random_seed(3)
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 3)),
        tf.keras.layers.Conv2D(16, 3, padding="same", name="first"),
        lq.layers.QuantConv2D(32, 3, padding="same", name="packed", kernel_quantizer=SYQ(2, "channel"),
                              input_quantizer=DoReFa(8)),
        tf.keras.layers.MaxPool2D(),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(4, name="logits"),
    ])
    model(x[:1])
    fb = bytes(syq_tf.export.to_tflite(model, representative_data=x).flatbuffer)
    assert flatbuffer.op_names(fb) == ["CONV_2D", "CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED"]
    runner = K.TFLiteRunner(fb)
    assert list(runner.packed) == [1]  # the 32-channel layer runs in the packed C kernels
    return fb


def _x(fb):
    return np.random.default_rng(1).integers(-128, 128, (1, 8, 8, 3), dtype=np.int8)


def edit(fb, fn):
    """A copy of ``fb`` after ``fn(model, subgraph)`` edited its object tree."""
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(fb), 0))
    fn(model, model.subgraphs[0])
    builder = flatbuffers.Builder(len(fb) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def name_of(sub, j):
    return sub.tensors[j].name.decode()


def refused(fb, pattern, readers=("run",)):
    """Every reader in ``readers`` raises MalformedModelError matching ``pattern``; returns the message."""
    calls = {"run": lambda: K.run_tflite(fb, _x(fb)), "runner": lambda: K.TFLiteRunner(fb),
             "packed": lambda: K.packed_layers(fb), "inspect": lambda: cli.tflite_weight_rows(fb),
             "weights": lambda: flatbuffer.weight_tensors(fb)}
    message = None
    for r in readers:
        with pytest.raises(MalformedModelError, match=pattern) as info:
            calls[r]()
        message = str(info.value)
    return message


def _new_buffer(model, data):
    b = schema.BufferT()
    b.data = np.frombuffer(bytes(data), np.uint8)
    model.buffers.append(b)
    return len(model.buffers) - 1


def test_the_unedited_model_runs_and_the_error_types(net):
    out = K.run_tflite(net, _x(net))
    assert out.shape == (1, 4) and out.dtype == np.int8
    assert issubclass(MalformedModelError, ValueError)
    assert issubclass(K.UnsupportedOp, NotImplementedError) and not issubclass(K.UnsupportedOp, ValueError)


def test_bias_of_one_element_for_a_32_channel_conv(net):
    def one_element(model, sub):
        op = sub.operators[1]
        bias = sub.tensors[op.inputs[2]]
        bias.shape = np.array([1], np.int32)
        bias.buffer = _new_buffer(model, np.int32([7]).tobytes())
        bias.quantization.scale = bias.quantization.scale[:1]
        bias.quantization.zeroPoint = bias.quantization.zeroPoint[:1]

    fb = edit(net, one_element)
    sub = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(fb), 0)).subgraphs[0]
    b = int(sub.operators[1].inputs[2])
    refused(fb, rf"^op 1 CONV_2D: bias tensor {b} '{name_of(sub, b)}' has 1 elements; the layer has 32 output "
                "channels$", ("run", "runner", "packed"))

    def short_data(model, sub):  # the shape still says 32, the data holds 1
        bias = sub.tensors[sub.operators[1].inputs[2]]
        bias.buffer = _new_buffer(model, np.int32([7]).tobytes())

    refused(edit(net, short_data), rf"^op 1 CONV_2D: tensor {b} '.*': 4 bytes of data for shape \[32\] of INT32 "
                                   r"\(needs 128\)$", ("run", "packed"))


def test_a_changed_operator_input_index(net):
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(net), 0))
    sub = model.subgraphs[0]
    first_b, first_w = int(sub.operators[0].inputs[2]), int(sub.operators[0].inputs[1])

    def set_input(k, j, *more):
        def fn(model, sub):
            for k_, j_ in zip((k,) + more[::2], (j,) + more[1::2]):
                sub.operators[1].inputs[k_] = j_
        return fn

    refused(edit(net, set_input(2, first_b)), rf"^op 1 CONV_2D: bias tensor {first_b} '{name_of(sub, first_b)}' "
                                              "has 16 elements; the layer has 32 output channels$",
            ("run", "packed"))
    refused(edit(net, set_input(0, 10_000)), r"^op 1 CONV_2D: input 0 is tensor index 10000, out of range "
                                             rf"\({len(sub.tensors)} tensors\)$", ("run",))
    refused(edit(net, set_input(1, first_w)), r"^op 1 CONV_2D: bias tensor \d+ '.*' has 32 elements; the layer has "
                                              "16 output channels$", ("run", "packed"))
    refused(edit(net, set_input(1, first_w, 2, -1)), rf"^op 1 CONV_2D: weights tensor {first_w} '{name_of(sub, first_w)}' "
                                                     r"have depth 3, the input tensor \d+ '.*' has 16 channels$",
            ("run", "packed"))
    refused(edit(net, set_input(0, int(sub.operators[3].outputs[0]))),  # an op's input computed later
            r"^op 1 CONV_2D: input 0 tensor \d+ '.*' is neither a constant, a model input nor the output of an "
            "earlier op$")
    with pytest.raises(MalformedModelError, match=r"opcode index 9 is out of range"):
        K.run_tflite(edit(net, lambda m, s: setattr(s.operators[2], "opcodeIndex", 9)), _x(net))


def test_inf_scale_is_refused_at_once(net):
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(net), 0))
    sub = model.subgraphs[0]

    def inf_scale(j):
        def fn(model, sub):
            sub.tensors[j].quantization.scale = np.float32([np.inf])
        return fn

    start = time.monotonic()
    x, y = int(sub.operators[0].inputs[0]), int(sub.operators[1].outputs[0])
    refused(edit(net, inf_scale(x)), rf"^op 0 CONV_2D: input tensor {x} '{name_of(sub, x)}' has scale inf \(scales "
                                     r"must be finite and > 0\)$", ("run", "packed"))
    refused(edit(net, inf_scale(y)), rf"^op 1 CONV_2D: output tensor {y} '{name_of(sub, y)}' has scale inf \(scales "
                                     r"must be finite and > 0\)$", ("run", "packed"))
    assert time.monotonic() - start < 10
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError, match="not a finite number"):
            K.quantize_multiplier(bad)
    # the C function itself returns (multiplier 0, shift 0) for inf: it used to loop forever
    code = ("import ctypes; from syq_tf.kernels import _lib; m, s = ctypes.c_int32(7), ctypes.c_int32(7); "
            "_lib.lib().syq_quantize_multiplier(float('inf'), ctypes.byref(m), ctypes.byref(s)); print(m.value, s.value)")
    res = run_python(code)
    assert res.returncode == 0 and res.stdout.split() == ["0", "0"], res.stderr[-2000:]


def test_nan_weight_scale(net):
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(net), 0))
    w = int(model.subgraphs[0].operators[1].inputs[1])

    def nan_scale(model, sub):
        s = np.array(sub.tensors[w].quantization.scale, np.float32)
        s[3] = np.nan
        sub.tensors[w].quantization.scale = s

    refused(edit(net, nan_scale), rf"^op 1 CONV_2D: weights tensor {w} '{name_of(model.subgraphs[0], w)}' has scale "
                                  r"nan \(scales must be finite and > 0\)$", ("run", "packed"))

    def zero_output_scale(model, sub):
        sub.tensors[sub.operators[1].outputs[0]].quantization.scale = np.float32([0.0])

    refused(edit(net, zero_output_scale), r"^op 1 CONV_2D: output tensor \d+ '.*' has scale 0.0")


def test_max_pool_window_of_2_31_minus_1_fails_fast(net):
    def window(padding):
        def fn(model, sub):
            opts = sub.operators[2].builtinOptions
            opts.filterHeight = 2**31 - 1
            opts.padding = padding
        return fn

    start = time.monotonic()
    msg = refused(edit(net, window(schema.Padding.SAME)), r"^op 2 MAX_POOL_2D: working arrays would need \d+ bytes",
                  ("run", "runner"))
    assert f"above MAX_TENSOR_BYTES={K.runner.MAX_TENSOR_BYTES}" in msg
    refused(edit(net, window(schema.Padding.VALID)), r"^op 2 MAX_POOL_2D: a 2147483647x2 window \(dilation 1x1\) "
                                                     r"does not fit the 8x8 input tensor \d+ '.*' with VALID padding$")
    assert time.monotonic() - start < 10


def test_stride_zero_and_other_window_options(net):
    def set_opt(op, **fields):
        def fn(model, sub):
            for k, v in fields.items():
                setattr(sub.operators[op].builtinOptions, k, v)
        return fn

    refused(edit(net, set_opt(1, strideH=0)), r"^op 1 CONV_2D: stride 0x1 \(must be >= 1\)$", ("run", "runner"))
    refused(edit(net, set_opt(0, strideW=-3)), r"^op 0 CONV_2D: stride 1x-3 \(must be >= 1\)$")
    refused(edit(net, set_opt(2, strideH=0)), r"^op 2 MAX_POOL_2D: stride 0x2 \(must be >= 1\)$")
    refused(edit(net, set_opt(1, dilationWFactor=0)), r"^op 1 CONV_2D: dilation 1x0 \(must be >= 1\)$")
    refused(edit(net, set_opt(1, padding=7)), r"^op 1 CONV_2D: padding 7 is neither SAME \(0\) nor VALID \(1\)$")
    refused(edit(net, set_opt(2, filterWidth=0)), r"^op 2 MAX_POOL_2D: filter 2x0 \(must be >= 1\)$")
    refused(edit(net, set_opt(1, fusedActivationFunction=42)),
            r"^op 1 CONV_2D: fused activation 42 is not a TFLite ActivationFunctionType$")


class _Shared:
    """Packs its tensor once and hands the same offset to every entry of the tensors vector."""

    def __init__(self, tensor):
        self.tensor, self.offset = tensor, None

    def Pack(self, builder):  # noqa: N802  (the object API's name)
        if self.offset is None:
            self.offset = self.tensor.Pack(builder)
        return self.offset


def test_a_million_tensors_sharing_one_buffer_is_refused_fast(net):
    def million(model, sub):
        shared = _Shared(sub.tensors[int(sub.operators[1].inputs[1])])
        sub.tensors = list(sub.tensors) + [shared] * (1_000_000 - len(sub.tensors))

    fb = edit(net, million)
    assert 4_000_000 < len(fb) < 4_100_000
    start = time.monotonic()
    pattern = (r"subgraph 0 \(1000000 tensors, 5 operators\) brings the tables it lists above \d+ .*refused before "
               "unpacking")
    for read in (flatbuffer.op_names, flatbuffer.weight_tensors, cli.tflite_weight_rows, K.packed_layers,
                 K.TFLiteRunner):
        with pytest.raises(MalformedModelError, match=pattern):
            read(fb)
    assert time.monotonic() - start < 5


def test_many_tensors_sharing_one_buffer_within_the_table_limit_are_bounded(net):
    """20,000 extra tensors naming the 4.6 kB weight buffer (92 MB if each were copied): the data
    budget (4 x file size + 64 MiB) stops the copies with a clear error."""
    def many(model, sub):
        w = sub.tensors[int(sub.operators[1].inputs[1])]
        for _ in range(20_000):
            t = schema.TensorT()
            t.shape, t.type, t.buffer, t.name = np.array(w.shape), w.type, w.buffer, b"copy"
            sub.tensors.append(t)

    fb = edit(net, many)
    start = time.monotonic()
    with pytest.raises(MalformedModelError, match=r"^no op: tensor \d+ 'copy': the constants read so far exceed \d+ "
                                                  r"bytes \(4 x the file size \+ 64 MiB"):
        K.TFLiteRunner(fb)
    assert time.monotonic() - start < 20


@pytest.fixture(scope="module")
def tflm():
    x = _data()
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 3)),
        syq_tf.quantize(tf.keras.layers.Conv2D(8, 3), kernel_quantizer=SYQ(2, "channel")),
        tf.keras.layers.Flatten(),
        syq_tf.quantize(tf.keras.layers.Dense(4), kernel_quantizer=SYQ(1, "layer")),
    ])
    fb = bytes(syq_tf.export.to_tflite(model, representative_data=x, target="tflm").flatbuffer)
    rows = cli.tflite_weight_rows(fb)
    assert [r["op"] for r in rows if r["op"] == "TFLM_DECODE"] == ["TFLM_DECODE", "TFLM_DECODE"]
    return fb


def test_tflm_files_are_runner_refusals_and_mutations_are_malformed(tflm):
    with pytest.raises(K.UnsupportedOp, match=r"^op 0 CUSTOM is not supported by syq_tf.kernels.run_tflite"):
        K.run_tflite(tflm, np.zeros((1, 8, 8, 3), np.int8))
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(tflm), 0))
    sub = model.subgraphs[0]
    decode = next(i for i, op in enumerate(sub.operators) if model.operatorCodes[op.opcodeIndex].customCode == b"TFLM_DECODE")
    enc, anc = (int(j) for j in sub.operators[decode].inputs[:2])
    header = bytes(model.buffers[sub.tensors[anc].buffer].data)

    def ancillary(byte, value):
        def fn(model, sub):
            data = bytearray(header)
            data[byte] = value
            sub.tensors[anc].buffer = _new_buffer(model, data)
        return fn

    def readers(fb, pattern):
        for read in (cli.tflite_weight_rows, cli._tflm_rows):
            with pytest.raises(MalformedModelError, match=pattern):
                read(fb)

    bits = header[5] & 7
    readers(edit(tflm, ancillary(5, (7 << 4) | bits)), r"unpack: value-table axis 7 for a tensor of shape")
    readers(edit(tflm, ancillary(1, 9)), r"unpack: not a TFLM LUT ancillary tensor")
    readers(edit(tflm, lambda m, s: setattr(s.tensors[enc], "buffer", _new_buffer(m, b"\x00"))),
            r"unpack: 1 bytes of indices for \d+ \d-bit indices")
    readers(edit(tflm, lambda m, s: setattr(s.operators[decode], "inputs", s.operators[decode].inputs[:1])),
            rf"op {decode} TFLM_DECODE: inputs \[{enc}\] and outputs")
    readers(edit(tflm, lambda m, s: setattr(s.operators[decode], "inputs", np.int32([enc, 999]))),
            rf"op {decode} TFLM_DECODE: .*tensor indices below {len(sub.tensors)}")
    stride = header[6]
    if stride < (1 << bits):  # an index past the value table
        size = len(model.buffers[sub.tensors[enc].buffer].data)
        readers(edit(tflm, lambda m, s: setattr(s.tensors[enc], "buffer", _new_buffer(m, b"\xff" * size))),
                rf"unpack: index {(1 << bits) - 1} is beyond the value tables of {stride} entries")


def test_inspect_refuses_pipes_and_malformed_files_in_one_line(net, tmp_path, capsys):
    fifo = tmp_path / "model.tflite"
    os.mkfifo(fifo)
    start = time.monotonic()
    assert cli.main(["inspect", f"--model={fifo}"]) != 0
    err = capsys.readouterr().err.strip()
    assert "not a regular file (a named pipe, device or socket)" in err and len(err.splitlines()) == 1
    assert time.monotonic() - start < 10
    bad = tmp_path / "bad.tflite"
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(net), 0))
    w = int(model.subgraphs[0].operators[1].inputs[1])
    bad.write_bytes(edit(net, lambda m, s: setattr(s.tensors[w].quantization, "quantizedDimension", 3)))
    assert cli.main(["inspect", f"--model={bad}"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CONV_2D weight tensor" in err and "32 scales along quantized dimension 3" in err
    good = tmp_path / "good.tflite"
    good.write_bytes(net)
    assert cli.main(["inspect", f"--model={good}"]) == 0
