"""``quantize_model`` for Keras 3: a whole float Keras 3 model quantized with a scheme such as
``"syq-w2a8"`` -- the same schemes as the Keras 2 frontend's tfmot-based
:func:`syq_tf.tfmot.quantize_model`, built from :func:`syq_tf.quantize` layers (tfmot does not run on
Keras 3).

- Kernel layers (Dense, EinsumDense, Conv1D/2D/3D, DepthwiseConv2D, SeparableConv2D, LSTM, GRU,
  SimpleRNN, Embedding and MultiHeadAttention's projections) between the first and the last get
  the scheme's weight quantizer; the first and last kernel layers 8-bit weights per channel
  (:class:`~syq_tf.quantizers.MaxAbsWeight`, tfmot's default, exact in int8), as the papers keep them,
  and so do the layers named in ``eight_bit`` (e.g. a MobileNet's depthwise convolutions).
- Activations: the input of every quantized layer gets an 8-bit moving-average range
  (:class:`~syq_tf.quantizers.MovingAverageActivation`, tfmot's default 8-bit activations); with
  fewer activation bits, a low-bit layer whose input comes from a ReLU (through pooling, reshaping or
  dropout) gets the scheme's activation quantizer instead (DoReFa, or UniQ's: calibrate with
  :func:`syq_tf.keras3.calibrate`), where the papers quantize activations.
- Output ranges (functional models, as tfmot quantizes layer outputs): a tensor that TFLite stores in
  int8 and that is not only the input of one quantized layer -- a residual block's input, read by its
  first convolution and by the Add; an Add's or a Concatenate's output; the BatchNormalization
  output an Add reads -- gets an 8-bit moving-average range at its producer (a
  :class:`~syq_tf.quantizers.MovingAverageActivation` layer after it, named
  ``<producer>_output_range``), so training sees the int8 rounding every reader sees in TFLite; an
  8-bit input range of a reader of that tensor is then left out (one range per tensor). Layers that
  keep their input's int8 scale (pooling by max, reshaping, dropout, padding) and the interior of
  a convolution -> BatchNormalization -> ReLU chain (the converter fuses it) get none. Sequential
  models have no shared tensors: their layers' input ranges are every range.
- Sigmoid and swish activations (``Activation`` layers, and the activation of a kernel layer in a
  functional model) become :class:`~syq_tf.keras3.activations.Int8Sigmoid`: their sigmoid rounded to
  the fixed int8 grid of TFLite's LOGISTIC (``k / 256``), as TFLite rounds it. A kernel layer's
  sigmoid or swish moves out of the layer, named ``<layer>_sigmoid`` / ``<layer>_swish``, behind an
  8-bit range on the layer's output (``<layer>_preactivation_range``: TFLite stores that tensor in
  int8 too, as LOGISTIC's input). A sigmoid's output gets no other range (its grid is fixed).
- MultiHeadAttention computes on the values int8 TFLite stores (``attention_ranges=True`` of
  :class:`~syq_tf.layers.QuantizedMultiHeadAttention`): 8-bit moving-average ranges on the projected
  query, key and value, the scores before and after the scale and the weighted sum, and the softmax
  probabilities on SOFTMAX's int8 grid ``k / 256``. Without them a trained Transformer's attention
  output was one int8 step off TFLite's on 52 % of its values (3.8 % with them).
- A ``keras.layers.LayerNormalization`` becomes an
  :class:`~syq_tf.keras3.layer_normalization.Int8LayerNormalization` (``int8_layer_normalization=False``
  keeps Keras's): the converter computes it as eleven int8 ops, and it trains on their int8 values.
- BatchNormalization stays float in training; at export TensorFlow's converter folds it into the
  convolution before it. A plain ``keras.layers.BatchNormalization`` becomes a
  :class:`~syq_tf.keras3.normalization.FusedBatchNormalization` (the same layer, trained with
  TensorFlow's fused kernel as Keras 2 is; ``fused_batchnorm=False`` keeps Keras's).
- Layers without weights pass through (Rescaling, Normalization, pooling, ...); ``keep_float`` names
  layers to leave in float; any other layer with weights raises
  :class:`~syq_tf.schemes.UnsupportedLayersError` unless ``on_unsupported="keep_float"``.
"""

import dataclasses

import keras

