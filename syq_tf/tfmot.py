"""tfmot integration: syq_tf quantizers as tfmot ``Quantizer``s / ``QuantizeConfig``s, and schemes.

tensorflow-model-optimization splits quantization into *what* (a ``QuantizeConfig`` per layer: which
weights and activations, with which quantizers) and *how* (a ``Quantizer``: build its variables on
the wrapper layer, then quantize a tensor). Here:

- :class:`TfmotQuantizer` puts any syq_tf quantizer behind tfmot's ``Quantizer`` interface. Its
  variables (SYQ alpha, UniQ delta, loss-aware scales, activation steps, ...) are created through the
  wrapper's ``layer.add_weight``, so they are the ``QuantizeWrapperV2``'s weights: trained, saved
  and restored with it; the math is the syq_tf quantizer's own.
- :class:`QuantizeConfig` quantizes a layer's kernel with a weight quantizer and (optionally) its
  output with an activation quantizer; :class:`SYQConfig`, :class:`UniQConfig`,
  :class:`LeastSquaresConfig`, :class:`LossAwareConfig` build one per method and
  :class:`ActivationConfig` quantizes only a layer's output (ReLU, BatchNorm, ...).
- :func:`quantize_model` quantizes a whole float model with a scheme name such as ``"syq-w2a8"``:
  the paper's layers in low precision, the first and last weighted layers with tfmot's default
  8-bit configs, everything else as tfmot's default 8-bit scheme does it (including its BatchNorm
  handling), the user's ``keep_float`` layers and (on request) unsupported ones left in float.
- :func:`quantize_scope` is tfmot's ``quantize_scope`` with syq_tf's classes in it (needed by
  ``quantize_apply`` and for loading tfmot models).

    with syq_tf.tfmot.quantize_scope():
        annotated = tfmot.quantization.keras.quantize_annotate_layer(
            tf.keras.layers.Conv2D(64, 3), quantize_config=syq_tf.tfmot.SYQConfig(bits=2, granularity="pixel"))
        ...
        model = tfmot.quantization.keras.quantize_apply(annotated_model)
    model = syq_tf.quantize_model(float_model, scheme="syq-w2a8")      # or the whole model at once
"""

import dataclasses
import inspect
import re

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from syq_tf.layers import deserialize_quantizer
from syq_tf.optimizers import mark_quantized
from syq_tf.quantizers import (
    SYQ,
    ActivationQuantizer,
    DoReFaActivation,
    LeastSquares,
    LeastSquaresActivation,
    LossAware,
    UniQ,
    UniQActivation,
    WeightQuantizer,
)

from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (  # noqa: E402
    default_8bit_quantize_configs as _default_configs,  # (its output-only config is not public)
)

_tq = tfmot.quantization.keras

# layer class -> attribute of the kernel a weight quantizer takes over
_KERNEL_ATTRS = (
    (tf.keras.layers.DepthwiseConv2D, "depthwise_kernel"),
    (tf.keras.layers.Conv2D, "kernel"),
    (tf.keras.layers.Conv1D, "kernel"),
    (tf.keras.layers.Dense, "kernel"),
)


def _kernel_attr(layer):
    for cls, attr in _KERNEL_ATTRS:
        if isinstance(layer, cls):
            return attr
    return None


def _register(cls):
    return tf.keras.utils.register_keras_serializable(package="syq_tf")(cls)


