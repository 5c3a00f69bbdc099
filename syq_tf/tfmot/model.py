"""``quantize_model``: a whole float Keras model quantized with tfmot and a syq_tf scheme."""

import dataclasses

import tensorflow as tf

from syq_tf.tfmot.adapter import tq
from syq_tf.tfmot.configs import ActivationConfig, QuantizeConfig, quantize_scope
from syq_tf.tfmot.schemes import (
    SPLIT,
    SchemeRegistry,
    SyqQuantizeScheme,
    has_kernel,
    separable_parts,
)
from syq_tf.tfmot.wrappers import is_wrapper
from syq_tf.schemes import Unsupported, UnsupportedLayersError, check_layer_names, parse_scheme

def quantize_model(model, scheme="syq-w2a8", keep_float=(), on_unsupported="error", return_report=False,
                   eight_bit=()):
    """Quantize a float Sequential or functional Keras model with tfmot and a syq_tf scheme.

    - Weighted layers (Conv1D/Conv2D/DepthwiseConv2D/Dense, Conv1DTranspose/Conv2DTranspose)
      between the first and the last get the scheme's weight quantizer (SYQ per channel, UniQ per
      channel, ls1/ls2, LAB/LAT/LAQ; per output channel, which is the kernel's axis -2 for the
      transposed convolutions); the first and last weighted layers get tfmot's default 8-bit
      configs, as the papers keep them (8-bit UniQ per channel where tfmot has none, e.g. Conv1D),
      weights only when a ReLU follows (it is fused into the layer).
    - Activations: ``a8`` uses tfmot's default 8-bit output quantization everywhere; below 8 bits the
      outputs of ReLU/Activation layers get the scheme's activation quantizer (DoReFa, or UniQ's for
      uniq: calibrate with :func:`syq_tf.calibrate`), other layers tfmot's default.
    - BatchNormalization and every other layer are handled by tfmot's default 8-bit layout
      transforms and registry (:class:`SyqQuantizeScheme`).
    - Layers without trainable weights that neither supports (preprocessing such as Rescaling and
      Normalization) pass through in float: nothing to quantize, nothing to lose.
    - ``eight_bit``: names of further kernel layers to keep at 8 bits like the first and last (e.g. a
      MobileNet's depthwise convolutions: few weights, and 2-bit 3x3 depthwise filters lose most of
      what they compute).
    - ``keep_float``: names of layers to leave in float. Layers with weights neither tfmot's
      registry nor syq_tf supports raise :class:`UnsupportedLayersError` (names, types, why) unless
      ``on_unsupported="keep_float"``, which leaves them in float.

    Returns the quantized (``QuantizeWrapperV2``) model, or ``(model, report)`` with
    ``return_report=True``; report: {"scheme", "low_bit", "low_bit_activations", "eight_bit",
    "float", "passed_through", "unsupported"}.
    """
    if on_unsupported not in ("error", "keep_float"):
        raise ValueError(f"quantize_model: on_unsupported={on_unsupported!r}; allowed: 'error', 'keep_float'.")
    if not isinstance(model, tf.keras.Model) or not (
            isinstance(model, tf.keras.Sequential) or getattr(model, "_is_graph_network", False)):
        raise ValueError(
            "quantize_model: expects a tf.keras Sequential or functional model (subclassed models have no "
            "layer graph tfmot can rewrite)."
        )
    spec = parse_scheme(scheme)
    kernels = [layer for layer in model.layers if has_kernel(layer) or isinstance(layer, SPLIT)]
    check_layer_names(model, keep_float, eight_bit, [layer.name for layer in kernels])
    weighted = [layer for layer in kernels if layer.name not in keep_float]
    keep_8bit = set()  # the first and last kernel layers and those named in eight_bit
    for layer in weighted[:1] + weighted[-1:] + [layer for layer in weighted if layer.name in eight_bit]:
        keep_8bit.update(separable_parts(layer.name) if isinstance(layer, SPLIT) else (layer.name,))
    registry = SchemeRegistry(spec, keep_8bit)
    quantized_names, unsupported, passed = set(), [], []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.InputLayer) or layer.name in keep_float:
            continue
        if registry.supports(layer):
            quantized_names.add(layer.name)
            continue
        if not layer.trainable_weights:  # preprocessing (Rescaling, Normalization, ...): nothing to lose
            passed.append(layer.name)
            continue
        why = ("tfmot's default 8-bit registry does not support it and syq_tf has no config for it "
               "(syq_tf quantizes Conv1D, Conv2D, DepthwiseConv2D, Dense, Conv1DTranspose and "
               "Conv2DTranspose kernels)")
        unsupported.append(Unsupported(layer.name, type(layer).__name__, why))
    if unsupported and on_unsupported == "error":
        raise UnsupportedLayersError(unsupported)

    def annotate(layer):
        copy = layer.__class__.from_config(layer.get_config())
        return tq.quantize_annotate_layer(copy) if layer.name in quantized_names else copy

    with quantize_scope():
        annotated = tf.keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        quantized = tq.quantize_apply(annotated, scheme=SyqQuantizeScheme(spec.name, sorted(keep_8bit)))
    if not return_report:
        return quantized
    configs = {layer.layer.name: layer.quantize_config for layer in quantized.layers if is_wrapper(layer)}

    def low_bit(config):
        return isinstance(config, QuantizeConfig) and config.weight_quantizer is not None and \
            config.weight_quantizer.quantizer.precision < 8

    report = {
        "scheme": spec.name,
        "low_bit": sorted(n for n, c in configs.items() if low_bit(c)),
        "low_bit_activations": sorted(n for n, c in configs.items() if isinstance(c, ActivationConfig)),
        "eight_bit": sorted(n for n, c in configs.items() if not low_bit(c) and not isinstance(c, ActivationConfig)),
        "float": sorted(set(keep_float) | {u.layer for u in unsupported} | set(passed)),
        "passed_through": sorted(passed),
        "unsupported": [dataclasses.asdict(u) for u in unsupported],
    }
    return quantized, report
