"""The inference form: a plain Keras model that computes what a trained quantized model computes,
in the shape TFLite's converters understand. One builder serves every model kind and target.

Converting the training graph as it is fails at run time (quantizer ops and scale variables give
int8 convolutions with non-zero weight zero points, METHODS.md §5). So each quantized layer (a
syq_tf or larq layer) becomes its plain Keras layer holding the *quantized* kernel, behind a stand-in
for its input quantizer -- by default the int8 FakeQuant of the quantizer's grid
(:meth:`~syq_tf.quantizers.ActivationQuantizer.int8_form`), which the converter turns into the
tensor's int8 scale and zero point; a target may pass its own stand-ins (``stand_in``, as target
``lce`` does for the layers it bit-packs). A tfmot QAT model (``quantize_model``) keeps tfmot's
wrappers and ranges; its syq_tf quantizers switch to their export form (the kernel holds the
quantized values, activation quantizers become the same int8 FakeQuant).

A tensor that a quantized layer's input range reads and other layers read too (a residual block's
input, read by its first convolution and by the Add) gets that range once, at its producer, for all
its readers (:class:`OutputRange`, as tfmot quantizes layer outputs): TensorFlow's converter leaves
the producer of a tensor read both through a FakeQuant and directly in float (DEQUANTIZE, float op
and float32 kernel, QUANTIZE; measured). The other readers then see the tensor on that int8 grid,
which int8 TFLite stores it on anyway, and clipped to its range.
Only moving-average ranges (:class:`MovingAverageActivation`, estimated from the tensor itself)
move: a quantizer that clips by design (DoReFa's [0, 1]) stays at its reader, since Keras does
not clip the other readers' values. A model that already has such ranges as layers of its own (Keras 3
``quantize_model`` puts them on shared tensors in training) gets each replaced by its int8 stand-in.

Every stand-in takes its values from the trained layer through ``transfer(old_layer)``.
"""

import numpy as np
import tensorflow as tf

from syq_tf.layers import QUANTIZED_CLASSES, QuantizedMultiHeadAttention, ranged_attention
from syq_tf.models import is_tfmot_model, layer_kernels
from syq_tf.quantizers import ActivationQuantizer, MovingAverageActivation, int8_fake_quant

# Config keys of larq / syq_tf layers that the plain Keras layer does not take.
QUANT_KEYS = ("kernel_quantizer", "input_quantizer", "recurrent_quantizer", "depthwise_quantizer",
              "pointwise_quantizer", "metrics", "attention_ranges")


def is_quantized(layer):
    """True for a syq_tf quantized layer or a larq layer with a kernel or input quantizer."""
    if isinstance(layer, QUANTIZED_CLASSES):
        return True
    return any(q is not None for q, _ in layer_kernels(layer).values()) or (
        getattr(layer, "input_quantizer", None) is not None
    )


def plain_class(layer):
    """The stock Keras class behind a syq_tf / larq quantized layer."""
    for cls in type(layer).__mro__:
        if (issubclass(cls, QUANTIZED_CLASSES) or cls.__module__.startswith("larq")
                or not issubclass(cls, tf.keras.layers.Layer)):  # mixins (InnerRanges) are no Keras class
            continue
        return cls
    raise TypeError(f"layer '{layer.name}': cannot find the plain Keras class of {type(layer).__name__}")


def quantized_value(quantizer, variable):
    """The kernel as the layer computes with it (the quantizer's output; the variable if None)."""
    if quantizer is None:
        return variable.numpy()
    return tf.convert_to_tensor(quantizer(tf.convert_to_tensor(variable))).numpy()


def leaf(name):
    return name.split("/")[-1]


def path_of(variable):
    """A variable's full name: "dense/kernel:0" (tf_keras' name) or "dense/kernel" (Keras 3's path;
    its name is only the leaf)."""
    return getattr(variable, "path", None) or variable.name


def inner_path(name, layer_name):
    """A variable's path inside the layer ``layer_name`` ("mha/query/kernel:0" -> "query/kernel:0")."""
    parts = name.split("/")
    return "/".join(parts[parts.index(layer_name) + 1:]) if layer_name in parts else name


def find_layer(model, name):
    try:
        return model.get_layer(name)
    except ValueError:
        return None