from syq_tf.keras3.activations import Int8Sigmoid, sigmoid_kind
from syq_tf.keras3.layer_normalization import Int8LayerNormalization
from syq_tf.keras3.normalization import FusedBatchNormalization
from syq_tf.layers import KERNEL_ATTR, QUANTIZED_CLASSES, quantize
from syq_tf.quantizers import MaxAbsWeight, MovingAverageActivation
from syq_tf.schemes import Unsupported, UnsupportedLayersError, check_layer_names, parse_scheme

KERNEL_LAYERS = (*KERNEL_ATTR, keras.layers.MultiHeadAttention)
NORMALIZATION = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
# Layers a ReLU's non-negative output passes through unchanged in sign.
_SIGN_KEEPING = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.AveragePooling1D,
                 keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling1D,
                 keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling1D,
                 keras.layers.GlobalMaxPooling2D, keras.layers.Flatten, keras.layers.Reshape,
                 keras.layers.Dropout, keras.layers.ZeroPadding2D)
_RELUS = ("relu", "relu6")
# Layers whose output TFLite stores on their input's int8 scale: no range of their own.
_SCALE_KEEPING = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
                  keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D, keras.layers.Flatten,
                  keras.layers.Reshape, keras.layers.Dropout, keras.layers.SpatialDropout1D,
                  keras.layers.SpatialDropout2D, keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D,
                  keras.layers.ZeroPadding3D, keras.layers.Cropping1D, keras.layers.Cropping2D,
                  keras.layers.Permute, keras.layers.Identity)


def _producer(layer):
    """The layer whose output is ``layer``'s (first) input, or None."""
    nodes = getattr(layer, "_inbound_nodes", [])
    if not nodes or not nodes[0].input_tensors:
        return None
    history = getattr(nodes[0].input_tensors[0], "_keras_history", None)
    return history.operation if history is not None else None


def _after_relu(layer):
    """True if ``layer``'s input is a ReLU's output (non-negative), through sign-keeping layers."""
    source = _producer(layer)
    while isinstance(source, _SIGN_KEEPING):
        source = _producer(source)
    if isinstance(source, keras.layers.ReLU):
        return True
    activation = getattr(source, "activation", None)
    return getattr(activation, "__name__", activation) in _RELUS


def _fused_activation(layer):
    """True for an activation the converter fuses into the convolution / dense op before it."""
    if isinstance(layer, keras.layers.ReLU):
        return not layer.negative_slope and not layer.threshold and layer.max_value in (None, 6.0)
    if isinstance(layer, keras.layers.Activation):
        activation = layer.activation
        return getattr(activation, "__name__", activation) in (*_RELUS, "linear")
    return False


def _graph(model):
    """``(readers, single_node)``: ``readers[(producer name, tensor index)]`` lists the layers that
    read that output of a single-node producer (a name, or None for a model output); ``single_node``
    the names of layers called once (only they can get an output range)."""
    single_node = {layer.name for layer in model.layers if len(getattr(layer, "_inbound_nodes", [])) == 1}
    readers = {}
    for layer in model.layers:
        for node in getattr(layer, "_inbound_nodes", []):
            for tensor in keras.tree.flatten(node.input_tensors):
                history = getattr(tensor, "_keras_history", None)
                if history is not None:
                    readers.setdefault((history.operation.name, history.tensor_index), []).append(layer.name)
    for tensor in keras.tree.flatten(model.outputs):
        history = tensor._keras_history
        readers.setdefault((history.operation.name, history.tensor_index), []).append(None)
    return readers, single_node


