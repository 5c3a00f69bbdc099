"""TFLite Micro export (``to_tflite(..., target="tflm")``): the same full-integer int8 model as
target ``litert`` (exact codebooks), with every low-bit weight tensor LUT-compressed for TFLite
Micro's own compression feature where that stores fewer bytes than int8 (:func:`lut_bytes`; not a
3x3 depthwise kernel with 9 levels in each channel's 9 weights), and the model as a C array ready
to compile into firmware.

Format (TFLM's DECODE operator, ``tflite_micro.compression``, LUT decode type 0, version 1): a
compressed weight tensor becomes a UINT8 tensor of packed indices, ``ceil(log2(levels))`` bits
each, in the tensor's row-major element order, most significant bit first, zero-padded to a
whole byte; its paired ancillary UINT8 tensor holds a 16-byte header (byte 0 decode type 0, byte 1
version 1, byte 4 LUT version 1, byte 5 ``axis << 4 | bits`` with axis 15 meaning one table,
byte 6 table stride) and then one int8 value table per channel of the quantized axis, each padded
to the stride. A ``TFLM_DECODE`` custom op in front of each consumer expands it into the arena.
This module chooses the tensors and bit widths, encodes them (:func:`pack`) and writes the
compressed flatbuffer itself (:func:`insert_decodes`: the graph TFLM's public compressor
``tflite_micro...compression.compress`` builds, written with numpy and whole-buffer copies; the
tests compare the two), checks the result with its own numpy decoder and runs both models with the
TFLite Micro interpreter.
"""

import copy
import dataclasses
import math
import os
import re
import tempfile

import numpy as np
import tensorflow as tf

from syq_tf.export import codebook, flatbuffer, int8
from syq_tf.export.match import kernel_matches
from syq_tf.export.report import ExportResult
from syq_tf.export.runtime import agreement, keras_outputs, litert_int8_outputs

MAX_INDEX_BITS = 7  # the DECODE LUT header's bit-width field (3 bits, 1..7)
DCM_BYTES = 16  # DECODE common metadata at the head of every ancillary tensor
DECODE_OP = "TFLM_DECODE"
_PER_TENSOR_AXIS = 15
_HOST_ARENA = 8 << 20  # generous: the TFLM Python runtime crashes (not raises) on a too-small arena


# ---- the LUT format in numpy (independent of TFLM's Python code) --------------------------------


def pack_indices(indices, bits):
    """Indices (any shape, row-major) as ``bits``-bit fields, MSB first, zero-padded to a byte."""
    idx = np.asarray(indices, np.uint8).ravel()
    if idx.size and int(idx.max()) >= (1 << bits):
        raise ValueError(f"pack_indices: index {int(idx.max())} does not fit in {bits} bits")
    fields = np.unpackbits(idx[:, None], axis=1, bitorder="big")[:, 8 - bits:]
    return np.packbits(fields.ravel(), bitorder="big").tobytes()


def unpack_indices(data, bits, count):
    """Inverse of :func:`pack_indices`: ``count`` indices (MalformedModelError if ``data`` holds fewer)."""
    bits, count = int(bits), int(count)
    if not 1 <= bits <= 8 or count < 0:
        raise flatbuffer.MalformedModelError(f"unpack_indices: {count} indices of {bits} bits (1..8 bits, count >= 0)")
    if len(data) * 8 < bits * count:
        raise flatbuffer.MalformedModelError(f"unpack_indices: {len(data)} bytes hold fewer than {count} {bits}-bit indices")
    raw = np.unpackbits(np.frombuffer(bytes(data), np.uint8), bitorder="big")
    if raw.size < bits * count:
        raise ValueError(f"unpack_indices: {len(data)} bytes hold fewer than {count} {bits}-bit indices")
    fields = raw[: bits * count].reshape(count, bits)  # MSB first: packed into a byte's top bits
    return (np.packbits(fields, axis=1, bitorder="big")[:, 0] >> (8 - bits)).astype(np.uint8)


def lut_encode(values, axis):
    """(tables, indices): one sorted table of the distinct values per slice along ``axis`` (one
    table for the whole tensor if ``axis`` is None) and each element's index into its table
    (what ``np.unique(..., return_inverse=True)`` gives per slice, for all slices at once)."""
    values = np.asarray(values)
    if values.dtype != np.int8:
        raise TypeError(f"lut_encode: int8 values expected, not {values.dtype}")
    rows = codebook.channel_rows(values, axis)
    codes = rows.astype(np.int16) + 128  # 0..255
    present = np.zeros((rows.shape[0], 256), bool)
    present[np.arange(rows.shape[0])[:, None], codes] = True
    rank = np.cumsum(present, axis=1, dtype=np.int16) - 1  # a value's position in its sorted table
    indices = rank[np.arange(rows.shape[0])[:, None], codes].astype(np.uint8)
    tables = [(np.flatnonzero(row) - 128).astype(np.int8) for row in present]
    return tables, codebook.from_rows(indices, values.shape, axis)


