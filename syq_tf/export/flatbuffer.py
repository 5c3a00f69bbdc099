"""Read the weight tensors of a TFLite flatbuffer (what was really stored, not what we meant)."""

import dataclasses
import functools
import struct

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

from syq_tf.export.codebook import SUB_BYTE, pack_bits, unpack_bits
from syq_tf.errors import MalformedModelError

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
NUMPY_TYPES = {"INT8": np.int8, "INT32": np.int32, "FLOAT32": np.float32, "UINT8": np.uint8,
               "INT16": np.int16, "INT64": np.int64}
# op -> input positions of its constant weight tensors. The fused LSTM has eight: input_to_{input,
# forget, cell, output}_weights (1-4) and recurrent_to_{input, forget, cell, output}_weights (5-8),
# each [units, in] -- Keras' kernel [in, 4 units] split per gate (gate order i, f, c, o) and transposed.
WEIGHT_OPS = {
    "CONV_2D": (1,),
    "DEPTHWISE_CONV_2D": (1,),
    "FULLY_CONNECTED": (1,),
    "CONV_3D": (1,),  # float in LiteRT (no int8 kernel): the converter keeps its filter float32
    "TRANSPOSE_CONV": (1,),  # inputs (output_shape, weights [c_out, kh, kw, c_in], input, bias)
    "GATHER": (0,),  # an Embedding's table (constant params; GATHERs of shapes have no constant params)
    "UNIDIRECTIONAL_SEQUENCE_LSTM": (1, 2, 3, 4, 5, 6, 7, 8),
}
# (activation input, bias) positions of the single-weight ops whose inputs are not (input, weights, bias).
_IO_POSITIONS = {"TRANSPOSE_CONV": (2, 3)}


def io_positions(name):
    """(activation input, bias) input positions of a single-weight op ``name``."""
    return _IO_POSITIONS.get(name, (0, 2))


def _bias_position(model, op):
    """The input position of a single-weight op's bias, None for other ops or without a bias."""
    name = _op_name(model, op)
    position = io_positions(name)[1]
    if WEIGHT_OPS.get(name) != (1,) or len(op.inputs) <= position or op.inputs[position] < 0:
        return None
    return position


@dataclasses.dataclass
class WeightTensor:
    op: str
    name: str
    dtype: str
    shape: tuple
    values: np.ndarray  # stored values (int8 for a full-integer model; INT4 / INT2 decoded to int8)
    scales: np.ndarray  # per-tensor (1 value) or per-channel
    zero_points: np.ndarray
    quantized_dimension: int
    input_scale: float = float("nan")  # quantization of the op's activation input
    input_zero_point: int = 0
    tensor_index: int = -1  # in the first subgraph
    bias_index: int = -1  # the op's bias tensor, -1 if none (or for multi-weight ops)
    op_index: int = -1  # position of the op in the first subgraph
    position: int = 1  # which input of the op this weight is
    stored_bytes: int = 0  # bytes of the tensor's data in the flatbuffer (INT4: two values a byte, INT2: four)
    dequantized: bool = False  # a constant INT8 tensor turned into the op's float weight by DEQUANTIZE


# Limits of the readers (and of syq_tf.kernels' runner, which loads through load_object_tree): a
# model file is untrusted input, and a flatbuffer can make its object tree far larger than the file
# (many offsets to one shared table, many tensors naming one buffer). Beyond them: MalformedModelError.
MAX_FILE_BYTES = (1 << 31) - 1  # flatbuffers' own limit (32-bit offsets)
MAX_TABLES = 200_000  # tables the object tree may hold (tensors, ops, buffers, quantization, ...)
TABLE_BYTES = 4  # ...and at most one per 4 bytes of the file (+64): more needs shared offsets
DATA_FACTOR, DATA_BYTES = 4, 64 << 20  # tensor data a reader copies: <= 4 x file size + 64 MiB


def data_budget(buffer):
    """Bytes of tensor data a reader may materialize for ``buffer`` (tensors can share buffers,
    so this bounds what one buffer listed many times can cost)."""
    return DATA_FACTOR * len(buffer) + DATA_BYTES


def reader(fn):
    """Readers of untrusted files: any inconsistency (an index out of range, a missing table, data of
    the wrong size) becomes a MalformedModelError (a ValueError) naming the problem, never another
    exception. ``UnsupportedOp`` (syq_tf.kernels, a NotImplementedError) passes: a well-formed file
    with an op the runner does not implement is a refusal, not a malformed file."""

    @functools.wraps(fn)
    def read(buffer, *args, **kwargs):
        try:
            return fn(buffer, *args, **kwargs)
        except (MalformedModelError, NotImplementedError):
            raise
        except ValueError as err:
            raise MalformedModelError(f"malformed TFLite flatbuffer ({fn.__name__}): {err}") from None
        except (IndexError, KeyError, TypeError, AttributeError, struct.error, OverflowError,
                ZeroDivisionError, FloatingPointError, RecursionError, MemoryError) as err:
            raise MalformedModelError(f"malformed TFLite flatbuffer ({fn.__name__}): {type(err).__name__}: "
                                      f"{err}") from None

    return read


