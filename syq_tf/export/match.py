"""Which stored weight tensor of a flatbuffer holds which Keras kernel."""

import dataclasses
import re

import numpy as np
import tensorflow as tf

from syq_tf.export import flatbuffer
from syq_tf.export.codebook import to_tflite_layout
from syq_tf.export.inference import inner_path, is_quantized, leaf, path_of, quantized_value
from syq_tf.models import layer_kernels
from syq_tf.quantizers._common import KERAS

SINGLE_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "CONV_3D", "GATHER", "TRANSPOSE_CONV")


def match_tensor(layer, kernel, tensors, used, attr=None):
    """The stored weight tensor of a Keras kernel: by layer name in the tensor name, else (when the
    converter renamed it, e.g. after folding a BatchNorm) the next unused one of the same size, of
    an op that can hold it (a ``depthwise_kernel`` only a DEPTHWISE_CONV_2D, other kernels only the
    other ops). Weight ops are stored in execution order, which follows the model's layer order."""
    size = int(np.prod(kernel.shape))
    attr = attr or leaf(path_of(kernel)).split(":")[0]
    # Keras 3 names a DepthwiseConv2D's kernel "kernel" (tf_keras "depthwise_kernel")
    depthwise = attr == "depthwise_kernel" or (attr == "kernel" and isinstance(layer, tf.keras.layers.DepthwiseConv2D))
    free = [t for t in tensors if id(t) not in used and t.values.size == size
            and (t.op == "DEPTHWISE_CONV_2D") == depthwise]
    inner = inner_path(path_of(kernel), layer.name)  # "query/kernel:0" for a sublayer's kernel
    sub = inner.rsplit("/", 1)[0] if "/" in inner else ""
    for scopes in ((layer.name, sub), (layer.name,)) if sub else ((layer.name,),):
        for t in free:  # the sublayer's scope under the layer's first, then the layer's
            if any(all(_in_scope(s, part) for s in scopes) for part in t.name.split(";")):
                return t
    return free[0] if free else None


def _in_scope(name, tensor_name):
    """True if the op name ``tensor_name`` lies under the Keras name scope of the layer ``name``:
    ``.../name/...`` (tf_keras), ``.../name_<n>/...`` (Keras 3 numbers every scope it opens)."""
    tokens = tensor_name.split("/")
    if KERAS == 2:
        return name in tokens
    scope = re.compile(re.escape(name) + r"_\d+")
    return any(scope.fullmatch(token) for token in tokens)


@dataclasses.dataclass
class KernelMatch:
    """One stored weight tensor of a Keras kernel (a fused LSTM stores each kernel as 4 gates)."""

    layer: object
    quantizer: object  # None for a float kernel
    variable: object  # the float kernel variable
    tensor: object  # flatbuffer.WeightTensor, or None if not found
    part: int = None  # LSTM gate (0..3: i, f, c, o), None for single-tensor kernels
    several: bool = False  # the layer has more than one kernel (RNN, SeparableConv2D, MultiHeadAttention)
    attr: str = ""  # the kernel's name in the layer

    def expected(self):
        """The Keras quantized kernel (this part of it) in the stored tensor's layout."""
        return to_tflite_layout(quantized_value(self.quantizer, self.variable), self.tensor.op,
                                self.tensor.values.shape, self.part)

    @property
    def label(self):
        """Report name of the kernel: the layer's name, plus the kernel's for layers with several."""
        if self.several or isinstance(self.layer, tf.keras.layers.RNN):
            return f"{self.layer.name}/{self.attr or leaf(path_of(self.variable)).split(':')[0]}"
        return self.layer.name


def _lstm_matches(layer, kernels, tensors, used):
    ops = sorted({t.op_index for t in tensors if t.op == "UNIDIRECTIONAL_SEQUENCE_LSTM"
                  and id(t) not in used})
    if not ops:
        return [KernelMatch(layer, q, v, None) for q, v in kernels.values()]
    by_position = {t.position: t for t in tensors if t.op_index == ops[0]}
    out = []
    for first, name in ((1, "kernel"), (5, "recurrent_kernel")):
        quantizer, variable = kernels[name]
        for part in range(4):
            tensor = by_position.get(first + part)
            if tensor is not None:
                used.add(id(tensor))
            out.append(KernelMatch(layer, quantizer, variable, tensor, part))
    return out


def kernel_matches(model, buffer):
    """A :class:`KernelMatch` per stored weight tensor of every kernel of the model."""
    tensors = flatbuffer.weight_tensors(buffer)
    used, out = set(), []
    single = [t for t in tensors if t.op in SINGLE_WEIGHT_OPS]
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.LSTM):
            kernels = layer_kernels(layer) if is_quantized(layer) else {
                "kernel": (None, layer.cell.kernel), "recurrent_kernel": (None, layer.cell.recurrent_kernel)}
            out.extend(_lstm_matches(layer, kernels, tensors, used))
            continue
        if is_quantized(layer):
            kernels = layer_kernels(layer)
        elif getattr(layer, "kernel", None) is not None:
            kernels = {"kernel": (None, layer.kernel)}
        else:
            kernels = {}
        for attr, (quantizer, variable) in kernels.items():
            tensor = match_tensor(layer, variable, single, used, attr)
            if tensor is not None:
                used.add(id(tensor))
            out.append(KernelMatch(layer, quantizer, variable, tensor, several=len(kernels) > 1, attr=attr))
    return out