def padded_tables(tables, stride=None):
    """The tables as rows of a (channels, stride) array, each zero-padded to ``stride`` (default:
    the longest table)."""
    lengths = np.array([len(t) for t in tables])
    stride = int(lengths.max()) if stride is None else stride
    out = np.zeros((len(tables), stride), np.result_type(*tables))
    out[np.arange(stride) < lengths[:, None]] = np.concatenate(tables)  # row-major, as concatenated
    return out


def lut_decode(tables, indices, axis):
    """Inverse of :func:`lut_encode`."""
    indices = np.asarray(indices, np.intp)
    padded = padded_tables(tables)
    if axis is None:
        return padded[0][indices]
    shape = [1] * indices.ndim
    shape[axis] = len(tables)
    channel = np.arange(len(tables)).reshape(shape)
    return padded[channel, indices]


def lut_bytes(weights, bits, tables, stride):
    """Bytes of :func:`pack`'s output for ``weights`` indices of ``bits`` bits and ``tables`` value
    tables padded to ``stride`` entries: the packed indices plus the ancillary header and tables."""
    return -(-weights * bits // 8) + DCM_BYTES + tables * stride


def pack(values, axis, bits=None):
    """(encoded, ancillary) bytes of an int8 tensor in the TFLM DECODE LUT format."""
    values = np.asarray(values, np.int8)
    tables, indices = lut_encode(values, axis)
    stride = max(len(t) for t in tables)
    bits = codebook.bits_for_levels(stride) if bits is None else bits
    if not 1 <= bits <= MAX_INDEX_BITS:
        raise ValueError(f"pack: {stride} levels need {codebook.bits_for_levels(stride)} bits; the TFLM LUT holds 1..7")
    header = bytearray(DCM_BYTES)
    header[1] = 1  # DCM version (byte 0: decode type 0 = LUT)
    header[4] = 1  # LUT version
    header[5] = ((_PER_TENSOR_AXIS if axis is None else axis) << 4) | bits
    header[6] = stride
    body = padded_tables(tables, stride).astype(np.int8).tobytes()
    return pack_indices(indices, bits), bytes(header) + body


def unpack(encoded, ancillary, shape):
    """The int8 tensor of ``shape`` that a TFLM LUT (encoded, ancillary) pair decodes to."""
    ancillary = bytes(ancillary)
    if len(ancillary) < DCM_BYTES or ancillary[0] != 0 or ancillary[1] != 1 or ancillary[4] != 1:
        raise flatbuffer.MalformedModelError("unpack: not a TFLM LUT ancillary tensor (decode type 0, DCM v1, LUT v1)")
    axis, bits, stride = ancillary[5] >> 4, ancillary[5] & 7, ancillary[6]
    shape = tuple(int(s) for s in shape)
    if any(d < 0 for d in shape):
        raise flatbuffer.MalformedModelError(f"unpack: shape {shape} has a negative dimension")
    if axis != _PER_TENSOR_AXIS and not axis < len(shape):
        raise flatbuffer.MalformedModelError(f"unpack: value-table axis {axis} for a tensor of shape {shape}")
    count = int(np.prod(shape, dtype=object)) if shape else 1
    channels = 1 if axis == _PER_TENSOR_AXIS else shape[axis]
    body = np.frombuffer(ancillary[DCM_BYTES:], np.int8)
    if bits == 0 or stride == 0 or body.size != channels * stride:
        raise flatbuffer.MalformedModelError(f"unpack: value tables of {body.size} bytes for {channels} channels x {stride}")
    if len(bytes(encoded)) * 8 < bits * count:  # before allocating count indices
        raise flatbuffer.MalformedModelError(f"unpack: {len(bytes(encoded))} bytes of indices for {count} {bits}-bit indices")
    tables = list(body.reshape(channels, stride))
    indices = unpack_indices(encoded, bits, count).reshape(shape)
    if indices.size and int(indices.max()) >= stride:
        raise flatbuffer.MalformedModelError(f"unpack: index {int(indices.max())} is beyond the value tables of {stride} entries")
    return lut_decode(tables, indices, None if axis == _PER_TENSOR_AXIS else axis).astype(np.int8)


# ---- reports ----------------------------------------------------------------------------------


@dataclasses.dataclass
class CompressionReport:
    layer: str
    op: str
    tensor: str
    shape: tuple
    axis: int  # channel axis of the value tables, -1 for one table
    channels: int
    levels: int  # distinct int8 values per channel (max over channels)
    bits: int  # bits per index; 8 when not compressed
    weights: int
    int8_bytes: int  # the uncompressed tensor
    index_bytes: int  # packed indices as stored
    table_bytes: int  # ancillary tensor as stored: 16-byte header + padded value tables
    stored_bytes: int  # index_bytes + table_bytes (int8_bytes when not compressed)
    minimum_bytes: int  # ceil(sum(bits x weights) / 8) + one byte per distinct level per channel
    compressed: bool
    note: str = ""


class TflmExportResult(ExportResult):
    """:class:`ExportResult` of target ``tflm``: ``flatbuffer`` is the LUT-compressed model (or the
    int8 model if nothing was compressed), ``uncompressed`` the int8 model it decodes to."""

    def __init__(self, base, flatbuffer_bytes, uncompressed, compression, arena_bytes,
                 arena_bytes_uncompressed, ops, notes):
        super().__init__(bytes(flatbuffer_bytes), "tflm", base.layers, notes, base.verification,
                         requantization=base.requantization)
        self.uncompressed = bytes(uncompressed)
        self.compression = compression
        self.arena_bytes = arena_bytes
        self.arena_bytes_uncompressed = arena_bytes_uncompressed
        self.ops = ops

    def to_dict(self):
        d = super().to_dict()
        d["tflm"] = {
            "flash_bytes": self.model_bytes,
            "uncompressed_model_bytes": len(self.uncompressed),
            "arena_bytes": self.arena_bytes,
            "arena_bytes_uncompressed": self.arena_bytes_uncompressed,
            "arena_note": "RecordingMicroAllocator total on this 64-bit host; 32-bit MCUs need a little less",
            "ops": self.ops,
            "compressed_tensors": [dataclasses.asdict(r) for r in self.compression],
        }
        return d

    def table(self):
        rows = [super().table(), ""]
        wl = max([14] + [len(r.layer) + 2 for r in self.compression])
        head = (f"{'tensor of':<{wl}}{'op':<20}{'bits':>5}{'levels':>7}{'weights':>9}{'int8 B':>8}"
                f"{'index B':>9}{'table B':>9}{'stored B':>10}{'minimum B':>11}")
        rows += [head, "-" * len(head)]
        for r in self.compression:
            bits = r.bits if r.compressed else "-"
            rows.append(f"{r.layer:<{wl}}{r.op:<20}{bits:>5}{r.levels:>7}{r.weights:>9}{r.int8_bytes:>8}"
                        f"{r.index_bytes:>9}{r.table_bytes:>9}{r.stored_bytes:>10}{r.minimum_bytes:>11}"
                        + (f"  ({r.note})" if r.note else ""))
        rows.append(f"flash: {self.model_bytes} bytes (int8 uncompressed {len(self.uncompressed)}); "
                    f"RAM: tensor arena {self.arena_bytes} bytes (uncompressed model "
                    f"{self.arena_bytes_uncompressed}), measured by the TFLM runtime")
        return "\n".join(rows)

    def c_source(self, header_name, array_name="g_model"):
        """(header, source) text of the model as a C++ array for TFLM firmware."""
        return c_array(self.flatbuffer, header_name, array_name, self._c_comment())

    def _c_comment(self):
        compressed = any(r.compressed for r in self.compression)
        lines = [f"TFLite Micro model exported by syq_tf (target 'tflm'): {self.model_bytes} bytes.",
                 f"Tensor arena: {self.arena_bytes} bytes measured by the TFLM runtime on a 64-bit host.",
                 "Ops to register: " + ", ".join(self.ops) + "."]
        if compressed:
            lines.append("LUT-compressed weights: register the DECODE op, e.g. "
                         "resolver.AddCustom(\"TFLM_DECODE\", tflite::micro::Register_DECODE()).")
        return lines

    array_name = "g_model"

    def files(self, path):
        """The model, its report, and the C array (``path`` without extension + ``.h`` / ``.cc``,
        array :attr:`array_name`)."""
        stem = os.path.splitext(path)[0]
        header, source = self.c_source(os.path.basename(stem) + ".h", self.array_name)
        return super().files(path) + [(stem + ".h", header.encode()), (stem + ".cc", source.encode())]

    def save(self, path, array_name="g_model"):
        """Write ``path`` (.tflite), its report (``path`` + ``.json``) and the C array ``array_name``
        (``path`` without extension + ``.h`` / ``.cc``), atomically (:meth:`ExportResult.save`)."""
        self.array_name = array_name
        return super().save(path)


_C_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def c_array(data, header_name, array_name="g_model", comment=()):
    """(header, source) text: ``alignas(16) const unsigned char <array_name>[]`` and
    ``const unsigned int <array_name>_len`` (C++11)."""
    if not _C_NAME.match(array_name):
        raise ValueError(f"c_array: {array_name!r} is not a C identifier")
    guard = re.sub(r"[^A-Za-z0-9]", "_", header_name).upper() + "_"
    data = bytes(data)
    remark = "".join(f"// {line}\n" for line in comment)
    header = (f"{remark}#ifndef {guard}\n#define {guard}\n\n"
              f"extern const unsigned char {array_name}[];\n"
              f"extern const unsigned int {array_name}_len;\n\n#endif  // {guard}\n")
    body = ",\n".join("  " + ", ".join(f"0x{b:02x}" for b in data[i : i + 12])
                      for i in range(0, len(data), 12))
    source = (f"{remark}#include \"{header_name}\"\n\n"
              f"alignas(16) const unsigned char {array_name}[] = {{\n{body}\n}};\n"
              f"const unsigned int {array_name}_len = {len(data)};\n")
    return header, source


# ---- running with TFLite Micro and LiteRT -------------------------------------------------------


def _tflm():
    try:
        from tflite_micro.python.tflite_micro import runtime  # noqa: PLC0415
    except ImportError as err:
        raise ImportError("target 'tflm' needs the tflite-micro Python package (pip install "
                          "tflite-micro; see constraints.txt)") from err
    return runtime


def tflm_interpreter(buffer, arena_size=None, keep_tensors=False):
    """TFLite Micro's (Python) interpreter for ``buffer``, with a generous host arena. An op TFLM has
    no kernel for is named in the error, with the tensor it computes (TFLM itself only prints it and
    raises "failed to allocate tensors"). ``keep_tensors``: every tensor readable after ``invoke``
    (``GetTensor(index, 0)``; TFLM's kPreserveAllTensors, an arena entry per tensor)."""
    import sys  # noqa: PLC0415

    made = {}
    runtime = _tflm()
    configs = runtime.InterpreterConfig
    config = configs.kPreserveAllTensors if keep_tensors else configs.kAllocationRecording
    if arena_size is None:  # kept tensors are not planned over each other: room for every one of them
        arena_size = _arena_for(buffer) + (_tensor_bytes(buffer) if keep_tensors else 0)

    def create():
        try:
            made["interpreter"] = runtime.Interpreter.from_bytes(bytes(buffer), arena_size=arena_size,
                                                                 intrepreter_config=config)
        except RuntimeError as err:
            made["error"] = err

    printed = _capture_fd2(create)
    if "error" not in made:
        sys.stderr.write(printed)
        return made["interpreter"]
    missing = re.findall(r"Didn't find op for builtin opcode '(\w+)'", printed)
    if not missing:
        raise made["error"]
    model = flatbuffer.read(bytes(buffer))
    graph = model.subgraphs[0]
    where = next((graph.tensors[op.outputs[0]].name.decode(errors="replace") for op in graph.operators
                  if flatbuffer.op_name(model, op) == missing[0] and len(op.outputs)), "?")
    raise RuntimeError(f"TFLite Micro has no kernel for op {missing[0]} (first computing tensor '{where}'); "
                       "the model cannot run in TFLM") from made["error"]


def tflm_predict_int8(buffer, x_int8, arena_size=None):
    """Raw int8 outputs of the TFLite Micro interpreter, one example per invoke."""
    interpreter = tflm_interpreter(buffer, arena_size)
    out = []
    for row in np.asarray(x_int8):
        interpreter.set_input(row[None], 0)
        interpreter.invoke()
        out.append(np.array(interpreter.get_output(0)).reshape(-1))
    return np.stack(out)


def _arena_for(buffer):
    return _HOST_ARENA + 4 * len(buffer)


def _tensor_bytes(buffer):
    """Bytes of all the first subgraph's tensors without constant data, each rounded up to 16."""
    model = flatbuffer.read(bytes(buffer))
    total = 0
    for tensor in model.subgraphs[0].tensors:
        data = model.buffers[tensor.buffer].data if tensor.buffer < len(model.buffers) else None
        if data is None or not len(data):
            dtype = flatbuffer.numpy_type(tensor)
            count = int(np.prod([max(int(d), 1) for d in (tensor.shape if tensor.shape is not None else [])]))
            total += -(-count * (np.dtype(dtype).itemsize if dtype else 8) // 16) * 16
    return total


def arena_used(buffer, x_int8_row):
    """Tensor-arena bytes the TFLM runtime allocated for ``buffer`` (RecordingMicroAllocator's
    'Arena allocation total', printed by the interpreter to stderr after one invoke), or None."""
    interpreter = tflm_interpreter(buffer)
    interpreter.set_input(np.asarray(x_int8_row)[None], 0)
    interpreter.invoke()
    text = _capture_fd2(interpreter.print_allocations)
    found = re.search(r"Arena allocation total (\d+) bytes", text)
    return int(found.group(1)) if found else None


def _capture_fd2(fn):
    import sys  # noqa: PLC0415

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode(errors="replace")


# ---- export -------------------------------------------------------------------------------------


def export(model, options):
    """The ``target="tflm"`` export: the int8 model of target ``litert`` (:mod:`syq_tf.export.int8`),
    then LUT-compressed, measured and checked in TFLite Micro (:func:`finish`)."""
    _check_model(model)
    base = int8.build(model, options)
    result = int8.result(model, base.buffer, options, base.rescaled, base.notes)
    return finish(model, result, options.representative_data, options.verify_data, options.verify_labels)


def _check_model(model):
    """Refuse what TFLite Micro cannot run before converting."""
    recurrent = [layer.name for layer in model.layers if isinstance(layer, tf.keras.layers.RNN)]
    if recurrent:
        raise ValueError(
            f"to_tflite(target='tflm'): layers {recurrent} are recurrent; syq_tf exports recurrent "
            "models with int8 weights and float activations (dynamic range), which TFLite Micro does "
            "not run. Use target='litert' for them."
        )
    volumetric = [layer.name for layer in model.layers if isinstance(layer, tf.keras.layers.Conv3D)]
    if volumetric:
        raise ValueError(
            f"to_tflite(target='tflm'): layers {volumetric} are Conv3D; TFLite Micro has no CONV_3D kernel "
            "(and LiteRT none in int8: target 'litert' keeps it float). Use target='litert' for them."
        )


def _plan(model, buffer):
    """A CompressionReport skeleton (and spec args) per quantized int8 weight tensor."""
    plans = []
    for match in kernel_matches(model, buffer):
        t = match.tensor
        if t is None or t.dtype != "INT8":
            continue
        axis = int(t.quantized_dimension) if t.scales.size > 1 else None
        tables, _ = lut_encode(t.values, axis)
        levels = max(len(tab) for tab in tables)
        bits = codebook.bits_for_levels(levels)
        n = int(t.values.size)
        minimum = math.ceil(bits * n / 8) + sum(len(tab) for tab in tables)
        report = CompressionReport(
            layer=match.label, op=t.op, tensor=t.name, shape=tuple(int(s) for s in t.values.shape),
            axis=-1 if axis is None else axis, channels=len(tables), levels=levels, bits=bits,
            weights=n, int8_bytes=n, index_bytes=0, table_bytes=0, stored_bytes=n,
            minimum_bytes=minimum, compressed=False)
        if match.quantizer is None:
            report.bits = 8
            report.minimum_bytes = n
            report.note = "float layer (ordinary int8): not compressed"
        elif bits > MAX_INDEX_BITS:
            report.bits = 8
            report.minimum_bytes = n
            report.note = f"{levels} levels need 8 bits: stored as plain int8"
        elif axis is not None and axis not in (0, t.values.ndim - 1):
            report.note = f"channel axis {axis}: TFLM LUT tables take axis 0 or the last axis only"
        elif (lut := lut_bytes(n, bits, len(tables), levels)) >= n:
            report.bits = 8
            report.minimum_bytes = n
            report.note = (f"LUT would store {lut} bytes ({bits}-bit indices, {len(tables)} table(s) of {levels}), "
                           f"not fewer than int8's {n}: stored as plain int8")
        else:
            plans.append((report, t, axis))
            continue
        plans.append((report, None, None))
    return plans


@flatbuffer.reader
def decode_pairs(buffer):
    """{tensor name: (encoded bytes, ancillary bytes, shape)} for every DECODE output
    (MalformedModelError when a DECODE op's inputs do not pair with its outputs)."""
    model = flatbuffer.read(buffer)
    graph = model.subgraphs[0]
    pairs, budget = {}, flatbuffer.data_budget(buffer)
    n = len(graph.tensors or [])

    def data(index):
        nonlocal budget
        b = graph.tensors[index].buffer
        if not 0 <= b < len(model.buffers or []):
            raise flatbuffer.MalformedModelError(f"tensor {index}: buffer index {b} is out of range")
        d = model.buffers[b].data
        budget -= 0 if d is None else len(d)
        if budget < 0:
            raise flatbuffer.MalformedModelError(f"the DECODE inputs read exceed {flatbuffer.data_budget(buffer)} bytes "
                                      "(4 x the file size + 64 MiB: tensors sharing buffers)")
        return b"" if d is None else bytes(bytearray(d))

    for idx, op in enumerate(graph.operators or []):
        if flatbuffer.op_name(model, op) != DECODE_OP:
            continue
        ins = [int(j) for j in (op.inputs if op.inputs is not None else [])]
        outs = [int(j) for j in (op.outputs if op.outputs is not None else [])]
        if len(ins) != 2 * len(outs) or any(not 0 <= j < n for j in ins + outs):
            raise flatbuffer.MalformedModelError(f"op {idx} {DECODE_OP}: inputs {ins[:8]} and outputs {outs[:8]} (needs an "
                                      f"(encoded, ancillary) pair per output, tensor indices below {n})")
        for k, out in enumerate(outs):
            enc, anc = ins[2 * k], ins[2 * k + 1]
            name = graph.tensors[enc].name
            name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            shape = tuple(int(s) for s in (graph.tensors[out].shape if graph.tensors[out].shape is not None else []))
            if any(d < 0 for d in shape):
                raise flatbuffer.MalformedModelError(f"op {idx} {DECODE_OP}: output tensor {out} has shape {shape}")
            pairs[name] = (data(enc), data(anc), shape)
    return pairs


def ops_of(buffer):
    return sorted(set(flatbuffer.op_names(buffer)))


def _decode_code(model):
    """Index of the ``TFLM_DECODE`` custom operator code, added if the model has none."""
    schema = flatbuffer.schema
    for i, code in enumerate(model.operatorCodes):
        if (max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.CUSTOM
                and code.customCode == DECODE_OP.encode()):
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = DECODE_OP.encode()
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _new_tensor(graph, name, tensor_type, shape, buffer_index):
    t = flatbuffer.schema.TensorT()
    t.name, t.type, t.shape, t.buffer = name, tensor_type, list(shape), buffer_index
    graph.tensors.append(t)
    return len(graph.tensors) - 1


def _dedupe_buffers(model, metadata_buffers):
    """Point every tensor at the first buffer of its bytes (variable tensors keep their own), drop
    the buffers nothing references but buffer 0 and the metadata, and renumber (TFLM's compressor
    does the same: identical encodings, and the converter's empty buffers, end up shared)."""
    first, canonical, keep = {}, {}, {0} | set(metadata_buffers)
    for graph in model.subgraphs:
        for t in graph.tensors or []:
            if not 0 <= t.buffer < len(model.buffers):
                raise flatbuffer.MalformedModelError(f"tensor {t.name!r}: buffer index {t.buffer} is out of range")
            if t.buffer == 0 or t.isVariable:
                keep.add(t.buffer)
                continue
            if t.buffer not in canonical:  # each buffer's bytes once, however many tensors name it
                data = model.buffers[t.buffer].data
                key = b"" if data is None else np.asarray(data, np.uint8).tobytes()
                canonical[t.buffer] = first.setdefault(key, t.buffer)
            t.buffer = canonical[t.buffer]
            keep.add(t.buffer)
    if not all(0 <= b < len(model.buffers) for b in keep):
        raise flatbuffer.MalformedModelError(f"metadata buffer indices {sorted(metadata_buffers)[:8]} out of range")
    order = sorted(keep)
    renumber = {old: new for new, old in enumerate(order)}
    model.buffers = [model.buffers[i] for i in order]
    for graph in model.subgraphs:
        for t in graph.tensors or []:
            t.buffer = renumber[t.buffer]
    for m in model.metadata or []:
        m.buffer = renumber[m.buffer]


@flatbuffer.reader
def insert_decodes(buffer, encodings):
    """(flatbuffer, {tensor index: reason not compressed}) of a model whose first-subgraph tensors
    ``encodings = {tensor index: (encoded bytes, ancillary bytes)}`` are stored LUT-encoded and
    decoded at run time by ``TFLM_DECODE`` ops, in the graph TFLM's compressor
    (``tflite_micro...compression.compress``) builds:

    * the encoded tensor keeps its index and its quantization fields; it becomes a 1-D UINT8
      tensor of the packed indices, in a buffer of its own;
    * before each operator that reads compressed tensors, one DECODE op with inputs (encoded,
      ancillary) per compressed tensor it reads, in ``encodings`` order, and one output per pair:
      a copy of the original tensor named ``<name>_decoded`` without data, which the operator
      now reads instead (a tensor read by several operators is decoded once before each: a
      DECODE output lives until the next operator only);
    * ancillary tensors ``<name>_ancillary`` (UINT8, 1-D) are appended to the subgraph, one per
      distinct ancillary content (DECODEs of identical tables share one), followed by the decoded
      tensors, in the order the consumers are visited (last one first);
    * buffers are deduplicated by content and the unreferenced ones dropped.

    A tensor whose buffer another, uncompressed tensor shares, that no operator reads, or that is
    a subgraph output is left as it is (the reason is returned). Buffer data is written 16-byte
    aligned with whole-buffer copies."""
    model = flatbuffer.read(buffer)
    schema = flatbuffer.schema
    graph = model.subgraphs[0]
    graph.tensors, graph.operators = list(graph.tensors or []), list(graph.operators or [])
    model.buffers = list(model.buffers or [])
    n = len(graph.tensors)
    for index in encodings:
        if not 0 <= index < n:
            raise ValueError(f"insert_decodes: tensor index {index} is not below {n}")
    sharers = {}
    for s, sub in enumerate(model.subgraphs):
        for k, t in enumerate(sub.tensors or []):
            sharers.setdefault(t.buffer, []).append((s, k))
    consumers, skipped = {}, {}
    outputs = {int(i) for i in (graph.outputs if graph.outputs is not None else [])}
    for index in encodings:
        tensor = graph.tensors[index]
        if not 0 <= tensor.buffer < len(model.buffers):
            raise flatbuffer.MalformedModelError(f"tensor {index}: buffer index {tensor.buffer} is out of range")
        data = model.buffers[tensor.buffer].data
        if tensor.buffer == 0 or data is None or not len(data):
            skipped[index] = "it has no data"
            continue
        if any(s != 0 or k not in encodings for s, k in sharers[tensor.buffer]):
            skipped[index] = "its buffer is shared with uncompressed tensors"
            continue
        if index in outputs:
            skipped[index] = "it is a subgraph output"
            continue
        users = [p for p, op in enumerate(graph.operators)
                 if op.inputs is not None and index in (int(i) for i in op.inputs)]
        if not users:
            skipped[index] = "no operator reads it"
            continue
        for p in users:
            consumers.setdefault(p, []).append(index)
    if not consumers:
        return bytes(buffer), skipped
    code = _decode_code(model)
    ancillary_tensors = {}

    def add_buffer(data):
        b = schema.BufferT()
        b.data = np.frombuffer(bytes(data), np.uint8)
        model.buffers.append(b)
        return len(model.buffers) - 1

    originals = {}
    for position in sorted(consumers, reverse=True):
        consumer, inputs, outputs_ = graph.operators[position], [], []
        for index in consumers[position]:
            original = originals.setdefault(index, copy.deepcopy(graph.tensors[index]))
            name = bytes(original.name or b"")
            encoded, ancillary = encodings[index]
            anc = ancillary_tensors.get(bytes(ancillary))
            if anc is None:
                anc = _new_tensor(graph, name + b"_ancillary", schema.TensorType.UINT8, [len(ancillary)],
                                  add_buffer(ancillary))
                ancillary_tensors[bytes(ancillary)] = anc
            decoded = copy.deepcopy(original)
            decoded.name, decoded.buffer = name + b"_decoded", 0
            graph.tensors.append(decoded)
            out = len(graph.tensors) - 1
            inputs += [index, anc]
            outputs_.append(out)
            consumer.inputs = [out if int(i) == index else int(i) for i in consumer.inputs]
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, inputs, outputs_
        graph.operators.insert(position, op)
    for index in originals:
        tensor = graph.tensors[index]
        encoded = encodings[index][0]
        tensor.type, tensor.shape, tensor.shapeSignature = schema.TensorType.UINT8, [len(encoded)], None
        tensor.buffer = add_buffer(encoded)
    _dedupe_buffers(model, [m.buffer for m in model.metadata or []])
    return flatbuffer._serialize(model, len(buffer), align=True), skipped


def compress(model, buffer):
    """(compressed flatbuffer, [CompressionReport]) of an int8 model: every quantized int8 weight
    tensor with at most 128 levels per channel whose LUT is smaller than its int8 bytes LUT-encoded
    (:func:`pack`) and decoded at run time
    by TFLM's DECODE op (:func:`insert_decodes`, TFLM's compressor's format), then decoded back
    with :func:`unpack` and compared with the int8 weights."""
    plans = _plan(model, buffer)
    reports = [p[0] for p in plans]
    encodings = {}
    for report, tensor, axis in plans:
        if tensor is not None:
            encodings[tensor.tensor_index] = pack(tensor.values, axis, report.bits)
    if not encodings:
        return bytes(buffer), reports
    out, skipped = insert_decodes(bytes(buffer), encodings)
    pairs = decode_pairs(out)
    for report, tensor, axis in plans:
        if tensor is None:
            continue
        if tensor.tensor_index in skipped:
            report.note = "not compressed: " + skipped[tensor.tensor_index]
            continue
        encoded, ancillary, shape = pairs[tensor.name]
        if shape != tuple(tensor.values.shape) or not np.array_equal(unpack(encoded, ancillary, shape),
                                                                     tensor.values):
            raise RuntimeError(f"to_tflite(target='tflm'): tensor {tensor.name!r} does not decode back "
                               "to its int8 weights")
        report.compressed = True
        report.index_bytes, report.table_bytes = len(encoded), len(ancillary)
        report.stored_bytes = len(encoded) + len(ancillary)
    return out, reports


def lut_layer_reports(layers, compression):
    """The LayerReports with stored bytes of the LUT-compressed kernels: packed indices plus the
    ancillary tensor (header and value tables) plus the float32 scales still stored."""
    lut = {}
    for r in compression:
        if r.compressed:
            lut[r.layer] = lut.get(r.layer, 0) + r.index_bytes + r.table_bytes
    out = []
    for r in layers:
        if r.layer in lut:
            scale_bytes = r.stored_bytes - r.weight_bytes  # 4 bytes per float32 TFLite scale
            r = dataclasses.replace(r, storage="lut", weight_bytes=lut[r.layer],
                                    stored_bytes=lut[r.layer] + scale_bytes)
        out.append(r)
    return out


def finish(model, base, representative_data, verify_data=None, verify_labels=None):
    """Turn the int8 ExportResult of target 'litert' into the TFLM one: compress, measure the
    arena, check the compressed model decodes bit-identically in TFLM, verify if asked."""
    int8_model = bytes(base.flatbuffer)
    compressed, reports = compress(model, int8_model)
    probe_q = int8.probe(int8_model, representative_data)
    if any(r.compressed for r in reports):
        a, b = tflm_predict_int8(compressed, probe_q), tflm_predict_int8(int8_model, probe_q)
        if not np.array_equal(a, b):
            raise RuntimeError("to_tflite(target='tflm'): the compressed model's TFLM outputs differ from "
                               "the uncompressed model's on the representative data")
    notes = list(base.notes)
    arena = arena_used(compressed, probe_q[0])
    arena_plain = arena_used(int8_model, probe_q[0]) if compressed != int8_model else arena
    if arena is None:
        notes.append("TFLM arena size could not be read from the runtime's allocation report")
    base.layers = lut_layer_reports(base.layers, reports)
    result = TflmExportResult(base, compressed, int8_model, reports, arena, arena_plain,
                              ops_of(compressed), notes)
    if verify_data is not None:
        result.verification = verify(model, result, verify_data, verify_labels)
    return result


def verify(model, result, x, labels=None):
    """TFLM (compressed) vs TFLM (uncompressed) vs LiteRT BUILTIN_REF on the int8 outputs, and
    TFLM vs Keras top-1 agreement."""
    x = np.asarray(x)
    x = x.astype(np.float32) if x.dtype.kind == "f" else x
    xq = int8.model_input(result.uncompressed, x)
    tflm_c = tflm_predict_int8(result.flatbuffer, xq)
    tflm_u = tflm_predict_int8(result.uncompressed, xq) if result.flatbuffer != result.uncompressed else tflm_c
    ref = litert_int8_outputs(result.uncompressed, xq, kernels="ref")
    out_scale, out_zero = int8.output_quantization(result.uncompressed)
    keras_out = keras_outputs(model, x)
    report = agreement(keras_out.reshape(len(x), -1),
                       (tflm_c.astype(np.float32) - out_zero) * out_scale, labels)
    report["tflm_compressed_equals_uncompressed"] = bool(np.array_equal(tflm_c, tflm_u))
    report["tflm_equals_litert_ref"] = bool(np.array_equal(tflm_c, ref))
    diff = np.abs(tflm_c.astype(np.int32) - ref)
    report["max_int8_diff_litert_ref"] = int(diff.max())
    report["int8_outputs_differing_litert_ref"] = int(np.count_nonzero(diff))
    report["int8_outputs"] = int(diff.size)
    if diff.any():
        result.notes.append(
            f"TFLM and LiteRT BUILTIN_REF int8 outputs differ by up to {int(diff.max())} on "
            f"{int(np.count_nonzero(diff))} of {diff.size} values (rounding ties: on per-channel "
            "FULLY_CONNECTED, TFLM's values follow gemmlowp's two roundings, SaturatingRoundingDoublingHighMul "
            "then RoundingDivideByPOT, LiteRT 2.3's reference kernel a single rounding).")
    return report