def plain_copy(layer, owner="to_tflite", cls=None, **extra):
    """A fresh plain Keras layer (``cls``, default the stock class behind the layer, with the ``extra``
    config) with the quantized layer's config (quantizer keys dropped); padding with ``pad_values``
    other than 0 has no int8 / float TFLite form and is refused."""
    config = {k: v for k, v in layer.get_config().items() if k not in QUANT_KEYS}
    pad = config.pop("pad_values", 0.0)
    if pad not in (0, 0.0):
        raise ValueError(f"{owner}: layer '{layer.name}': pad_values={pad} has no TFLite form here; use "
                         "pad_values=0.")
    config["name"] = f"{layer.name}_float"
    return (cls or plain_class(layer)).from_config({**config, **extra})


def int8_input(layer):
    """The int8 stand-in of a layer's input quantizer (None without one)."""
    quantizer = getattr(layer, "input_quantizer", None)
    if quantizer is None:
        return None
    if not isinstance(quantizer, ActivationQuantizer):
        raise ValueError(
            f"layer '{layer.name}': input quantizer {type(quantizer).__name__} has no int8 TFLite "
            "form in target 'litert'; use a syq_tf activation quantizer (e.g. DoReFa) or no input "
            "quantizer."
        )
    return Int8Input(*quantizer.int8_form(), name="input_range")