def _output_ranges(model, plan):
    """``(ranged, covered)``: the names of the layers whose output gets an 8-bit range (module
    docstring) and the names of the quantized layers whose 8-bit input range that makes redundant."""
    readers, single_node = _graph(model)
    layers = {layer.name: layer for layer in model.layers}

    def quantizes_input(name):  # a reader whose own input quantizer ranges what it reads
        layer = layers.get(name)
        return name in plan and not isinstance(layer, (keras.layers.RNN, keras.layers.Embedding,
                                                        keras.layers.MultiHeadAttention))

    def final_readers(name):  # readers seen through scale-keeping layers called once
        out = []
        for reader in readers.get((name, 0), []):
            if reader is not None and isinstance(layers[reader], _SCALE_KEEPING) and reader in single_node:
                out.extend(final_readers(reader))
            else:
                out.append(reader)
        return out

    ranged, covered = set(), set()
    for layer in model.layers:
        name = layer.name
        if (isinstance(layer, (keras.layers.InputLayer, keras.layers.Embedding, *_SCALE_KEEPING))
                or name not in single_node or len(keras.tree.flatten(layer.output)) != 1):
            continue
        direct, final = readers.get((name, 0), []), final_readers(name)
        if sigmoid_kind(layer) == "sigmoid":
            # TFLite's LOGISTIC stores it on its fixed grid, which the Int8Sigmoid rounds to in training:
            # that grid is the tensor's range, for every reader
            covered.update(r for r in final if r is not None and quantizes_input(r) and not plan[r][2])
            continue
        if not final or all(r is None for r in final):
            continue  # nothing reads it but the model's output (compared in float)
        if len(direct) == 1 and direct[0] is not None:
            reader = layers[direct[0]]
            # inside a fused chain: kernel layer -> BatchNormalization / ReLU, BatchNormalization -> ReLU
            if (isinstance(layer, KERNEL_LAYERS) and isinstance(reader, keras.layers.BatchNormalization)) or (
                    isinstance(layer, (*KERNEL_LAYERS, keras.layers.BatchNormalization))
                    and _fused_activation(reader)):
                continue
        if len(final) == 1 and quantizes_input(final[0]):
            continue  # one quantized reader: its input range is the tensor's
        ranged.add(name)
        covered.update(r for r in final if r is not None and quantizes_input(r) and not plan[r][2])
    return ranged, covered


def _without_activation(layer):
    """A copy of the built kernel layer ``layer`` (same config and weights) with a linear activation."""
    copy = layer.__class__.from_config({**layer.get_config(), "activation": "linear"})
    copy.build_from_config(layer.get_build_config())
    copy.set_weights(layer.get_weights())
    return copy