@_register
class TfmotQuantizer(_tq.quantizers.Quantizer):
    """A syq_tf quantizer (weight or activation) behind tfmot's ``Quantizer`` interface.

    ``build`` makes a fresh instance of ``quantizer`` for the wrapper layer whose variables are the
    wrapper's own weights (``layer.add_weight``); ``__call__`` runs it. ``export=True`` is the
    inference form used to convert to TFLite: a weight quantizer then passes through the kernel,
    which already holds the quantized values; an activation quantizer with a fixed grid becomes an
    int8 fake-quant on that grid (clip at the top level, int8 scale = the step).
    """

    def __init__(self, quantizer, export=False):
        if isinstance(quantizer, dict):
            quantizer = deserialize_quantizer(quantizer)
        if not isinstance(quantizer, (WeightQuantizer, ActivationQuantizer)):
            raise TypeError(
                f"TfmotQuantizer: expected a syq_tf quantizer (e.g. SYQ, UniQ, DoReFaActivation), got "
                f"{quantizer!r}."
            )
        self.quantizer = quantizer
        self.export = bool(export)
        self.impl = None  # the built instance
        self.variable = None  # the float kernel (weight quantizers; set by the QuantizeConfig)
        self.ready = not export  # export form: True once the copy holds the model's values

    @property
    def role(self):
        return self.quantizer.role

    def build(self, tensor_shape, name, layer):
        tensor_name = name
        config = dict(self.quantizer.get_config())
        config["name"] = f"{layer.name}_{name}_quantizer"
        impl = type(self.quantizer).from_config(config)
        created = {}

        def add_weight(name=None, *args, **kwargs):  # noqa: B023  (the quantizer's own add_weight calls)
            variable = layer.add_weight(f"{tensor_name}_{name}", *args, **kwargs)
            created[name] = variable
            return variable

        object.__setattr__(impl, "add_weight", add_weight)
        # tfmot lists the inner layer's weights among the wrapper's trainable weights before the
        # quantizers' variables when the inner layer was built beforehand (quantize_apply) and after
        # them otherwise (a reloaded model): with trainable scales that would reorder the weights
        # between a model and its reload (h5 files load by position). Inner weights first, always.
        for variable in getattr(getattr(layer, "layer", None), "trainable_weights", []):
            if not any(variable is v for v in layer._trainable_weights):
                layer._trainable_weights.append(variable)
        impl.build(tf.TensorShape(tensor_shape))
        # Variables a quantizer keeps outside its weights (LossAware's optimizer-binding flag) must be
        # reachable from the wrapper too: a SavedModel saves what its functions capture.
        for attr, value in list(vars(impl).items()):
            if isinstance(value, tf.Variable) and not any(value is v for v in created.values()):
                layer._track_trackable(value, name=f"{name}_{attr.strip('_')}")
        if self.variable is not None and isinstance(impl, LossAware):
            mark_quantized(self.variable, impl)  # LossAwareAdam finds it through the kernel
        self.impl = impl
        return created

    def __call__(self, inputs, training, weights, **kwargs):
        if self.export:
            return self._export_form(inputs)
        if "training" in inspect.signature(self.impl.call).parameters:
            return self.impl(inputs, training=training)
        return self.impl(inputs)

    def _export_form(self, inputs):
        if self.role == "weight":
            # The kernel already holds the quantized values; the converter stores them as int8 with
            # its own (per-channel) scales after folding BatchNorm, and to_tflite's exact-codebook
            # pass re-expresses them where rounding would miss a level. (A FakeQuant on the kernel
            # here breaks the folding: measured 41-82% agreement instead of 100%.)
            return tf.identity(inputs)
        if not self.ready:  # the copy is being built; its values are not set yet
            return tf.identity(inputs)
        with tf.init_scope():  # the grid is read from variables, eagerly
            grid = self.impl.export_grid()
            export_range = self.impl.export_range() if grid is None else None
        if grid is None:
            low, high = export_range
            return tf.quantization.fake_quant_with_min_max_args(inputs, min=low, max=high, num_bits=8)
        step, levels = grid
        x = tf.minimum(inputs, (levels - 1) * step) if levels < 256 else inputs
        return tf.quantization.fake_quant_with_min_max_args(x, min=0.0, max=255.0 * step, num_bits=8)

    def get_config(self):
        return {"quantizer": tf.keras.utils.serialize_keras_object(self.quantizer), "export": self.export}

    def __eq__(self, other):
        return isinstance(other, TfmotQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


def _as_tfmot(quantizer, what):
    if quantizer is None or isinstance(quantizer, TfmotQuantizer):
        return quantizer
    if isinstance(quantizer, (WeightQuantizer, ActivationQuantizer, dict)):
        return TfmotQuantizer(quantizer)
    raise TypeError(f"{what}: expected a syq_tf quantizer or None, got {quantizer!r}.")


@_register
class QuantizeConfig(_tq.QuantizeConfig):
    """Kernel quantized by ``weight_quantizer``, output by ``output_quantizer`` (either may be None).

    Works for Conv1D/Conv2D/DepthwiseConv2D/Dense (the kernel attribute is found from the layer).
    A layer's own ``activation`` is left as it is; to quantize after an activation function, put the
    activation in its own layer with an :class:`ActivationConfig`.
    """

    def __init__(self, weight_quantizer=None, output_quantizer=None):
        self.weight_quantizer = _as_tfmot(weight_quantizer, "QuantizeConfig weight_quantizer")
        self.output_quantizer = _as_tfmot(output_quantizer, "QuantizeConfig output_quantizer")
        if self.weight_quantizer is not None and self.weight_quantizer.role != "weight":
            raise ValueError(
                f"QuantizeConfig: weight_quantizer {type(self.weight_quantizer.quantizer).__name__} "
                "quantizes activations; pass it as output_quantizer."
            )
        if self.output_quantizer is not None and self.output_quantizer.role != "activation":
            raise ValueError(
                f"QuantizeConfig: output_quantizer {type(self.output_quantizer.quantizer).__name__} "
                "quantizes weights; pass it as weight_quantizer."
            )

    def _attr(self, layer):
        attr = _kernel_attr(layer)
        if attr is None:
            raise ValueError(
                f"{type(self).__name__}: layer '{layer.name}' ({type(layer).__name__}) has no kernel to "
                "quantize; supported: Conv1D, Conv2D, DepthwiseConv2D, Dense (ActivationConfig quantizes "
                "only outputs)."
            )
        return attr

    def get_weights_and_quantizers(self, layer):
        if self.weight_quantizer is None:
            return []
        attr = self._attr(layer)
        kernel = getattr(layer, attr)
        self.weight_quantizer.variable = kernel
        if isinstance(self.weight_quantizer.quantizer, (SYQ, LeastSquares, LossAware)) and isinstance(
                layer, tf.keras.layers.DepthwiseConv2D):
            config = {**self.weight_quantizer.quantizer.get_config(), "depthwise": True}
            self.weight_quantizer.quantizer = type(self.weight_quantizer.quantizer).from_config(config)
        return [(kernel, self.weight_quantizer)]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        if self.weight_quantizer is not None:
            setattr(layer, self._attr(layer), quantize_weights[0])

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [self.output_quantizer] if self.output_quantizer is not None else []

    def quantizers(self):
        return [q for q in (self.weight_quantizer, self.output_quantizer) if q is not None]

    def get_config(self):
        return {
            "weight_quantizer": None if self.weight_quantizer is None else self.weight_quantizer.get_config(),
            "output_quantizer": None if self.output_quantizer is None else self.output_quantizer.get_config(),
        }

    @classmethod
    def from_config(cls, config):
        quantizers = dict(config)
        for key in ("weight_quantizer", "output_quantizer"):
            if isinstance(quantizers.get(key), dict) and "quantizer" in quantizers[key]:
                quantizers[key] = TfmotQuantizer(**quantizers[key])
        # The saved form is the built quantizers, whatever the subclass's own constructor arguments
        # were (SYQConfig(bits=...), ...): restore them through the generic constructor.
        restored = cls.__new__(cls)
        QuantizeConfig.__init__(restored, **quantizers)
        return restored

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


def _output(activation_bits):
    """The paper's activation quantizer for a bit width (None: no output quantizer)."""
    return None if activation_bits is None else DoReFaActivation(activation_bits)


@_register
class SYQConfig(QuantizeConfig):
    """SYQ kernel (``bits``, ``granularity``, ``eta``), optional DoReFa output of ``activation_bits``."""

    def __init__(self, bits=2, granularity="layer", eta=0.05, activation_bits=None):
        super().__init__(SYQ(bits, granularity, eta), _output(activation_bits))


@_register
class UniQConfig(QuantizeConfig):
    """UniQ kernel (``bits``, ``granularity``), optional UniQActivation output of ``activation_bits``
    (calibrate it with :func:`syq_tf.calibrate`)."""

    def __init__(self, bits=4, granularity="channel", activation_bits=None):
        out = None if activation_bits is None else UniQActivation(activation_bits)
        super().__init__(UniQ(bits, granularity), out)


@_register
class LeastSquaresConfig(QuantizeConfig):
    """Least-squares kernel (``mode``), optional least-squares activation output (``activation_mode``)."""

    def __init__(self, mode="ls1", granularity="channel", activation_mode=None):
        out = None if activation_mode is None else LeastSquaresActivation(activation_mode)
        super().__init__(LeastSquares(mode, granularity), out)


@_register
class LossAwareConfig(QuantizeConfig):
    """Loss-aware kernel (``mode``, ``bits``; train with :class:`syq_tf.LossAwareAdam`), optional
    DoReFa output of ``activation_bits``."""

    def __init__(self, mode="binary", bits=None, granularity="layer", activation_bits=None):
        super().__init__(LossAware(mode, bits=bits, granularity=granularity), _output(activation_bits))


@_register
class ActivationConfig(QuantizeConfig):
    """Only the layer's output, quantized by ``quantizer`` (DoReFaActivation, UniQActivation, ...)."""

    def __init__(self, quantizer=None):
        super().__init__(None, quantizer)


def custom_objects():
    """syq_tf's tfmot classes and quantizers, for ``quantize_scope`` / ``load_model``."""
    classes = [TfmotQuantizer, QuantizeConfig, SYQConfig, UniQConfig, LeastSquaresConfig, LossAwareConfig,
               ActivationConfig]
    return {cls.__name__: cls for cls in classes}


def quantize_scope(*extra):
    """tfmot's ``quantize_scope`` with syq_tf's classes (and any ``extra`` dicts of custom objects)."""
    objects = custom_objects()
    for e in extra:
        objects.update(e)
    return _tq.quantize_scope(objects)


# ------------------------------------------------------------------------------------------------
# Whole-model schemes


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A parsed scheme name ``<method>-w<bits>[a<bits>]``, e.g. syq-w2a8, uniq-w4a4, ls-w1a2, lab-w1."""

    name: str
    method: str
    weight_bits: int
    activation_bits: int  # 8: tfmot's default 8-bit activations

    def weight_quantizer(self):
        m, b = self.method, self.weight_bits
        if m == "syq":
            return SYQ(b, "channel")
        if m == "uniq":
            return UniQ(b, "channel")
        if m == "ls":
            return LeastSquares({1: "ls1", 2: "ls2"}[b])
        if m == "lab":
            return LossAware("binary")
        if m == "lat":
            return LossAware("ternary")
        return LossAware("linear", bits=b)  # laq

    def activation_quantizer(self):
        if self.activation_bits >= 8:
            return None  # tfmot's default 8-bit output quantization
        if self.method == "uniq":
            return UniQActivation(self.activation_bits)
        return DoReFaActivation(self.activation_bits)


_SCHEME = re.compile(r"^(syq|uniq|ls|lab|lat|laq)-w(\d)(?:a(\d))?$")
_WEIGHT_BITS = {"syq": (1, 2), "uniq": tuple(range(1, 9)), "ls": (1, 2), "lab": (1,), "lat": (2,),
                "laq": tuple(range(2, 9))}


def parse_scheme(name):
    """:class:`Scheme` from a name like ``syq-w2a8`` (activations default to 8 bits); ValueError
    naming what is allowed otherwise."""
    match = _SCHEME.match(str(name).strip().lower())
    allowed = ("<method>-w<bits>[a<bits>] with method syq (w1, w2), uniq (w1..w8), ls (w1 ls1, w2 ls2), "
               "lab (w1), lat (w2), laq (w2..w8) and activation bits 1..8, e.g. syq-w2a8, uniq-w4a4, "
               "ls-w1a2, lab-w1")
    if not match:
        raise ValueError(f"quantize_model: unknown scheme {name!r}; expected {allowed}.")
    method, wb, ab = match.group(1), int(match.group(2)), int(match.group(3) or 8)
    if wb not in _WEIGHT_BITS[method] or not 1 <= ab <= 8:
        raise ValueError(f"quantize_model: scheme {name!r} has unsupported bit widths; expected {allowed}.")
    return Scheme(str(name), method, wb, ab)


@dataclasses.dataclass
class Unsupported:
    """A layer :func:`quantize_model` cannot quantize under the scheme, and why."""

    layer: str
    type: str
    why: str


class UnsupportedLayersError(ValueError):
    """Raised by :func:`quantize_model` (``on_unsupported="raise"``) naming every unsupported layer."""

    def __init__(self, unsupported):
        self.unsupported = list(unsupported)
        lines = "; ".join(f"'{u.layer}' ({u.type}): {u.why}" for u in self.unsupported)
        super().__init__(
            f"quantize_model: {len(self.unsupported)} layer(s) cannot be quantized: {lines}. Pass "
            "on_unsupported='keep_float' to leave them in float, or keep_float=[names]."
        )


_ACTIVATION_LAYERS = (tf.keras.layers.ReLU, tf.keras.layers.Activation)
# Not in tfmot's registry, but handled by the default scheme's layout transforms.
_TRANSFORMED = (tf.keras.layers.BatchNormalization,)


def _weighted(layer):
    return _kernel_attr(layer) is not None


class SchemeRegistry(_tq.default_8bit.Default8BitQuantizeRegistry):
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
        return _weighted(layer) or isinstance(layer, _ACTIVATION_LAYERS + _TRANSFORMED) or super().supports(layer)

    def get_quantize_config(self, layer):
        if _weighted(layer):
            if layer.name in self.eight_bit:
                if super().supports(layer):
                    return super().get_quantize_config(layer)
                return QuantizeConfig(UniQ(8, "channel"))
            return QuantizeConfig(self.spec.weight_quantizer())
        if isinstance(layer, _ACTIVATION_LAYERS) and self.spec.activation_quantizer() is not None:
            return ActivationConfig(self.spec.activation_quantizer())
        if isinstance(layer, _TRANSFORMED) and not super().supports(layer):
            return _default_configs.Default8BitOutputQuantizeConfig()
        return super().get_quantize_config(layer)


class SyqQuantizeScheme(_tq.QuantizeScheme):
    """A tfmot ``QuantizeScheme``: tfmot's default 8-bit layout transforms (BatchNorm handling) and
    :class:`SchemeRegistry` for ``scheme`` (a name such as "syq-w2a8"), for
    ``quantize_apply(annotated_model, scheme=SyqQuantizeScheme("syq-w2a8"))``."""

    def __init__(self, scheme="syq-w2a8", eight_bit=()):
        self.spec = parse_scheme(scheme)
        self.eight_bit = tuple(eight_bit)

    def get_layout_transformer(self):
        return _tq.default_8bit.Default8BitQuantizeLayoutTransform()

    def get_quantize_registry(self):
        return SchemeRegistry(self.spec, self.eight_bit)


def quantize_model(model, scheme="syq-w2a8", keep_float=(), on_unsupported="error", return_report=False):
    """Quantize a float Sequential or functional Keras model with tfmot and a syq_tf scheme.

    - Weighted layers (Conv1D/Conv2D/DepthwiseConv2D/Dense) between the first and the last get the
      scheme's weight quantizer (SYQ per channel, UniQ per channel, ls1/ls2, LAB/LAT/LAQ); the first
      and last weighted layers get tfmot's default 8-bit configs, as the papers keep them (8-bit
      UniQ per channel where tfmot has none, e.g. Conv1D).
    - Activations: ``a8`` uses tfmot's default 8-bit output quantization everywhere; below 8 bits the
      outputs of ReLU/Activation layers get the scheme's activation quantizer (DoReFa, or UniQ's for
      uniq: calibrate with :func:`syq_tf.calibrate`), other layers tfmot's default.
    - BatchNormalization and every other layer are handled by tfmot's default 8-bit layout
      transforms and registry (:class:`SyqQuantizeScheme`).
    - ``keep_float``: names of layers to leave in float. Layers neither tfmot's registry nor syq_tf
      supports raise :class:`UnsupportedLayersError` (names, types, why) unless
      ``on_unsupported="keep_float"``, which leaves them in float.

    Returns the quantized (``QuantizeWrapperV2``) model, or ``(model, report)`` with
    ``return_report=True``; report: {"scheme", "low_bit", "low_bit_activations", "eight_bit",
    "float", "unsupported"}.
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
    names = {layer.name for layer in model.layers}
    missing = sorted(set(keep_float) - names)
    if missing:
        raise ValueError(f"quantize_model: keep_float names layers the model does not have: {missing}.")
    weighted = [layer for layer in model.layers if _weighted(layer) and layer.name not in keep_float]
    first_last = {weighted[0].name, weighted[-1].name} if weighted else set()
    registry = SchemeRegistry(spec, first_last)
    quantized_names, unsupported = set(), []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.InputLayer) or layer.name in keep_float:
            continue
        if registry.supports(layer):
            quantized_names.add(layer.name)
            continue
        why = ("tfmot's default 8-bit registry does not support it and syq_tf has no config for it "
               "(syq_tf quantizes Conv1D, Conv2D, DepthwiseConv2D and Dense kernels)")
        unsupported.append(Unsupported(layer.name, type(layer).__name__, why))
    if unsupported and on_unsupported == "error":
        raise UnsupportedLayersError(unsupported)

    def annotate(layer):
        copy = layer.__class__.from_config(layer.get_config())
        return _tq.quantize_annotate_layer(copy) if layer.name in quantized_names else copy

    with quantize_scope():
        annotated = tf.keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        quantized = _tq.quantize_apply(annotated, scheme=SyqQuantizeScheme(spec.name, sorted(first_last)))
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
        "float": sorted(set(keep_float) | {u.layer for u in unsupported}),
        "unsupported": [dataclasses.asdict(u) for u in unsupported],
    }
    return quantized, report