def check_limits(buffer, raw_model):
    """Refuse (MalformedModelError) a flatbuffer whose object tree is too large to unpack: more
    than MAX_TABLES tables, or more than one table per TABLE_BYTES bytes of the file (only offsets
    shared between entries produce that). Reads vector lengths only and stops at the limit."""
    limit = min(MAX_TABLES, len(buffer) // TABLE_BYTES + 64)
    count = 0

    def add(n, where):
        nonlocal count
        count += int(n)
        if count > limit:
            raise MalformedModelError(
                f"malformed TFLite flatbuffer: {where} brings the tables it lists above {limit} (a "
                f"{len(buffer)}-byte file holds at most one per {TABLE_BYTES} bytes, and at most "
                f"MAX_TABLES={MAX_TABLES}); refused before unpacking")

    m = raw_model
    add(m.OperatorCodesLength() + m.BuffersLength() + m.MetadataLength() + m.SubgraphsLength()
        + m.SignatureDefsLength() + getattr(m, "ExternalBuffersLength", lambda: 0)()
        + getattr(m, "ExternalBufferGroupsLength", lambda: 0)(), "the model's vectors")
    for i in range(m.SignatureDefsLength()):
        sig = m.SignatureDefs(i)
        if sig is not None:
            add(sig.InputsLength() + sig.OutputsLength(), f"signature def {i}")
    subgraphs = [m.Subgraphs(i) for i in range(m.SubgraphsLength())]
    for i, sub in enumerate(subgraphs):  # a tensor: itself, quantization, details; an op: itself, 2 options
        if sub is not None:
            add(3 * sub.TensorsLength() + 3 * sub.OperatorsLength(),
                f"subgraph {i} ({sub.TensorsLength()} tensors, {sub.OperatorsLength()} operators)")
    for i, sub in enumerate(subgraphs):
        for k in range(0 if sub is None else sub.TensorsLength()):
            tensor = sub.Tensors(k)
            if tensor is None:
                continue
            add(tensor.VariantTensorsLength(), f"tensor {k} of subgraph {i}")
            sparsity = tensor.Sparsity()
            if sparsity is not None:
                add(1 + 4 * sparsity.DimMetadataLength(), f"tensor {k} of subgraph {i} (sparsity)")


def _load(buffer):
    if not isinstance(buffer, (bytes, bytearray)) or len(buffer) < 8:
        raise MalformedModelError("not a TFLite flatbuffer: fewer than 8 bytes")
    if bytes(buffer[4:8]) != b"TFL3":
        raise MalformedModelError("not a TFLite flatbuffer: file identifier is not 'TFL3'")
    return load_object_tree(buffer, schema)


def load_object_tree(buffer, schema_module):
    """``schema_module.ModelT`` of a flatbuffer (tensorflow's or ai_edge_litert's generated schema)
    after :func:`check_limits`; every failure is a MalformedModelError."""
    if len(buffer) > MAX_FILE_BYTES:
        raise MalformedModelError(f"not a TFLite flatbuffer: {len(buffer)} bytes, above the flatbuffer limit "
                                  f"of {MAX_FILE_BYTES}")
    data = bytearray(buffer)
    try:
        raw = schema_module.Model.GetRootAsModel(data, 0)
        check_limits(data, raw)
        return schema_module.ModelT.InitFromObj(raw)
    except MalformedModelError:
        raise
    except Exception as err:  # noqa: BLE001  (flatbuffers raises assorted errors on malformed input)
        raise MalformedModelError(f"malformed TFLite flatbuffer: {type(err).__name__}: {err}") from None


def read(buffer):
    """The object tree (``schema.ModelT``) of an untrusted flatbuffer; ValueError if malformed."""
    return _load(buffer)


def numpy_type(tensor):
    """The numpy dtype of a tensor of a model read by :func:`read` (None for types numpy has none of)."""
    return NUMPY_TYPES.get(_TYPES.get(tensor.type))


def op_name(model, op):
    """Builtin (or custom) op name of an operator of a model read by :func:`read`."""
    return _op_name(model, op)


@reader
def op_names(buffer):
    """Builtin op names of the first subgraph, in execution order."""
    model = _load(buffer)
    return [_op_name(model, op) for op in model.subgraphs[0].operators]


@reader
def io_quantization(buffer, which="input"):
    """(scale, zero point) of the first subgraph's first ``which`` ("input" / "output") tensor."""
    model = _load(buffer)
    graph = model.subgraphs[0]
    index = (graph.inputs if which == "input" else graph.outputs)[0]
    q = graph.tensors[index].quantization
    if q is None or q.scale is None or not len(q.scale) or q.zeroPoint is None or not len(q.zeroPoint):
        raise MalformedModelError(f"the model's {which} tensor {index} is not quantized (type {io_type(buffer, which)})")
    scale, zero = float(q.scale[0]), int(q.zeroPoint[0])
    if not (np.isfinite(scale) and scale > 0) or not -128 <= zero <= 127:
        raise MalformedModelError(f"the model's {which} tensor {index}: scale {scale}, zero point {zero} (finite > 0 "
                                  "and -128..127 expected)")
    return scale, zero


@reader
def io_type(buffer, which="input"):
    """TFLite type name ("INT8", "INT32", "FLOAT32", ...) of the first ``which`` tensor."""
    model = _load(buffer)
    graph = model.subgraphs[0]
    index = (graph.inputs if which == "input" else graph.outputs)[0]
    return _TYPES.get(graph.tensors[index].type, str(graph.tensors[index].type))


def _op_name(model, op):
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    if builtin == schema.BuiltinOperator.CUSTOM:
        return (code.customCode or b"CUSTOM").decode()
    return _OP_NAMES.get(builtin, str(builtin))


@reader
def weight_tensors(buffer):
    """Constant weight tensors of the ops in WEIGHT_OPS (one entry per weight input)."""
    model = _load(buffer)
    graph = model.subgraphs[0]
    dequantize = _dequantized_constants(model, graph)
    found, budget = [], data_budget(buffer)
    for op_index, op in enumerate(graph.operators):
        name = _op_name(model, op)
        if name not in WEIGHT_OPS:
            continue
        for position in WEIGHT_OPS[name]:
            if position >= len(op.inputs) or op.inputs[position] < 0:
                continue
            weight = _weight_tensor(model, graph, op, name, position, dequantize.get(int(op.inputs[position])))
            if weight is not None:
                budget -= weight.stored_bytes
                if budget < 0:
                    raise MalformedModelError(
                        f"op {op_index} {name}: the weight tensors read so far exceed {data_budget(buffer)} "
                        f"bytes (4 x the {len(buffer)}-byte file + 64 MiB: tensors sharing buffers)")
                weight.op_index = op_index
                found.append(weight)
    return found


def _dequantized_constants(model, graph):
    """{float tensor index: INT8 constant index} for DEQUANTIZE ops that turn a constant into a weight."""
    out = {}
    for op in graph.operators:
        if _op_name(model, op) != "DEQUANTIZE" or len(op.inputs) != 1 or len(op.outputs) != 1:
            continue
        source = graph.tensors[int(op.inputs[0])]
        if source.type == schema.TensorType.INT8 and model.buffers[source.buffer].data is not None:
            out[int(op.outputs[0])] = int(op.inputs[0])
    return out


def _shape(tensor, label):
    """The tensor's shape as a tuple of non-negative ints (MalformedModelError otherwise)."""
    shape = () if tensor.shape is None else tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise MalformedModelError(f"tensor {label!r}: shape {shape} has a negative dimension")
    return shape


def _weight_tensor(model, graph, op, name, position, dequantized_from=None):
    index = int(op.inputs[position])
    if dequantized_from is not None:  # int8 storage, DEQUANTIZE to the float weight at run time
        index = dequantized_from
    tensor = graph.tensors[index]
    data = model.buffers[tensor.buffer].data
    if data is None:  # not a constant (weights computed at run time)
        return None
    dtype = _TYPES.get(tensor.type, str(tensor.type))
    label = tensor.name.decode(errors="replace") if isinstance(tensor.name, bytes) else str(tensor.name)
    shape = _shape(tensor, label)
    raw = bytes(bytearray(data))
    if dtype in SUB_BYTE:
        try:
            values = unpack_bits(raw, SUB_BYTE[dtype].bits, int(np.prod(shape))).reshape(shape)
        except ValueError as err:
            raise MalformedModelError(f"{name} weight tensor {label!r}: {err}") from None
    elif dtype not in NUMPY_TYPES:
        raise MalformedModelError(f"{name} weight tensor {index} {label!r} has unsupported type {dtype}")
    else:
        size = np.dtype(NUMPY_TYPES[dtype]).itemsize
        if len(raw) != size * int(np.prod(shape)):
            raise MalformedModelError(f"{name} weight tensor {index} {label!r}: {len(raw)} bytes of data for "
                                      f"shape {shape} of {dtype} (needs {size * int(np.prod(shape))})")
        values = np.frombuffer(raw, NUMPY_TYPES[dtype]).reshape(shape)
    act = graph.tensors[op.inputs[io_positions(name)[0]]].quantization
    act_scale = float(act.scale[0]) if act is not None and act.scale is not None and len(act.scale) else float("nan")
    act_zero = int(act.zeroPoint[0]) if act is not None and act.zeroPoint is not None and len(act.zeroPoint) else 0
    quant = tensor.quantization
    scales = np.asarray(quant.scale if quant is not None and quant.scale is not None else [], np.float32)
    zero_points = np.asarray(quant.zeroPoint if quant is not None and quant.zeroPoint is not None else [], np.int64)
    axis = int(quant.quantizedDimension) if quant is not None else 0
    if scales.size > 1 and not (0 <= axis < len(shape) and shape[axis] == scales.size):
        raise MalformedModelError(f"{name} weight tensor {index} {label!r}: {scales.size} scales along quantized "
                                  f"dimension {axis} of shape {shape}")
    bias = _bias_position(model, op)
    return WeightTensor(
        op=name,
        name=label,
        dtype=dtype,
        shape=shape,
        values=values,
        scales=scales,
        zero_points=zero_points,
        quantized_dimension=axis,
        input_scale=act_scale,
        input_zero_point=act_zero,
        tensor_index=index,
        bias_index=-1 if bias is None else int(op.inputs[bias]),
        position=position,
        stored_bytes=len(raw),
        dequantized=dequantized_from is not None,
    )


@reader
def bias_tensors(buffer):
    """{tensor index: int32 values} of the constant biases of weight ops."""
    model = _load(buffer)
    graph = model.subgraphs[0]
    out, budget = {}, data_budget(buffer)
    for op in graph.operators:
        position = _bias_position(model, op)
        if position is None:
            continue
        index = int(op.inputs[position])
        tensor = graph.tensors[index]
        data = model.buffers[tensor.buffer].data
        budget -= 0 if data is None or index in out else len(data)
        if budget < 0:
            raise MalformedModelError(f"the bias tensors read exceed {data_budget(buffer)} bytes (4 x the file "
                                      "size + 64 MiB: tensors sharing buffers)")
        if data is not None and tensor.type == schema.TensorType.INT32:
            out[index] = np.frombuffer(bytes(bytearray(data)), np.int32).copy()
    return out


def _use_counts(model):
    """(op inputs per tensor index of the first subgraph, tensors per buffer over all subgraphs)."""
    tensor_users, buffer_users = {}, {}
    for op in model.subgraphs[0].operators:
        for i in op.inputs:
            tensor_users[int(i)] = tensor_users.get(int(i), 0) + 1
    for sub in model.subgraphs:
        for t in sub.tensors:
            buffer_users[t.buffer] = buffer_users.get(t.buffer, 0) + 1
    return tensor_users, buffer_users


def _store(model, buffer_users, tensor, data):
    """Put ``data`` (uint8) in the tensor's own buffer, or in a new one if the buffer is shared
    (the converter shares buffers between identical constants)."""
    if buffer_users.get(tensor.buffer, 0) == 1 and tensor.buffer > 0:
        model.buffers[tensor.buffer].data = data
        return
    b = schema.BufferT()
    b.data = data
    model.buffers.append(b)
    buffer_users[tensor.buffer] -= 1
    tensor.buffer = len(model.buffers) - 1
    buffer_users[tensor.buffer] = 1


def _serialize(model, size_hint, align=False):
    """The flatbuffer of a ``schema.ModelT``; ``align``: every buffer's data starts at a multiple of
    DATA_ALIGNMENT bytes of the file (the schema's ``force_align: 16``, which the Python flatbuffers
    runtime ignores; the converter and TFLM's tools honour it, and MCU kernels may rely on it)."""
    import flatbuffers  # noqa: PLC0415  (the runtime of the generated schema; installed with tensorflow)

    if align:
        model.buffers = [_AlignedBuffer(b) for b in model.buffers]
    builder = flatbuffers.Builder(max(1024, size_hint))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


DATA_ALIGNMENT = 16  # schema.fbs: Buffer.data (force_align: 16)


class _AlignedBuffer(schema.BufferT):
    """A BufferT whose data vector is written aligned to DATA_ALIGNMENT, one whole-buffer copy."""

    def __init__(self, source):
        super().__init__()
        self.data, self.offset, self.size = source.data, source.offset, source.size

    def Pack(self, builder):  # noqa: N802  (the generated object API's name)
        data = None
        if self.data is not None:
            raw = np.ascontiguousarray(self.data, np.uint8).tobytes()
            builder.StartVector(1, len(raw), DATA_ALIGNMENT)
            builder.head -= len(raw)
            builder.Bytes[builder.head : builder.head + len(raw)] = raw
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        schema.BufferAddOffset(builder, self.offset)
        schema.BufferAddSize(builder, self.size)
        return schema.BufferEnd(builder)


def rewrite_weights(buffer, updates, packed=None):
    """A copy of the flatbuffer with new integer weights and per-channel scales for some weight
    tensors, and their int32 biases re-expressed in the new scales.

    ``updates``: ``{tensor_index: (int8 values, float32 scales, int32 bias or None)}``. New data
    goes into new buffers (the converter may share buffers between identical constants); a weight
    or bias tensor used by more than one op is refused. ``packed``: ``{tensor_index:
    StorageForm}`` (:data:`syq_tf.export.codebook.STORAGE`) for tensors stored in a sub-byte type
    (INT4, INT2: :func:`~syq_tf.export.codebook.pack_bits`), their op code's version raised to the
    one that announces it; the others are stored as int8.
    """
    packed = packed or {}
    model = _load(buffer)
    graph = model.subgraphs[0]
    users, buffer_users = _use_counts(model)

    def store(tensor, array):
        _store(model, buffer_users, tensor, np.frombuffer(np.ascontiguousarray(array).tobytes(), np.uint8))

    for op in graph.operators:
        positions = WEIGHT_OPS.get(_op_name(model, op), ())
        x_at, b_at = io_positions(_op_name(model, op))
        for position in positions:
            index = int(op.inputs[position]) if position < len(op.inputs) else -1
            if index not in updates:
                continue
            values, scales, bias = updates[index]
            if bias is not None and positions != (1,):
                raise ValueError(f"tensor {graph.tensors[index].name!r}: bias rewrite needs a single-weight op")
            for t in [index] + ([int(op.inputs[b_at])] if bias is not None else []):
                if users.get(t, 0) > 1:
                    raise ValueError(f"tensor {graph.tensors[t].name!r} is shared by several ops; not rewritten")
            weight = graph.tensors[index]
            form = packed.get(index)
            if form is not None:
                name = _op_name(model, op)
                if not form.takes(name):
                    raise ValueError(f"tensor {weight.name!r}: op {name} takes no {form.tflite_type} weights")
                weight.type = getattr(schema.TensorType, form.tflite_type)
                store(weight, np.frombuffer(pack_bits(values, form.bits), np.uint8))
                code = model.operatorCodes[op.opcodeIndex]
                code.version = max(int(code.version), form.op_version(name))
            else:
                store(weight, values.astype(np.int8))
            weight.quantization.scale = [float(s) for s in scales]
            weight.quantization.zeroPoint = [0] * len(scales)
            if bias is not None:
                b = graph.tensors[int(op.inputs[b_at])]
                in_scale = float(graph.tensors[int(op.inputs[x_at])].quantization.scale[0])
                store(b, bias.astype(np.int32))
                b.quantization.scale = [float(np.float32(in_scale) * np.float32(s)) for s in scales]
                b.quantization.zeroPoint = [0] * len(scales)
    return _serialize(model, len(buffer))


# TFLite op version of DEQUANTIZE with a per-channel (or per-tensor) INT8 input.
DEQUANTIZE_INT8_VERSION = 5


def _operator_code(model, builtin, version):
    """Index of ``builtin``'s operator code in ``model`` (added if missing), its version raised to at
    least ``version``."""
    index = next((i for i, c in enumerate(model.operatorCodes)
                  if max(c.builtinCode, c.deprecatedBuiltinCode) == builtin), None)
    if index is None:
        code = schema.OperatorCodeT()
        code.builtinCode = builtin
        code.deprecatedBuiltinCode = min(builtin, 127)  # the schema's placeholder above 127
        code.version = version
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1
    code = model.operatorCodes[index]
    code.version = max(int(code.version), version)
    return index


def dequantize_weights(buffer, updates):
    """A copy of a float flatbuffer in which some float weight tensors are stored as int8: for each
    ``{tensor_index: (int8 values, float32 scales, quantized dimension)}`` a constant INT8 tensor
    (symmetric, zero points 0, one scale per channel along the dimension) is added, and a DEQUANTIZE
    op placed first in the graph writes the float weight from it (TFLite evaluates a DEQUANTIZE of a
    constant once, when the interpreter prepares). The op that used the float weight is unchanged,
    so it computes in float with weights ``int8 x scale``; the float data is dropped."""
    model = _load(buffer)
    graph = model.subgraphs[0]
    _, buffer_users = _use_counts(model)
    code_index = _operator_code(model, schema.BuiltinOperator.DEQUANTIZE, DEQUANTIZE_INT8_VERSION)
    if len(model.buffers) == 0 or model.buffers[0].data is not None:
        raise ValueError("dequantize_weights: buffer 0 is not the empty buffer")
    new_ops = []
    for index, (values, scales, axis) in sorted(updates.items()):
        weight = graph.tensors[index]
        if weight.type != schema.TensorType.FLOAT32 or model.buffers[weight.buffer].data is None:
            raise ValueError(f"dequantize_weights: tensor {weight.name!r} is not a constant float32 tensor")
        values = np.asarray(values)
        if values.dtype != np.int8 or tuple(values.shape) != tuple(weight.shape):
            raise ValueError(f"dequantize_weights: tensor {weight.name!r}: int8 values of shape {values.shape} "
                             f"for a tensor of shape {tuple(weight.shape)}")
        scales = np.asarray(scales, np.float32).ravel()
        if scales.size not in (1, values.shape[axis]) or not np.all(scales > 0):
            raise ValueError(f"dequantize_weights: tensor {weight.name!r}: {scales.size} scales for "
                             f"{values.shape[axis]} channels (all must be > 0)")
        data = schema.BufferT()
        data.data = np.frombuffer(np.ascontiguousarray(values).tobytes(), np.uint8)
        model.buffers.append(data)
        quant = schema.QuantizationParametersT()
        quant.scale = [float(v) for v in scales]
        quant.zeroPoint = [0] * scales.size
        quant.quantizedDimension = int(axis) if scales.size > 1 else 0
        stored = schema.TensorT()
        stored.shape = list(weight.shape)
        stored.type = schema.TensorType.INT8
        stored.buffer = len(model.buffers) - 1
        stored.name = bytes(weight.name) + b"/int8"
        stored.quantization = quant
        graph.tensors.append(stored)
        buffer_users[weight.buffer] -= 1
        if buffer_users[weight.buffer] == 0:  # nobody else reads the float data: drop it
            model.buffers[weight.buffer].data = None
        weight.buffer = 0  # now written by the DEQUANTIZE op
        op = schema.OperatorT()
        op.opcodeIndex = code_index
        op.inputs = [len(graph.tensors) - 1]
        op.outputs = [index]
        op.builtinOptionsType = schema.BuiltinOptions.DequantizeOptions
        op.builtinOptions = schema.DequantizeOptionsT()
        new_ops.append(op)
    graph.operators = new_ops + list(graph.operators)
    return _serialize(model, len(buffer))


@reader
def consistent_biases(buffer, rtol=1e-5):
    """Make every int32 bias of an int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED /
    TRANSPOSE_CONV mean what the kernels compute with: TFLite's int8 kernels add the int32 bias as if its scale were
    ``input scale x weight scale`` (per channel) and ignore the bias tensor's own scale. The
    converter can store a bias at the scale its input had before a later pass changed it (seen on
    this stack: a FULLY_CONNECTED after MINIMUM + FakeQuant of a 2-bit activation grid, bias scale
    1/85 of input x weight, so the layer added 85x its bias). Such a bias is re-expressed:
    ``round(b x bias_scale / (input_scale x weight_scale))`` with the scale set to match.

    Returns ``(flatbuffer, fixed)``, ``fixed`` a list of ``(tensor name, factor)`` of the non-zero
    biases re-expressed, factor = old bias scale / (input scale x weight scale) (an all-zero bias
    only gets its scale set); the flatbuffer is returned unchanged when no bias scale is off.
    """
    model = _load(buffer)
    graph = model.subgraphs[0]
    fixed, rewritten = [], False
    tensor_users, buffer_users = _use_counts(model)
    for op in graph.operators:
        b_at = _bias_position(model, op)
        if b_at is None:
            continue
        x_at = io_positions(_op_name(model, op))[0]
        x, w, b = (graph.tensors[int(op.inputs[i])] for i in (x_at, 1, b_at))
        if b.type != schema.TensorType.INT32 or x.type != schema.TensorType.INT8:
            continue
        data = model.buffers[b.buffer].data
        if data is None or b.quantization is None or b.quantization.scale is None:
            continue
        s_in = np.float64(x.quantization.scale[0])
        s_w = np.asarray(w.quantization.scale, np.float64)
        s_b = np.asarray(b.quantization.scale, np.float64)
        values = np.frombuffer(bytes(bytearray(data)), np.int32).astype(np.float64)
        expected = s_in * (s_w if s_w.size > 1 else np.full(values.size, s_w[0]))
        s_b = s_b if s_b.size > 1 else np.full(values.size, s_b[0])
        ratio = s_b / expected
        if np.all(np.abs(ratio - 1.0) <= rtol):
            continue
        if np.any(values):  # an all-zero bias only gets its scale corrected
            name = b.name.decode(errors="replace")
            if tensor_users.get(int(op.inputs[b_at]), 0) > 1:
                raise ValueError(f"bias {name!r} is used by several ops and stored at the wrong scale for one "
                                 "of them; cannot re-express it")
            new = np.clip(np.round(values * ratio), -(2**31), 2**31 - 1).astype(np.int32)
            _store(model, buffer_users, b, np.frombuffer(new.tobytes(), np.uint8))
            fixed.append((name, float(np.median(ratio))))
        b.quantization.scale = [float(v) for v in expected.astype(np.float32)]
        b.quantization.zeroPoint = [0] * values.size
        rewritten = True
    if not rewritten:
        return buffer, []
    return _serialize(model, len(buffer)), fixed


# fused activations that let no negative value through
_NON_NEGATIVE_ACTIVATIONS = (schema.ActivationFunctionType.RELU, schema.ActivationFunctionType.RELU6)


@reader
def lower_biases_for_two_roundings(buffer):
    """Lower by one the int32 bias of every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED /
    TRANSPOSE_CONV whose int8 output holds no negative value (zero point -128, or a fused ReLU /
    ReLU6), for runtimes that requantize with two roundings (TFLite Micro, LiteRT's builtin and
    reference convolutions).

    Such a runtime first rounds ``a * M`` to an integer (a rounding doubling high multiply by the
    output multiplier ``M * 2**-r``, M in [0.5, 1), ``a`` the accumulator with its bias), then
    shifts right by ``r`` with rounding: an ``a * M`` within 0.5 below a rounding boundary
    (``(k + 1/2) * 2**r``) lands on it and rounds up, where one rounding (Keras, XNNPACK) goes down.
    With the bias one lower, ``a * M`` moves down by M: the values that rounded up wrongly round down,
    and only those within ``M - 1/2`` (less than 0.5) above a boundary now round down wrongly. Below
    zero the boundaries are mirrored and the error would grow, hence only outputs that clamp negative
    values to zero. A runtime that rounds once sees every such pre-activation lowered by ``M * 2**-r``
    output steps (about one accumulator unit).

    Returns ``(flatbuffer, lowered)``, ``lowered`` the tensor indices of the biases changed (a bias
    tensor read by several ops is left alone; one whose buffer other tensors share gets its own); the
    flatbuffer is returned unchanged if none.
    """
    model = _load(buffer)
    graph = model.subgraphs[0]
    tensor_users, buffer_users = _use_counts(model)
    lowered = []
    for op in graph.operators:
        b_at = _bias_position(model, op)
        if b_at is None:
            continue
        out, b = graph.tensors[int(op.outputs[0])], graph.tensors[int(op.inputs[b_at])]
        data = model.buffers[b.buffer].data if 0 < b.buffer < len(model.buffers) else None
        if out.type != schema.TensorType.INT8 or b.type != schema.TensorType.INT32 or data is None \
                or tensor_users.get(int(op.inputs[b_at]), 0) != 1:
            continue
        q = out.quantization
        floor_at_zero = q is not None and q.zeroPoint is not None and len(q.zeroPoint) == 1 \
            and int(q.zeroPoint[0]) == -128
        fused = getattr(op.builtinOptions, "fusedActivationFunction", None)
        if not (floor_at_zero or fused in _NON_NEGATIVE_ACTIVATIONS):
            continue
        values = np.frombuffer(bytes(bytearray(data)), np.int32).astype(np.int64) - 1
        new = np.clip(values, -(2**31), 2**31 - 1).astype(np.int32)
        _store(model, buffer_users, b, np.frombuffer(new.tobytes(), np.uint8))
        lowered.append(int(op.inputs[b_at]))
    if not lowered:
        return buffer, []
    return _serialize(model, len(buffer)), lowered


# int8 ops whose requantization multiplier Prepare computes from their own output tensor's scale: such an
# op rounds straight onto whatever scale its output has.
REQUANTIZING_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "ADD", "SUB",
                              "MUL", "MEAN", "QUANTIZE"})
