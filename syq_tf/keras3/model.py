"""``quantize_model`` for Keras 3: a whole float Keras 3 model quantized with a scheme such as
``"syq-w2a8"`` -- the same schemes as the Keras 2 frontend's tfmot-based
:func:`syq_tf.tfmot.quantize_model`, built from :func:`syq_tf.quantize` layers (tfmot does not run on
Keras 3).

- Kernel layers (Dense, EinsumDense, Conv1D/2D/3D, DepthwiseConv2D, SeparableConv2D, LSTM, GRU,
  SimpleRNN, Embedding and MultiHeadAttention's projections) between the first and the last get
  the scheme's weight quantizer; the first and last kernel layers 8-bit weights per channel
  (:class:`~syq_tf.quantizers.MaxAbsWeight`, tfmot's default, exact in int8), as the papers keep them.
- Activations: the input of every quantized layer gets an 8-bit moving-average range
  (:class:`~syq_tf.quantizers.MovingAverageActivation`, tfmot's default 8-bit activations); with
  fewer activation bits, a low-bit layer whose input comes from a ReLU (through pooling, reshaping or
  dropout) gets the scheme's activation quantizer instead (DoReFa, or UniQ's: calibrate with
  :func:`syq_tf.keras3.calibrate`), where the papers quantize activations.
- Normalization layers (BatchNormalization, LayerNormalization) stay float in training; at export
  TensorFlow's converter folds a BatchNormalization into the convolution before it and computes a
  LayerNormalization in int8.
- Layers without weights pass through (Rescaling, Normalization, pooling, ...); ``keep_float`` names
  layers to leave in float; any other layer with weights raises
  :class:`~syq_tf.schemes.UnsupportedLayersError` unless ``on_unsupported="keep_float"``.
"""

import dataclasses

import keras

from syq_tf.layers import KERNEL_ATTR, QUANTIZED_CLASSES, quantize
from syq_tf.quantizers import MaxAbsWeight, MovingAverageActivation
from syq_tf.schemes import Unsupported, UnsupportedLayersError, parse_scheme

KERNEL_LAYERS = (*KERNEL_ATTR, keras.layers.MultiHeadAttention)
NORMALIZATION = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
# Layers a ReLU's non-negative output passes through unchanged in sign.
_SIGN_KEEPING = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.AveragePooling1D,
                 keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling1D,
                 keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling1D,
                 keras.layers.GlobalMaxPooling2D, keras.layers.Flatten, keras.layers.Reshape,
                 keras.layers.Dropout, keras.layers.ZeroPadding2D)
_RELUS = ("relu", "relu6")


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


def quantize_model(model, scheme="syq-w2a8", keep_float=(), on_unsupported="error", return_report=False):
    """Quantize a float Keras 3 Sequential or functional model with a scheme (module docstring).

    Returns the quantized model (new layers, the float weights copied), or ``(model, report)`` with
    ``return_report=True``; report: {"scheme", "low_bit", "low_bit_activations", "eight_bit",
    "normalization", "float", "passed_through", "unsupported"}.
    """
    if on_unsupported not in ("error", "keep_float"):
        raise ValueError(f"quantize_model: on_unsupported={on_unsupported!r}; allowed: 'error', 'keep_float'.")
    if not isinstance(model, keras.Model) or not (
            isinstance(model, keras.Sequential) or hasattr(model, "_operations") and model.inputs):
        raise ValueError("quantize_model: expects a built Keras 3 Sequential or functional model (a subclassed "
                         "model has no layer graph to rewrite).")
    spec = parse_scheme(scheme)
    names = {layer.name for layer in model.layers}
    missing = sorted(set(keep_float) - names)
    if missing:
        raise ValueError(f"quantize_model: keep_float names layers the model does not have: {missing}.")
    weighted = [layer for layer in model.layers if isinstance(layer, KERNEL_LAYERS) and layer.name not in keep_float]
    already = [layer.name for layer in weighted if isinstance(layer, QUANTIZED_CLASSES)]
    if already:
        raise ValueError(f"quantize_model: layers {already} are already quantized; give the float model.")
    eight_bit = {layer.name for layer in weighted[:1] + weighted[-1:]}
    plan, unsupported, passed, normalization = {}, [], [], []
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
        elif not layer.trainable_weights:  # preprocessing (Rescaling, Normalization, ...): nothing to lose
            passed.append(layer.name)
        else:
            unsupported.append(Unsupported(layer.name, type(layer).__name__,
                                           "syq_tf has no quantized form for it (it quantizes kernel layers: "
                                           + ", ".join(cls.__name__ for cls in KERNEL_LAYERS) + ")"))
    if unsupported and on_unsupported == "error":
        raise UnsupportedLayersError(unsupported)

    def clone(layer):
        if layer.name not in plan:
            copy = layer.__class__.from_config(layer.get_config())
            return copy
        kernel_quantizer, input_quantizer, _ = plan[layer.name]
        # a recurrent layer's input quantizer would also see its states, an Embedding's takes token ids:
        # only their kernels are quantized
        plain = isinstance(layer, (keras.layers.RNN, keras.layers.Embedding))
        return quantize(layer, kernel_quantizer=kernel_quantizer, input_quantizer=None if plain else input_quantizer)

    quantized = keras.models.clone_model(model, clone_function=clone)
    for layer in quantized.layers:
        if layer.name not in plan and layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    if not return_report:
        return quantized
    report = {
        "scheme": spec.name,
        "low_bit": sorted(n for n in plan if n not in eight_bit),
        "low_bit_activations": sorted(n for n, (_, _, low) in plan.items() if low and n not in eight_bit),
        "eight_bit": sorted(eight_bit & set(plan)),
        "normalization": sorted(normalization),
        "float": sorted(set(keep_float) | {u.layer for u in unsupported}),
        "passed_through": sorted(passed),
        "unsupported": [dataclasses.asdict(u) for u in unsupported],
    }
    return quantized, report