def is_wrapper(layer):
    """True for a tfmot ``QuantizeWrapper`` (what ``quantize_apply`` puts around each layer)."""
    return isinstance(layer, _tq.QuantizeWrapper)


def wrapper_kernels(layer):
    """{kernel attr: (syq_tf quantizer or None, float kernel variable)} of a tfmot QuantizeWrapper."""
    out = {}
    config = layer.quantize_config
    for weight, quantizer, _ in getattr(layer, "_weight_vars", []):
        attr = weight.name.split("/")[-1].split(":")[0]
        impl = quantizer.impl if isinstance(quantizer, TfmotQuantizer) else None
        out[attr] = (impl, weight)
    if not out and not isinstance(config, QuantizeConfig):
        attr = _kernel_attr(layer.layer)
        if attr is not None and hasattr(layer.layer, attr) and isinstance(getattr(layer.layer, attr), tf.Variable):
            out[attr] = (None, getattr(layer.layer, attr))
    return out


def export_form(model):
    """A copy of a tfmot model quantized with syq_tf configs, ready for TFLite conversion: every
    syq_tf weight quantizer's kernel holds its quantized values and only marks their int8 range;
    activation quantizers become int8 fake-quants on their grid; tfmot's own quantizers unchanged."""
    with quantize_scope():
        def clone(layer):
            config = layer.get_config()
            if is_wrapper(layer) and isinstance(layer.quantize_config, QuantizeConfig):
                qc = config["quantize_config"]["config"]
                for key in ("weight_quantizer", "output_quantizer"):
                    if qc.get(key) is not None:
                        qc[key] = {**qc[key], "export": True}
            return layer.__class__.from_config(config)

        exported = tf.keras.models.clone_model(model, clone_function=clone)
    for old, new in zip(model.layers, exported.layers):
        quantized = {}
        if is_wrapper(old) and isinstance(old.quantize_config, QuantizeConfig):
            for impl, variable in wrapper_kernels(old).values():
                if impl is not None:
                    quantized[id(variable)] = tf.convert_to_tensor(impl(tf.convert_to_tensor(variable))).numpy()
        # variable names differ in their scopes between the two builds; leaves are unique per layer
        by_leaf = {v.name.split("/")[-1]: quantized.get(id(v), v.numpy()) for v in old.weights}
        leaves = [v.name.split("/")[-1] for v in new.weights]
        if len(by_leaf) != len(old.weights) or sorted(by_leaf) != sorted(leaves):
            raise ValueError(f"export_form: layer {old.name!r}: weights of the copy do not match the "
                             f"model's: {sorted(by_leaf)} vs {sorted(leaves)}.")
        for variable, leaf in zip(new.weights, leaves):
            variable.assign(by_leaf[leaf])
        if is_wrapper(new) and isinstance(new.quantize_config, QuantizeConfig):
            for quantizer in new.quantize_config.quantizers():
                quantizer.ready = True
    return exported