# TFLite op version of a QUANTIZE with an int8 output (an int8 -> int8 requantization).
QUANTIZE_INT8_VERSION = 2


def _matching_grid(tensor, grids):
    """(step, m) of the fine-form grid whose scale an int8 tensor (zero point -128) has, or None."""
    q = tensor.quantization
    if tensor.type != schema.TensorType.INT8 or q is None or q.scale is None or len(q.scale) != 1 \
            or q.zeroPoint is None or int(q.zeroPoint[0]) != -128:
        return None
    scale = float(q.scale[0])
    return next((grid for fine, grid in grids.items() if abs(scale - fine) <= 1e-6 * fine), None)


@reader
def round_to_grids(buffer, grids):
    """Restore the rounding to the levels of the activation grids written in their fine form
    (:func:`syq_tf.quantizers._common.fine_grid_scales`; ``grids``: ``{fine scale: (step, m) or None}``).

    The converter computed every tensor of such a grid at its fine scale ``step / m``, so the int32
    biases of the ops reading it lie on a grid ``m`` times finer than at scale ``step``, but the op
    writing it no longer rounds to the levels. Each ``writer -> t -> MINIMUM(t, top) -> u`` of the
    fine form (``writer`` an op that requantizes onto its output's scale, ``t`` read by the MINIMUM
    alone, the MINIMUM's constant the int8 top 127 at ``t``'s scale) becomes ``writer -> t ->
    QUANTIZE -> u``: ``t`` gets the scale ``step`` (the writer rounds to the levels, as in the usual
    form), the QUANTIZE multiplies by ``m`` exactly (its int8 range ends at the top level: the clip).

    Returns ``(flatbuffer, rounded)``, ``rounded`` the number of tensors restored, or ``(buffer,
    None)`` if some grid is not in that pattern (a writer that keeps its input's scale, a tensor read
    by several ops, an op writing a fine scale without the clip) or two grids share a fine scale: the
    caller converts again without the fine form.
    """
    if any(grid is None for grid in grids.values()):
        return buffer, None  # grids of different steps at one fine scale: not told apart
    model = _load(buffer)
    graph = model.subgraphs[0]
    users, _ = _use_counts(model)
    writers = {int(t): op for op in graph.operators for t in op.outputs}
    code_index = _operator_code(model, schema.BuiltinOperator.QUANTIZE, QUANTIZE_INT8_VERSION)

    def top_constant(op, tensor):
        """True if the MINIMUM's second input is the constant int8 top (127) at ``tensor``'s scale."""
        c = graph.tensors[int(op.inputs[1])]
        data = model.buffers[c.buffer].data if c.buffer > 0 else None
        if c.type != schema.TensorType.INT8 or data is None or c.quantization is None or c.quantization.scale is None:
            return False
        values = np.frombuffer(bytes(bytearray(data)), np.int8)
        return bool(values.size and np.all(values == 127)
                    and np.allclose(c.quantization.scale, tensor.quantization.scale, rtol=1e-6))

    rounded, dropped = set(), set()
    for op in graph.operators:
        if _op_name(model, op) != "MINIMUM" or len(op.inputs) != 2:
            continue
        t, u = int(op.inputs[0]), int(op.outputs[0])
        grid = _matching_grid(graph.tensors[t], grids)
        if grid is None or not top_constant(op, graph.tensors[t]):
            continue  # another clip
        writer = writers.get(t)
        if _matching_grid(graph.tensors[u], grids) != grid or writer is None \
                or _op_name(model, writer) not in REQUANTIZING_OPS or users.get(t, 0) != 1 or t in graph.outputs:
            return buffer, None
        step, _ = grid
        graph.tensors[t].quantization.scale = [float(np.float32(step))]
        source = int(writer.inputs[0])
        if _op_name(model, writer) == "QUANTIZE" and _same_quantization(graph.tensors[source], graph.tensors[t]):
            dropped.add(id(writer))  # a requantization onto the levels' own scale: read its input instead
            t = source
        op.opcodeIndex = code_index
        op.inputs = [t]
        op.builtinOptionsType = schema.BuiltinOptions.QuantizeOptions
        op.builtinOptions = schema.QuantizeOptionsT()
        rounded.add(u)
    # no grid left unrounded: an op that requantizes writes no fine scale but through these QUANTIZEs
    # (which may also refuse a tensor whose range is [0, top] by coincidence: the usual form is safe)
    for op in graph.operators:
        if _op_name(model, op) in REQUANTIZING_OPS and id(op) not in dropped and int(op.outputs[0]) not in rounded \
                and _matching_grid(graph.tensors[int(op.outputs[0])], grids) is not None:
            return buffer, None
    if not rounded:
        return buffer, 0
    graph.operators = [op for op in graph.operators if id(op) not in dropped]
    return _serialize(model, len(buffer)), len(rounded)


def _same_quantization(a, b):
    qa, qb = a.quantization, b.quantization
    return (a.type == b.type and qa is not None and qb is not None and qa.scale is not None and qb.scale is not None
            and len(qa.scale) == len(qb.scale) == 1 and np.float32(qa.scale[0]) == np.float32(qb.scale[0])
            and list(qa.zeroPoint) == list(qb.zeroPoint))
