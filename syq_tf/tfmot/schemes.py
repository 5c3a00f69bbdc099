"""Whole-model schemes: names such as ``syq-w2a8`` (:func:`parse_scheme`), the tfmot registry and
``QuantizeScheme`` that apply them."""

import tensorflow as tf
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_configs as default_configs,  # (its output-only config is not public)
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_transforms as default_transforms,  # (the layout transforms are not public)
)
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (
    model_transformer,
)

from syq_tf.quantizers import UniQ
from syq_tf.schemes import Scheme, parse_scheme
from syq_tf.tfmot.adapter import kernel_attr, tq
from syq_tf.tfmot.configs import ActivationConfig, QuantizeConfig

ACTIVATION_LAYERS = (tf.keras.layers.ReLU, tf.keras.layers.Activation)
# Not in tfmot's registry, but handled by the default scheme's layout transforms.
TRANSFORMED = (tf.keras.layers.BatchNormalization,)
# Split by the layout transform into kernel layers the registry quantizes (NamedSeparableConvQuantize).
SPLIT = (tf.keras.layers.SeparableConv2D,)


def has_kernel(layer):
    return kernel_attr(layer) is not None


class SchemeRegistry(tq.default_8bit.Default8BitQuantizeRegistry):
    """tfmot's default 8-bit registry, except: kernel layers get the scheme's weight quantizer
    (those named in ``eight_bit`` keep the default 8-bit configs; kernels tfmot has none for get
    8-bit UniQ), activation layers the scheme's activation quantizer below 8 bits, and a
    BatchNormalization the transforms left alone an 8-bit output config."""

    def __init__(self, scheme, eight_bit=()):
        super().__init__()
        self.spec = parse_scheme(scheme) if not isinstance(scheme, Scheme) else scheme
        self.eight_bit = frozenset(eight_bit)

    def supports(self, layer):
        """Layers with a kernel, activation layers and tfmot's layout-transformed ones."""
        return has_kernel(layer) or isinstance(layer, ACTIVATION_LAYERS + TRANSFORMED + SPLIT) or \
            super().supports(layer)

    def get_quantize_config(self, layer):
        """A kernel layer's config here quantizes its output too (8 bits, tfmot's default range):
        the layout transform gives the layers whose output a following BatchNormalization or ReLU
        quantizes a weight-only config first (:class:`LayoutTransform`)."""
        if has_kernel(layer):
            if layer.name in self.eight_bit:
                if super().supports(layer):
                    return super().get_quantize_config(layer)
                return QuantizeConfig(UniQ(8, "channel"), output_8bit=True)
            return QuantizeConfig(self.spec.weight_quantizer(), output_8bit=True)
        if isinstance(layer, ACTIVATION_LAYERS) and self.spec.activation_quantizer() is not None:
            return ActivationConfig(self.spec.activation_quantizer())
        if isinstance(layer, TRANSFORMED) and not super().supports(layer):
            return default_configs.Default8BitOutputQuantizeConfig()
        return super().get_quantize_config(layer)


def separable_parts(name):
    """Names of the DepthwiseConv2D and the 1x1 Conv2D a SeparableConv2D ``name`` becomes."""
    return f"{name}_depthwise", f"{name}_pointwise"


class NamedSeparableConvQuantize(default_transforms.SeparableConvQuantize):
    """tfmot's SeparableConv2D -> DepthwiseConv2D + 1x1 Conv2D split, with the parts named after the
    layer (:func:`separable_parts`) instead of Keras' generated names, so reports and the first /
    last layer rule can name them."""

    def replacement(self, match_layer):
        node = super().replacement(match_layer)
        if node is match_layer:
            return node
        depthwise, pointwise = separable_parts(match_layer.layer["config"]["name"])
        for part, name in ((node.input_layers[0], depthwise), (node, pointwise)):
            part.layer["name"] = part.layer["config"]["name"] = name
        return node


