"""larq-compute-engine's binary convolution as stored in a flatbuffer: the bit-packed filter layout
of ``LceBconv2d`` (in numpy), reading those ops back, and running a model with LCE's interpreter."""

import dataclasses
import importlib
import sys

import numpy as np

from syq_tf.export import flatbuffer

BCONV_OP = "LceBconv2d"
QUANTIZE_OP = "LceQuantize"
WORD_BITS = 32


def import_lce(module="larq_compute_engine"):
    """``module`` of larq-compute-engine (an optional dependency), or ModuleNotFoundError in one line
    saying why it is missing: LCE 0.16.0 publishes wheels for Python 3.10-3.12 only."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != "larq_compute_engine":
            raise
        version = "%d.%d" % sys.version_info[:2]
        why = (f"publishes no wheel for Python {version} (0.16.0: 3.10-3.12); use Python 3.11 or 3.12, or "
               "target 'litert' or 'tflm'" if sys.version_info >= (3, 13) else
               "is not installed: pip install 'syq_tf[lce]'")
        raise ModuleNotFoundError(f"to_tflite(target='lce') needs the package larq-compute-engine, which {why}.",
                                  name=err.name) from None


def pack_signs(kernel):
    """Bit-pack the signs of a Keras Conv2D kernel ``[kh, kw, c_in, c_out]`` (values ±x, x > 0) the
    way LceBconv2d stores its filter: int32 ``[c_out, kh, kw, ceil(c_in / 32)]``, bit ``i`` of word
    ``w`` set when input channel ``32 w + i`` is negative; channels past ``c_in`` are zero bits."""
    k = np.asarray(kernel)
    if k.ndim != 4:
        raise ValueError(f"pack_signs: expected a Conv2D kernel [kh, kw, c_in, c_out], got shape {k.shape}")
    if np.any(k == 0) or not np.all(np.isfinite(k)):
        raise ValueError("pack_signs: the kernel has zero or non-finite values; only ±x kernels pack")
    neg = np.transpose(k < 0, (3, 0, 1, 2))  # [c_out, kh, kw, c_in]
    c_in = neg.shape[-1]
    words = -(-c_in // WORD_BITS)
    bits = np.zeros(neg.shape[:-1] + (words * WORD_BITS,), np.uint8)
    bits[..., :c_in] = neg
    packed = np.packbits(bits.reshape(*neg.shape[:-1], words, 4, 8), axis=-1, bitorder="little")
    return packed.reshape(*neg.shape[:-1], words * 4).view("<i4").reshape(*neg.shape[:-1], words)


def unpack_signs(words, c_in):
    """Inverse of :func:`pack_signs`: the ±1 kernel ``[kh, kw, c_in, c_out]`` (float32). Raises if
    the padding bits past ``c_in`` are not zero or the words cannot hold ``c_in`` channels."""
    w = np.ascontiguousarray(np.asarray(words).astype("<i4"))
    if w.ndim != 4 or w.shape[-1] * WORD_BITS < c_in or (w.shape[-1] - 1) * WORD_BITS >= c_in:
        raise ValueError(f"unpack_signs: words of shape {w.shape} do not hold {c_in} input channels")
    bits = np.unpackbits(w.view(np.uint8).reshape(*w.shape, 4), axis=-1, bitorder="little")
    bits = bits.reshape(*w.shape[:-1], -1)
    if bits[..., c_in:].any():
        raise ValueError("unpack_signs: padding bits past the last input channel are set")
    signs = np.where(bits[..., :c_in] == 1, -1.0, 1.0).astype(np.float32)
    return np.transpose(signs, (1, 2, 3, 0))


@dataclasses.dataclass
class Bconv:
    op_index: int
    options: dict
    filter: np.ndarray  # int32 [c_out, kh, kw, words]
    multiplier: np.ndarray
    bias: np.ndarray
    thresholds: np.ndarray = None  # int32 output thresholds when the op writes binary outputs


def bconv_ops(buffer):
    """The LceBconv2d ops of the first subgraph, in execution order, with their constant tensors."""
    from flatbuffers import flexbuffers  # noqa: PLC0415

    model = flatbuffer.read(buffer)
    graph = model.subgraphs[0]

    def const(index, dtype):
        if index < 0:
            return None
        tensor = graph.tensors[index]
        data = model.buffers[tensor.buffer].data
        if data is None:
            return None
        return np.frombuffer(bytes(bytearray(data)), dtype).reshape(tuple(tensor.shape))

    found = []
    for i, op in enumerate(graph.operators):
        if flatbuffer.op_name(model, op) != BCONV_OP:
            continue
        options = dict(flexbuffers.Loads(bytes(bytearray(op.customOptions)))) if op.customOptions is not None else {}
        inputs = [int(t) for t in op.inputs] + [-1] * 5
        found.append(Bconv(i, options, const(inputs[1], "<i4"), const(inputs[2], "<f4"), const(inputs[3], "<f4"),
                           const(inputs[4], "<i4")))
    return found



def lce_predict(buffer, x):
    """Outputs of LCE's interpreter (reference kernels on x86), one example at a time."""
    testing = import_lce().testing
    interpreter = testing.Interpreter(bytes(buffer), num_threads=1)
    x = np.asarray(x, np.float32)
    if len(x) == 0:
        raise ValueError("lce_predict: no examples")
    return np.asarray(interpreter.predict(x))