class Int8Input(tf.keras.layers.Layer):
    """Inference stand-in for an activation quantizer: its int8 range and clip
    (:func:`~syq_tf.quantizers._common.int8_fake_quant`); also tfmot's trained 8-bit activation
    ranges in a tfmot model's syq_tf form (:mod:`syq_tf.export.tfmot_layers`)."""

    bits = 8

    def __init__(self, low, high, top=None, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high = float(low), float(high)
        self.top = None if top is None else float(top)

    def call(self, inputs):
        return int8_fake_quant(inputs, self.low, self.high, self.top)

    def get_config(self):
        return {**super().get_config(), "low": self.low, "high": self.high, "top": self.top}


class RangeStandIn(Int8Input):
    """The int8 stand-in of an activation quantizer that is a layer of the model's graph."""

    def transfer(self, old):
        pass  # its range is in its config


class QuantizedStandIn(tf.keras.layers.Layer):
    """A plain Keras layer (holding the quantized kernel) behind an optional input stand-in."""

    def __init__(self, inner, input_stand_in=None, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.input_stand_in = input_stand_in
        self.output_stand_in = None  # set where other layers read this output too (OutputRange)

    def build(self, *shapes):
        """Nothing of its own: the inner layer builds on its first call (Keras 3 would otherwise try
        to trace ``call`` to find the state)."""
        self.built = True

    def call(self, inputs, *args, **kwargs):
        if self.input_stand_in is not None:
            inputs = self.input_stand_in(inputs)
        outputs = self.inner(inputs, *args, **kwargs)
        return outputs if self.output_stand_in is None else self.output_stand_in(outputs)

    def transfer(self, old):
        """The trained layer's weights, with every kernel replaced by its quantized value (matched by
        name: the leaf, or the path inside the layer where leaves repeat, as in MultiHeadAttention)."""
        if len({leaf(path_of(v)) for v in old.weights}) == len(old.weights):
            old_key = new_key = leaf
        else:
            def old_key(name):
                return inner_path(name, old.name)

            def new_key(name):
                return inner_path(name, self.inner.name)
        values = {old_key(path_of(v)): v.numpy() for v in old.weights}
        for quantizer, variable in layer_kernels(old).values():
            values[old_key(path_of(variable))] = quantized_value(quantizer, variable)
        for variable in self.inner.weights:
            variable.assign(values[new_key(path_of(variable))])


class TableStandIn(QuantizedStandIn):
    """A quantized Embedding: the plain layer holding the quantized table, its output behind an int8
    FakeQuant on ``[-128 s, 127 s]`` with ``s = max|table| / 127``. TFLite's GATHER gives its table
    the output's int8 scale (nothing is folded into a lookup), so this makes the largest level
    ``127 s`` exactly; the converter's calibrated range would round every level."""

    def __init__(self, inner, step, **kwargs):
        super().__init__(inner, None, **kwargs)
        self.step = float(step)

    def build(self, input_shape):
        self.inner.build(input_shape)
        self.built = True

    def call(self, inputs, *args, **kwargs):
        # a plain GATHER: Keras 3's Embedding wraps negative ids first (LESS, ADD, SELECT), and
        # SELECT has no TFLite Micro kernel
        table = tf.gather(self.inner.embeddings, tf.cast(inputs, tf.int32))
        return int8_fake_quant(table, -128.0 * self.step, 127.0 * self.step)


class FixedRanges:
    """The export side of :class:`syq_tf.layers.InnerRanges`: a plain layer computing with each
    trained inner range as its int8 FakeQuant (``ranges``: name -> ``(low, high, top)``, its
    :meth:`~syq_tf.layers.InnerRanges.int8_ranges`), which the converter takes as the int8 scale and
    zero point of that tensor; ``self.ranged`` is the layer's ``ranged(name, tensor)``."""

    def __init__(self, *args, ranges=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ranges = {name: tuple(form) for name, form in (ranges or {}).items()}

    def ranged(self, name, x):
        return int8_fake_quant(x, *self.ranges[name])

    def get_config(self):
        return {**super().get_config(), "ranges": {name: list(form) for name, form in self.ranges.items()}}


class RangedAttention(FixedRanges, tf.keras.layers.MultiHeadAttention):
    """The plain MultiHeadAttention of a :class:`~syq_tf.layers.QuantizedMultiHeadAttention` with
    ``attention_ranges``: the same arithmetic (:func:`~syq_tf.layers.ranged_attention`) on its fixed
    ranges."""

    def _build_attention(self, rank):
        super()._build_attention(rank)
        # named: the stock softmax takes Keras's running layer count, which names its TFLite tensor
        # (softmax_2, then softmax_3 for the same model exported again: different bytes)
        self._softmax = type(self._softmax)(axis=self._softmax.axis, name="softmax")

    def _compute_attention(self, query, key, value, attention_mask=None, training=None, *args, **kwargs):
        return ranged_attention(self, self.ranged, query, key, value, attention_mask, training, *args, **kwargs)


def int8_stand_in(layer):
    """The default stand-in of a quantized layer: plain layer + int8 input range (a table: an int8
    output range on its largest level, :class:`TableStandIn`; an attention with inner ranges: a
    :class:`RangedAttention`)."""
    if isinstance(layer, QuantizedMultiHeadAttention) and layer.attention_ranges:
        return QuantizedStandIn(plain_copy(layer, cls=RangedAttention, ranges=layer.int8_ranges()),
                                int8_input(layer), name=layer.name)
    if issubclass(plain_class(layer), tf.keras.layers.Embedding):
        (quantizer, table), = layer_kernels(layer).values()
        top = float(np.max(np.abs(quantized_value(quantizer, table))))
        return TableStandIn(plain_copy(layer), (top or 1.0) / 127.0, name=layer.name)
    return QuantizedStandIn(plain_copy(layer), int8_input(layer), name=layer.name)


class OutputRange(tf.keras.layers.Layer):
    """A plain layer (``inner``, a copy of a float layer) whose output goes through the int8 stand-in of a
    reader's input quantizer, when other layers read that output too (module docstring)."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.output_stand_in = None

    def build(self, *shapes):
        self.built = True

    def call(self, *args, **kwargs):
        return self.output_stand_in(self.inner(*args, **kwargs))

    def transfer(self, old):
        self.inner.set_weights(old.get_weights())


def _history(tensor):
    """(producing layer, node index, tensor index) of a functional model's tensor, or None."""
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else tuple(history)[:3]


def shared_input_ranges(model, stand_ins):
    """``{producer name: (Int8Input, reader names)}``: where a quantized layer whose stand-in reads
    its input through an int8 range (``stand_ins``: name -> stand-in) takes a tensor that other
    layers (or the model's outputs) read too, that range moves to the tensor's producer (the first
    such reader's range when several read it). Producers with several nodes or outputs, tables
    and model inputs keep the ranges at their readers."""
    readers, keys = {}, {}
    for layer in model.layers:
        for node in getattr(layer, "_inbound_nodes", []):
            for tensor in tf.nest.flatten(node.input_tensors):
                history = _history(tensor)
                if history is not None:
                    key = (id(history[0]), history[1], history[2])
                    readers.setdefault(key, []).append(layer.name)
                    keys.setdefault(layer.name, []).append((key, history[0]))
    for tensor in tf.nest.flatten(model.outputs):
        history = _history(tensor)
        if history is not None:
            readers.setdefault((id(history[0]), history[1], history[2]), []).append(None)
    moved = {}
    for name, new in stand_ins.items():
        if not isinstance(new, QuantizedStandIn) or not isinstance(new.input_stand_in, Int8Input):
            continue
        # only a range estimated from the tensor itself (tfmot-style moving averages) may serve all
        # its readers; a quantizer that clips by design (DoReFa's [0, 1]) would clip the other
        # readers' values too, which Keras does not do: that range stays at its reader
        if not isinstance(getattr(model.get_layer(name), "input_quantizer", None), MovingAverageActivation):
            continue
        if len(keys.get(name, [])) != 1 or len(model.get_layer(name)._inbound_nodes) != 1:
            continue
        (key, producer), = keys[name]
        if (len(readers[key]) < 2 or producer.name in moved or isinstance(producer, tf.keras.layers.InputLayer)
                or isinstance(stand_ins.get(producer.name), TableStandIn)
                or len(producer._inbound_nodes) != 1 or len(tf.nest.flatten(producer.output)) != 1):
            continue
        moved[producer.name] = (new.input_stand_in, readers[key])
    return moved


def _range_of(stand_in):
    return (stand_in.low, stand_in.high, stand_in.top)


def build(model, *, batch_size=None, stand_in=None):
    """The inference form of ``model`` (see the module docstring).

    batch_size: fix the batch dimension of the inputs (the fused recurrent ops need it).
    stand_in: ``layer -> Layer or None`` for quantized layers (None: :func:`int8_stand_in`); the
        layer it returns gets its values through ``transfer(old_layer)``.
    """
    if is_tfmot_model(model):
        return _tfmot_form(model, batch_size)
    made = set()
    stand_ins = {layer.name: (stand_in(layer) if stand_in is not None else None) or int8_stand_in(layer)
                 for layer in model.layers if is_quantized(layer)}
    moved = shared_input_ranges(model, stand_ins)
    for output_range, readers in moved.values():
        for name in readers:  # readers on the same range read the producer's output as it is
            new = stand_ins.get(name)
            if isinstance(getattr(new, "input_stand_in", None), Int8Input) and (
                    _range_of(new.input_stand_in) == _range_of(output_range)):
                new.input_stand_in = None

    def clone(layer):
        if isinstance(layer, MovingAverageActivation):  # a range of its own in the graph (Keras 3 output
            # ranges); other activation quantizers in the graph (the output quantizers of a tfmot model's
            # syq_tf form, tfmot_layers) are the target's to plan
            made.add(layer.name)
            return RangeStandIn(*layer.int8_form(), name=layer.name)
        form = getattr(layer, "inference_form", None)  # a layer that knows its own form (Int8LayerNormalization)
        if form is not None and layer.name not in moved:
            made.add(layer.name)
            return form()
        new = stand_ins.get(layer.name)
        if layer.name in moved:
            if new is None:
                new = OutputRange(layer.__class__.from_config({**layer.get_config(), "name": f"{layer.name}_inner"}),
                                  name=layer.name)
            new.output_stand_in = moved[layer.name][0]
        if new is None:
            return layer.__class__.from_config(layer.get_config())
        made.add(layer.name)
        return new

    inference = tf.keras.models.clone_model(model, input_tensors=_inputs(model, batch_size), clone_function=clone)
    for new in inference.layers:
        old = find_layer(model, new.name)
        if old is None or not old.weights:
            continue
        if new.name in made:
            new.transfer(old)
        else:
            new.set_weights(old.get_weights())
    return inference


def _inputs(model, batch_size):
    """New inputs of ``model`` with the batch dimension fixed to ``batch_size`` (None: as they are),
    named as the model's inputs: the converter names the signature's input after it, which an
    unnamed input would take from Keras's running tensor count (``serving_default_keras_tensor_61``,
    then ``_78`` for the same model exported again: different bytes for the same model)."""
    if batch_size is None:
        return None
    inputs = [tf.keras.Input(batch_shape=(batch_size, *t.shape[1:]), dtype=t.dtype, name=_input_name(t))
              for t in model.inputs]
    return inputs[0] if len(inputs) == 1 else inputs


def _input_name(tensor):
    """The name of the input layer that made ``tensor`` (Keras 2 and Keras 3), else None."""
    history = _history(tensor)
    return history[0].name if history else None


AVERAGE_POOLING = (tf.keras.layers.AveragePooling1D, tf.keras.layers.AveragePooling2D,
                   tf.keras.layers.AveragePooling3D)


class WindowMean(tf.keras.layers.Layer):
    """An average pooling whose one window covers its whole input (MLPerf Tiny's ResNet-8, DS-CNN,
    MobileNetV1: ``AveragePooling2D(pool_size=x.shape[1:3])``), as the mean over the spatial axes:
    TFLite's MEAN. In a tfmot model the pooling's input is the previous layer's output quantizer's
    int8 tensor and Keras averages it in float before the pooling's own 8-bit output range; TFLite's
    int8 AVERAGE_POOL_2D keeps its input's scale, so on a low-bit activation grid (int8 scale = the
    step) it rounded the average to a whole step -- 16 times coarser than Keras' range for 4-bit
    UniQ activations (measured: 0.92 top-1 agreement on ResNet-8 uniq-w4a4) -- and a QUANTIZE to
    the range followed. MEAN takes its own output scale: one rounding, onto the range, as Keras."""

    def __init__(self, axes, **kwargs):
        super().__init__(**kwargs)
        self.axes = tuple(int(a) for a in axes)

    def call(self, inputs):
        return tf.reduce_mean(inputs, axis=self.axes, keepdims=True)

    def get_config(self):
        return {**super().get_config(), "axes": self.axes}

    @staticmethod
    def replaces(layer, input_shape):
        """True for a valid-padded average pooling whose one window is its whole input (of
        ``input_shape``)."""
        if not isinstance(layer, AVERAGE_POOLING) or layer.padding != "valid":
            return False
        shape = list(tf.TensorShape(input_shape))
        spatial = shape[2:] if layer.data_format == "channels_first" else shape[1:-1]
        return None not in spatial and spatial == list(layer.pool_size)

    @staticmethod
    def config_of(layer):
        rank = len(layer.pool_size)
        first = layer.data_format == "channels_first"
        axes = tuple(range(2, 2 + rank)) if first else tuple(range(1, 1 + rank))
        return {"name": layer.name, "axes": axes}


def _tfmot_form(model, batch_size=None):
    """A copy of a tfmot model quantized with syq_tf configs, ready for TFLite conversion: every
    syq_tf weight quantizer's kernel holds its quantized values and only marks their int8 range;
    activation quantizers become int8 fake-quants on their grid; tfmot's own quantizers unchanged."""
    from syq_tf.tfmot import QuantizeConfig, is_wrapper, quantize_scope, wrapper_kernels  # noqa: PLC0415  (Keras 2)

    with quantize_scope({"WindowMean": WindowMean}):
        def clone(layer):
            config = layer.get_config()
            if is_wrapper(layer) and isinstance(layer.quantize_config, QuantizeConfig):
                qc = config["quantize_config"]["config"]
                for key in ("weight_quantizer", "output_quantizer"):
                    if qc.get(key) is not None:
                        qc[key] = {**qc[key], "export": True}
            if is_wrapper(layer) and WindowMean.replaces(layer.layer, layer.input_shape):
                config["layer"] = {"class_name": "WindowMean", "config": WindowMean.config_of(layer.layer)}
            return layer.__class__.from_config(config)

        exported = tf.keras.models.clone_model(model, input_tensors=_inputs(model, batch_size), clone_function=clone)
    for old, new in zip(model.layers, exported.layers):
        quantized = {}
        if is_wrapper(old) and isinstance(old.quantize_config, QuantizeConfig):
            for impl, variable in wrapper_kernels(old).values():
                if impl is not None:
                    quantized[id(variable)] = tf.convert_to_tensor(impl(tf.convert_to_tensor(variable))).numpy()
        # variable names differ in their scopes between the two builds; leaves are unique per layer
        by_leaf = {leaf(v.name): quantized.get(id(v), v.numpy()) for v in old.weights}
        leaves = [leaf(v.name) for v in new.weights]
        if len(by_leaf) != len(old.weights) or sorted(by_leaf) != sorted(leaves):
            raise ValueError(f"export_form: layer {old.name!r}: weights of the copy do not match the "
                             f"model's: {sorted(by_leaf)} vs {sorted(leaves)}.")
        for variable, name in zip(new.weights, leaves):
            variable.assign(by_leaf[name])
        if is_wrapper(new) and isinstance(new.quantize_config, QuantizeConfig):
            for quantizer in new.quantize_config.quantizers():
                quantizer.ready = True
    return exported