class LayoutTransform(tq.default_8bit.Default8BitQuantizeLayoutTransform):
    """tfmot's default 8-bit layout transforms, with three changes:

    - Dense + BatchNormalization + ReLU matches before Dense + BatchNormalization (see TRANSFORMS),
      so no fake-quant sits between them, as for Conv2D;
    - a SeparableConv2D is split into parts named after it (:class:`NamedSeparableConvQuantize`);
    - a kernel layer directly followed by a ReLU (or a BatchNormalization) keeps its weight quantizer,
      without output quantization (other kernel layers get an 8-bit output range from
      :class:`SchemeRegistry`, as tfmot's default configs). tfmot gives such a
      layer a no-op config (no fake-quant between the layer and its ReLU), which would leave the
      kernel float while the scheme says low bit (or 8 bit, for the first and last layers); the
      scheme's weight-only configs (:func:`eight_bit_weights` for 8 bits) put no fake-quant on the
      output either."""

    TRANSFORMS = (
        default_transforms.InputLayerQuantize,
        default_transforms.SeparableConv1DQuantize,
        NamedSeparableConvQuantize,
        default_transforms.Conv2DReshapeBatchNormReLUQuantize,
        default_transforms.Conv2DReshapeBatchNormActivationQuantize,
        default_transforms.Conv2DBatchNormReLUQuantize,
        default_transforms.Conv2DBatchNormActivationQuantize,
        default_transforms.Conv2DReshapeBatchNormQuantize,
        default_transforms.Conv2DBatchNormQuantize,
        default_transforms.ConcatTransform6Inputs,
        default_transforms.ConcatTransform5Inputs,
        default_transforms.ConcatTransform4Inputs,
        default_transforms.ConcatTransform3Inputs,
        default_transforms.ConcatTransform,
        # the longer Dense patterns first (as tfmot orders the Conv2D ones): in tfmot's order
        # Dense + BatchNorm matches first and gives the BatchNorm an 8-bit output fake-quant, which
        # then keeps Dense + BatchNorm + ReLU from matching; the converter fuses the three into one
        # FULLY_CONNECTED that rounds once, at the ReLU's output, so that fake-quant was a rounding
        # Keras made and TFLite did not (before a 4-bit DoReFa ReLU: 3.4 % of the first layer's
        # levels off by one in LiteRT on the MLPerf Tiny autoencoder)
        default_transforms.DenseBatchNormReLUQuantize,
        default_transforms.DenseBatchNormActivationQuantize,
        default_transforms.DenseBatchNormQuantize,
        default_transforms.LayerReLUQuantize,
        default_transforms.LayerReluActivationQuantize,
    )

    def __init__(self, scheme, eight_bit=()):
        super().__init__()
        self.spec = parse_scheme(scheme) if not isinstance(scheme, Scheme) else scheme
        self.eight_bit = frozenset(eight_bit)

    def apply(self, model, layer_quantize_map):
        transformed, quantize_map = model_transformer.ModelTransformer(
            model, [t() for t in self.TRANSFORMS], set(layer_quantize_map), layer_quantize_map).transform()
        registry = tq.default_8bit.Default8BitQuantizeRegistry()
        for layer in transformed.layers:
            config = quantize_map.get(layer.name, {}).get("quantize_config")
            if isinstance(config, default_configs.NoOpQuantizeConfig) and has_kernel(layer):
                # the scheme's weights without the output fake-quant the fused BatchNormalization /
                # ReLU must not have (an 8-bit layer keeps 8-bit weights: the report says so)
                quantize_map[layer.name]["quantize_config"] = (
                    eight_bit_weights(layer, registry) if layer.name in self.eight_bit
                    else QuantizeConfig(self.spec.weight_quantizer()))
        return transformed, quantize_map


def eight_bit_weights(layer, registry):
    """The 8-bit config of a kernel layer without output quantization: tfmot's default (per-channel
    for Conv2D / DepthwiseConv2D, per-tensor for Conv2DTranspose and Dense) with its weights only,
    else 8-bit UniQ per output channel (Conv1D, Conv1DTranspose)."""
    if registry.supports(layer):
        config = registry.get_quantize_config(layer)
        return type(config)(config.weight_attrs, [], False)
    return QuantizeConfig(UniQ(8, "channel"))


class SyqQuantizeScheme(tq.QuantizeScheme):
    """A tfmot ``QuantizeScheme``: tfmot's default 8-bit layout transforms (BatchNorm handling,
    :class:`LayoutTransform`) and
    :class:`SchemeRegistry` for ``scheme`` (a name such as "syq-w2a8"), for
    ``quantize_apply(annotated_model, scheme=SyqQuantizeScheme("syq-w2a8"))``."""

    def __init__(self, scheme="syq-w2a8", eight_bit=()):
        self.spec = parse_scheme(scheme)
        self.eight_bit = tuple(eight_bit)

    def get_layout_transformer(self):
        return LayoutTransform(self.spec, self.eight_bit)

    def get_quantize_registry(self):
        return SchemeRegistry(self.spec, self.eight_bit)