def quantize_model(model, scheme="syq-w2a8", keep_float=(), on_unsupported="error", return_report=False,
                   eight_bit=(), fused_batchnorm=True, int8_layer_normalization=True):
    """Quantize a float Keras 3 Sequential or functional model with a scheme (module docstring).

    Returns the quantized model (new layers, the float weights copied), or ``(model, report)`` with
    ``return_report=True``; report: {"scheme", "low_bit", "low_bit_activations", "eight_bit",
    "output_ranges" (layers whose output got a range), "int8_sigmoids" (the :class:`Int8Sigmoid` layers),
    "normalization" (BatchNormalization and LayerNormalization layers), "float", "passed_through",
    "unsupported"}.
    """
    if on_unsupported not in ("error", "keep_float"):
        raise ValueError(f"quantize_model: on_unsupported={on_unsupported!r}; allowed: 'error', 'keep_float'.")
    if not isinstance(model, keras.Model) or not (
            isinstance(model, keras.Sequential) or hasattr(model, "_operations") and model.inputs):
        raise ValueError("quantize_model: expects a built Keras 3 Sequential or functional model (a subclassed "
                         "model has no layer graph to rewrite).")
    spec = parse_scheme(scheme)
    layers = {layer.name: layer for layer in model.layers}
    names = set(layers)
    check_layer_names(model, keep_float, eight_bit,
                      [layer.name for layer in model.layers if isinstance(layer, KERNEL_LAYERS)])
    weighted = [layer for layer in model.layers if isinstance(layer, KERNEL_LAYERS) and layer.name not in keep_float]
    already = [layer.name for layer in weighted if isinstance(layer, QUANTIZED_CLASSES)]
    if already:
        raise ValueError(f"quantize_model: layers {already} are already quantized; give the float model.")
    eight_bit = {layer.name for layer in weighted[:1] + weighted[-1:]} | set(eight_bit)
    plan, unsupported, passed, normalization, sigmoids = {}, [], [], [], {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or layer.name in keep_float:
            continue
        if isinstance(layer, KERNEL_LAYERS):
            if layer.name in eight_bit:
                # a table is looked up with one int8 scale (TFLite's GATHER), kernels per channel
                granularity = "layer" if isinstance(layer, keras.layers.Embedding) else "channel"
                plan[layer.name] = (MaxAbsWeight(8, granularity), MovingAverageActivation(8), False)
            else:
                low_act = spec.activation_quantizer() if _after_relu(layer) else None
                plan[layer.name] = (spec.weight_quantizer(), low_act or MovingAverageActivation(8), low_act is not None)
        elif isinstance(layer, NORMALIZATION):
            normalization.append(layer.name)
        elif isinstance(layer, keras.layers.Activation) and sigmoid_kind(layer):
            sigmoids[layer.name] = sigmoid_kind(layer)
        elif not layer.trainable_weights:  # preprocessing (Rescaling, Normalization, ...): nothing to lose
            passed.append(layer.name)
        else:
            unsupported.append(Unsupported(layer.name, type(layer).__name__,
                                           "syq_tf has no quantized form for it (it quantizes kernel layers: "
                                           + ", ".join(cls.__name__ for cls in KERNEL_LAYERS) + ")"))
    if unsupported and on_unsupported == "error":
        raise UnsupportedLayersError(unsupported)

    functional = not isinstance(model, keras.Sequential)
    ranged, covered = _output_ranges(model, plan) if functional else (set(), set())
    # a kernel layer's sigmoid / swish becomes an Int8Sigmoid after it, its input (the layer's output,
    # an int8 tensor in TFLite) on an 8-bit range; a Sequential model has no place for them: kept inside
    split = {name: sigmoid_kind(layers[name]) for name in plan if functional and sigmoid_kind(layers[name])}

    def clone(layer):
        if layer.name in sigmoids:
            return Int8Sigmoid(sigmoids[layer.name], name=layer.name)
        if layer.name not in plan:
            fused = fused_batchnorm and type(layer) is keras.layers.BatchNormalization
            if int8_layer_normalization and type(layer) is keras.layers.LayerNormalization and not layer.rms_scaling:
                return Int8LayerNormalization.from_config(layer.get_config())
            return (FusedBatchNormalization if fused else layer.__class__).from_config(layer.get_config())
        kernel_quantizer, input_quantizer, _ = plan[layer.name]
        if layer.name in split:
            layer = _without_activation(layer)
        # a recurrent layer's input quantizer would also see its states, an Embedding's takes token ids:
        # only their kernels are quantized; a layer whose input has an output range reads it as it is
        # MultiHeadAttention's inputs are ranged at their producers (a tensor it reads is stored once,
        # on one int8 scale, for the query, key and value projections alike); its inner tensors, the
        # output projection's input among them, get ranges of their own (attention_ranges)
        attention = isinstance(layer, keras.layers.MultiHeadAttention)
        plain = attention or isinstance(layer, (keras.layers.RNN, keras.layers.Embedding)) or layer.name in covered
        return quantize(layer, kernel_quantizer=kernel_quantizer, input_quantizer=None if plain else input_quantizer,
                        attention_ranges=attention)

    def call(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if layer.name in split:
            outputs = MovingAverageActivation(8, name=f"{layer.name}_preactivation_range")(outputs)
            outputs = Int8Sigmoid(split[layer.name], name=f"{layer.name}_{split[layer.name]}")(outputs)
        if layer.name in ranged:
            outputs = MovingAverageActivation(8, name=f"{layer.name}_output_range")(outputs)
        return outputs

    quantized = keras.models.clone_model(model, clone_function=clone, **({"call_function": call} if functional else {}))
    for layer in quantized.layers:
        if isinstance(layer, Int8LayerNormalization):  # its ranges are new
            layer.copy_weights(model.get_layer(layer.name))
        elif layer.name not in plan and layer.name in names and layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    if not return_report:
        return quantized
    report = {
        "scheme": spec.name,
        "low_bit": sorted(n for n in plan if n not in eight_bit),
        "low_bit_activations": sorted(n for n, (_, _, low) in plan.items() if low and n not in eight_bit),
        "eight_bit": sorted(eight_bit & set(plan)),
        "output_ranges": sorted(ranged),
        "int8_sigmoids": sorted(sigmoids) + sorted(f"{name}_{kind}" for name, kind in split.items()),
        "normalization": sorted(normalization),
        "float": sorted(set(keep_float) | {u.layer for u in unsupported}),
        "passed_through": sorted(passed),
        "unsupported": [dataclasses.asdict(u) for u in unsupported],
    }
    return quantized, report
