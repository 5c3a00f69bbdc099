"""``syq_tf.quantize``: quantize a Keras layer class, subclass or instance.

The quantized layer keeps the float kernel as its trainable variable; every call it runs the input
quantizer on the inputs and the kernel quantizer on the kernel, then the original layer's own
``call`` with the quantized kernel in place of the float one.
"""

import math

import tensorflow as tf

from syq_tf.optimizers import mark_quantized
from syq_tf.quantizers._common import KERAS, ActivationQuantizer, WeightQuantizer, int8_unit_grid
from syq_tf.quantizers.activations import MovingAverageActivation

if KERAS == 2:
    import larq as lq

# Stock Keras layers with one kernel, and the attribute that holds it.
KERNEL_ATTR = {
    # SeparableConv2D: ``kernel_quantizer`` takes the pointwise kernel, ``depthwise_quantizer`` the
    # depthwise one (QuantizedSeparableMixin).
    tf.keras.layers.SeparableConv2D: "pointwise_kernel",
    tf.keras.layers.DepthwiseConv2D: "depthwise_kernel" if KERAS == 2 else "kernel",
    tf.keras.layers.Conv1D: "kernel",
    tf.keras.layers.Conv2D: "kernel",
    tf.keras.layers.Conv3D: "kernel",
    # Transposed convolutions: kernels [k, c_out, c_in] / [kh, kw, c_out, c_in], the output channel
    # one before last (their quantizers get transposed=True, see TRANSPOSED).
    tf.keras.layers.Conv1DTranspose: "kernel",
    tf.keras.layers.Conv2DTranspose: "kernel",
    tf.keras.layers.Dense: "kernel",
    tf.keras.layers.EinsumDense: "kernel",  # e.g. MultiHeadAttention's projections
    tf.keras.layers.Embedding: "embeddings",  # the table (its rows are looked up, not multiplied)
    # Recurrent layers: the input kernel and the recurrent kernel of their cell are both quantized.
    tf.keras.layers.LSTM: "cell.kernel",
    tf.keras.layers.GRU: "cell.kernel",
    tf.keras.layers.SimpleRNN: "cell.kernel",
}
# Kernel layers whose layouts or kernels differ; quantizing them needs work not done yet.
_UNSUPPORTED = (
    tf.keras.layers.Conv3DTranspose,
    tf.keras.layers.SeparableConv1D,
)
SUPPORTED_LAYERS = tuple(cls.__name__ for cls in KERNEL_ATTR)
# Layers whose kernel has the output channel one before last ([.., c_out, c_in]).
TRANSPOSED = (tf.keras.layers.Conv1DTranspose, tf.keras.layers.Conv2DTranspose)


def _kernel_attr_for(cls, what):
    for bad in _UNSUPPORTED:
        if issubclass(cls, bad):
            raise TypeError(
                f"syq_tf.quantize: {what} is a {bad.__name__}, which is not supported yet; "
                f"supported layer types: {', '.join(SUPPORTED_LAYERS)}."
            )
    for base, attr in KERNEL_ATTR.items():
        if issubclass(cls, base):
            return attr, base
    raise TypeError(
        f"syq_tf.quantize: {what} ({cls.__name__}) has no kernel to quantize; supported layer "
        f"types: {', '.join(SUPPORTED_LAYERS)} and their subclasses."
    )


_WEIGHT_ROLES = ("kernel_quantizer", "recurrent_quantizer", "depthwise_quantizer")


def _copy_quantizer(quantizer, role, layer_name, **overrides):
    """A fresh quantizer instance for one layer (quantizers with scales must not be shared)."""
    if quantizer is None:
        return None
    if isinstance(quantizer, (str, dict)):
        quantizer = quantizer_from(quantizer, f"layer '{layer_name}': {role}")
    weights = role in _WEIGHT_ROLES
    expected = WeightQuantizer if weights else ActivationQuantizer
    wrong = ActivationQuantizer if weights else WeightQuantizer
    if isinstance(quantizer, wrong):
        raise ValueError(
            f"layer '{layer_name}': {type(quantizer).__name__} quantizes "
            f"{'activations' if weights else 'weights'} and cannot be used as "
            f"{role}; use a {expected.__name__} such as {'SYQ' if weights else 'DoReFa'}."
        )
    if isinstance(quantizer, tf.keras.layers.Layer):
        config = dict(quantizer.get_config())
        config["name"] = f"{layer_name}_{role}"
        config.update(overrides)
        return type(quantizer).from_config(config)
    if callable(quantizer):  # a plain function such as larq.quantizers.ste_sign
        return quantizer
    raise TypeError(f"layer '{layer_name}': {role} must be a quantizer, got {quantizer!r}.")


class QuantizedLayerMixin:
    """Adds ``kernel_quantizer`` / ``input_quantizer`` to a stock Keras kernel layer."""

    _syq_kernel_attr = "kernel"
    _syq_depthwise = False
    _syq_transposed = False
    _syq_defaults = {}

    def __init__(self, *args, kernel_quantizer=None, input_quantizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        kernel_quantizer = kernel_quantizer or self._syq_defaults.get("kernel_quantizer")
        input_quantizer = input_quantizer or self._syq_defaults.get("input_quantizer")
        extra = {"depthwise": True} if self._syq_depthwise and _has_depthwise_arg(kernel_quantizer) else {}
        extra.update(_transposed_override(kernel_quantizer, self))
        self.kernel_quantizer = _copy_quantizer(kernel_quantizer, "kernel_quantizer", self.name, **extra)
        self.input_quantizer = _copy_quantizer(input_quantizer, "input_quantizer", self.name)

    # (quantizer attribute, path of the kernel attribute) of every quantized kernel of the layer.
    _syq_kernels = (("kernel_quantizer", "kernel"),)

    @property
    def float_kernel(self):
        _, holder, attr = self._kernel_slots()[0]
        return getattr(holder, attr)

    def _kernel_slots(self):
        """(quantizer, object holding the kernel, attribute name) per quantized kernel."""
        slots = []
        for q_attr, path in self._syq_kernels:
            owner, _, attr = path.rpartition(".")
            slots.append((getattr(self, q_attr), getattr(self, owner) if owner else self, attr))
        return slots

    def float_kernels(self):
        """{kernel name: (quantizer or None, float kernel variable)}."""
        return {attr: (q, getattr(holder, attr)) for q, holder, attr in self._kernel_slots()}

    def build(self, input_shape):
        super().build(input_shape)
        if KERAS == 3 and isinstance(self.input_quantizer, tf.keras.layers.Layer) and not self.input_quantizer.built:
            # Keras 3 loads a model by building each layer, then reads every variable: the input
            # quantizer's (UniQ's step) must exist before the first call. (tf_keras builds it there.)
            self.input_quantizer.build(input_shape)
        for quantizer, holder, attr in self._kernel_slots():
            kernel = getattr(holder, attr)
            if isinstance(quantizer, tf.keras.layers.Layer):
                try:
                    # Under the quantizer's own name scope: a layer with two quantizers (LSTM) must
                    # not create two variables both called "<layer>/alpha" (h5 files refuse that).
                    with tf.name_scope(quantizer.name):
                        quantizer.build(kernel.shape)
                except ValueError as err:
                    raise ValueError(f"layer '{self.name}' ({type(self).__name__}): {err}") from None
                # Lets syq_tf.optimizers.LossAwareAdam find the quantizer of a kernel it trains.
                mark_quantized(kernel, quantizer)
            precision = getattr(quantizer, "precision", None)
            if precision:
                # larq.models.summary reads a weight's bit width from `weight.precision`.
                kernel.precision = precision

    def _quantized_call(self, call, inputs):
        if self.input_quantizer is not None:
            inputs = self.input_quantizer(inputs)
        swapped = []
        for quantizer, holder, attr in self._kernel_slots():
            if quantizer is not None:
                float_kernel = getattr(holder, attr)
                swapped.append((holder, attr, float_kernel, quantizer(float_kernel)))
        # Swap the quantized tensors in for the duration of the stock call, bypassing Keras'
        # attribute tracking so the float variables stay the tracked, trained ones.
        for holder, attr, _, quantized in swapped:
            object.__setattr__(holder, _stored_attr(holder, attr), quantized)
        try:
            return call(inputs)
        finally:
            for holder, attr, float_kernel, _ in swapped:
                object.__setattr__(holder, _stored_attr(holder, attr), float_kernel)

    def call(self, inputs):
        return self._quantized_call(super().call, inputs)

    def quantized_kernel(self, name=None):
        """A kernel as the layer computes with it (a tensor); ``name`` defaults to the main kernel."""
        quantizer, kernel = self.float_kernels()[name or self._syq_kernel_attr.rpartition(".")[2]]
        if quantizer is None:
            return tf.convert_to_tensor(kernel)
        return quantizer(kernel)

    # Quantizer constructor arguments, saved in the config (subclasses add theirs).
    _syq_config_keys = ("kernel_quantizer", "input_quantizer")

    def get_config(self):
        return {**super().get_config(), **{k: _serialize(getattr(self, k)) for k in self._syq_config_keys}}

    @classmethod
    def from_config(cls, config):
        return cls(**_deserialized(config, cls._syq_config_keys))

    def _second_quantizer(self, given, role, **overrides):
        """A layer's second weight quantizer (recurrent, depthwise): the one given, else the class
        default for ``role``, else a copy of ``kernel_quantizer``."""
        source = (given or self._syq_defaults.get(role) or self._syq_defaults.get("kernel_quantizer")
                  or self.kernel_quantizer)
        extra = {k: v for k, v in overrides.items() if _has_depthwise_arg(source)}
        return _copy_quantizer(source, role, self.name, **extra)


def _stored_attr(holder, attr):
    """Where ``holder`` stores the kernel ``attr``: Keras 3 reads most kernels through a property
    (``kernel`` returns ``_kernel``, with LoRA or Keras' own quantization applied, both refused)."""
    if isinstance(getattr(type(holder), attr, None), property):
        if getattr(holder, "lora_enabled", False) or getattr(holder, "quantization_mode", None):
            raise ValueError(f"layer '{holder.name}': syq_tf cannot quantize a layer with LoRA or Keras' "
                             "own quantization enabled; disable them (lora_rank=None, no layer.quantize()).")
        return "_" + attr
    return attr


def _deserialized(config, keys):
    """``config`` with the serialized quantizers under ``keys`` turned back into objects."""
    config = dict(config)
    for key in keys:
        if isinstance(config.get(key), dict):
            config[key] = deserialize_quantizer(config[key])
    return config


def _has_depthwise_arg(quantizer):
    return isinstance(quantizer, WeightQuantizer) and "depthwise" in quantizer.get_config()


def _transposed_override(quantizer, layer):
    """``{"transposed": True}`` for a quantizer with per-channel scales on a transposed
    convolution (its output channel is the kernel's axis -2); a ValueError for one marked
    transposed on another layer (its scales would run along the input channels)."""
    if not (isinstance(quantizer, WeightQuantizer) and "transposed" in quantizer.get_config()):
        return {}
    if layer._syq_transposed:
        return {"transposed": True}
    if quantizer.get_config()["transposed"]:
        raise ValueError(
            f"layer '{layer.name}' ({type(layer).__name__}): kernel_quantizer {type(quantizer).__name__} "
            f"has transposed=True, which is for {' / '.join(c.__name__ for c in TRANSPOSED)} kernels "
            "[.., c_out, c_in]; leave it False (syq_tf.quantize sets it for those layers)."
        )
    return {}


def deserialize_quantizer(config):
    """A quantizer from its serialized dict, in either Keras serialization format (h5 files use the
    legacy one, where only the plain class name is looked up; ours are registered under it too)."""
    cls = tf.keras.utils.get_registered_object(config.get("registered_name") or config.get("class_name"))
    if isinstance(cls, type) and issubclass(cls, (WeightQuantizer, ActivationQuantizer)):
        return cls.from_config(config.get("config", {}))
    return quantizer_from(config, "quantizer")


def quantizer_from(identifier, owner):
    """A quantizer from a name (``"syq"``, ``"SYQ"``; under Keras 2 also larq's ``"ste_sign"`` ...)
    or a serialized dict."""
    if KERAS == 2:
        return lq.quantizers.get(identifier)
    name = identifier if isinstance(identifier, str) else identifier.get("class_name")
    cls = tf.keras.utils.get_registered_object(name)
    if isinstance(cls, type) and issubclass(cls, (WeightQuantizer, ActivationQuantizer)):
        return cls() if isinstance(identifier, str) else cls.from_config(identifier.get("config", {}))
    raise ValueError(f"{owner}: unknown quantizer {identifier!r}; give a syq_tf quantizer or its name "
                     "(larq's quantizers are Keras 2 only).")


def _serialize(quantizer):
    if quantizer is None:
        return None
    return tf.keras.utils.serialize_keras_object(quantizer)


_QUANTIZED_CLASSES = {}


def _register_plain(cls):
    # Plain-name registration (larq's style): subclasses made with defaults share the name, so a
    # saved model always reloads as this class, with its quantizers taken from the config.
    tf.keras.utils.get_custom_objects()[cls.__name__] = cls
    return cls


def _quantized_class(base):
    """The quantized subclass of ``base`` (one per base class, registered for loading)."""
    if base in _QUANTIZED_CLASSES:
        return _QUANTIZED_CLASSES[base]
    if issubclass(base, QuantizedLayerMixin):
        return base
    attr, stock = _kernel_attr_for(base, f"layer class {base.__name__}")
    name = f"Quantized{base.__name__}" if base in KERNEL_ATTR else base.__name__
    recurrent = issubclass(base, tf.keras.layers.RNN)
    separable = issubclass(base, tf.keras.layers.SeparableConv2D)
    kernels = (("kernel_quantizer", attr),)
    if recurrent:
        kernels += (("recurrent_quantizer", "cell.recurrent_kernel"),)
    if separable:
        kernels = (("depthwise_quantizer", "depthwise_kernel"),) + kernels
    mixin = QuantizedRNNMixin if recurrent else QuantizedSeparableMixin if separable else QuantizedLayerMixin
    cls = type(
        name,
        (mixin, base),
        {
            "_syq_kernel_attr": attr,
            "_syq_kernels": kernels,
            "_syq_depthwise": issubclass(base, tf.keras.layers.DepthwiseConv2D),
            "_syq_transposed": issubclass(base, TRANSPOSED),
            "__module__": base.__module__ if base not in KERNEL_ATTR else __name__,
            "__qualname__": name,
            "__doc__": f"{base.__name__} with SYQ-style kernel and input quantizers.",
        },
    )
    _QUANTIZED_CLASSES[base] = _register_plain(cls)
    return cls


class QuantizedRNNMixin(QuantizedLayerMixin):
    """Quantizes a recurrent layer's input kernel (``kernel_quantizer``) and recurrent kernel
    (``recurrent_quantizer``; by default a copy of ``kernel_quantizer``: the papers quantize every
    LSTM weight matrix). The gate biases stay in float."""

    _syq_config_keys = QuantizedLayerMixin._syq_config_keys + ("recurrent_quantizer",)

    def __init__(self, *args, recurrent_quantizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recurrent_quantizer = self._second_quantizer(recurrent_quantizer, "recurrent_quantizer")

    def _rnn_call(self, inputs, mask, training, initial_state):
        stock = super(QuantizedLayerMixin, self).call
        return self._quantized_call(
            lambda x: stock(x, mask=mask, training=training, initial_state=initial_state), inputs
        )

    if KERAS == 2:
        def call(self, inputs, mask=None, training=None, initial_state=None):
            return self._rnn_call(inputs, mask, training, initial_state)
    else:  # Keras 3 matches compute_output_shape's arguments to call's by name
        def call(self, sequences, initial_state=None, mask=None, training=False):
            return self._rnn_call(sequences, mask, training, initial_state)


class QuantizedSeparableMixin(QuantizedLayerMixin):
    """Quantizes a SeparableConv2D's pointwise kernel (``kernel_quantizer``) and its depthwise kernel
    (``depthwise_quantizer``; by default a copy of ``kernel_quantizer`` marked ``depthwise=True``,
    so ``channel`` granularity keeps one scale per depthwise channel)."""

    _syq_config_keys = QuantizedLayerMixin._syq_config_keys + ("depthwise_quantizer",)

    def __init__(self, *args, depthwise_quantizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.depthwise_quantizer = self._second_quantizer(depthwise_quantizer, "depthwise_quantizer", depthwise=True)


QuantizedConv1D = _quantized_class(tf.keras.layers.Conv1D)
QuantizedSeparableConv2D = _quantized_class(tf.keras.layers.SeparableConv2D)
QuantizedConv2D = _quantized_class(tf.keras.layers.Conv2D)
QuantizedConv3D = _quantized_class(tf.keras.layers.Conv3D)
QuantizedConv1DTranspose = _quantized_class(tf.keras.layers.Conv1DTranspose)
QuantizedConv2DTranspose = _quantized_class(tf.keras.layers.Conv2DTranspose)
QuantizedDepthwiseConv2D = _quantized_class(tf.keras.layers.DepthwiseConv2D)
QuantizedDense = _quantized_class(tf.keras.layers.Dense)
QuantizedLSTM = _quantized_class(tf.keras.layers.LSTM)
QuantizedGRU = _quantized_class(tf.keras.layers.GRU)
QuantizedSimpleRNN = _quantized_class(tf.keras.layers.SimpleRNN)
QuantizedEmbedding = _quantized_class(tf.keras.layers.Embedding)
QuantizedEinsumDense = _quantized_class(tf.keras.layers.EinsumDense)
# Every class of KERNEL_ATTR exists (and is registered) once this module is imported: a saved model
# holding one reloads in a fresh process (an Embedding's and an EinsumDense's used to be made on
# their first quantize(), so loading failed with "Could not locate class 'QuantizedEmbedding'").


def quantize(target=None, *, kernel_quantizer=None, input_quantizer=None, recurrent_quantizer=None,
             depthwise_quantizer=None, attention_ranges=False):
    """Quantize a Keras layer class, a subclass (as a decorator) or a layer instance.

    - ``quantize(tf.keras.layers.Conv2D, kernel_quantizer=q, input_quantizer=a)`` returns a class
      whose instances get their own copies of ``q`` and ``a`` unless given others.
    - ``@quantize(kernel_quantizer=q)`` over a user's Conv2D/Dense/DepthwiseConv2D subclass does the same.
    - ``quantize(layer, kernel_quantizer=q)`` returns a new quantized layer with the same config
      (and the same weights, if the layer was built).
    - Recurrent layers (LSTM, GRU, SimpleRNN): ``kernel_quantizer`` quantizes the input kernel and
      ``recurrent_quantizer`` (default: a copy of ``kernel_quantizer``) the recurrent kernel.
    - SeparableConv2D: ``kernel_quantizer`` quantizes the pointwise kernel and
      ``depthwise_quantizer`` (default: a copy of ``kernel_quantizer``) the depthwise kernel, each
      with its own granularity.
    - Conv1DTranspose, Conv2DTranspose: kernels ``[k, c_out, c_in]`` / ``[kh, kw, c_out, c_in]``;
      the kernel quantizer gets ``transposed=True`` so ``channel`` scales run along c_out.
    - MultiHeadAttention (an instance): its four projections get copies of the quantizers;
      ``attention_ranges=True`` also puts 8-bit ranges on the attention's inner tensors as int8 TFLite
      stores them (:class:`QuantizedMultiHeadAttention`).

    Quantizers with scales are copied per layer, so one ``SYQ(...)`` can configure many layers.
    """
    if target is None:
        return lambda t: quantize(t, kernel_quantizer=kernel_quantizer, input_quantizer=input_quantizer,
                                  recurrent_quantizer=recurrent_quantizer, depthwise_quantizer=depthwise_quantizer,
                                  attention_ranges=attention_ranges)
    if kernel_quantizer is None and input_quantizer is None:
        raise ValueError("syq_tf.quantize: give a kernel_quantizer, an input_quantizer or both.")
    cls = target if isinstance(target, type) else type(target)
    if isinstance(target, tf.keras.layers.MultiHeadAttention) and not isinstance(target, QuantizedMultiHeadAttention):
        if recurrent_quantizer is not None or depthwise_quantizer is not None:
            raise ValueError("syq_tf.quantize: MultiHeadAttention takes kernel_quantizer and input_quantizer only.")
        if target.built and KERAS == 2:
            raise ValueError(f"syq_tf.quantize: layer '{target.name}' (MultiHeadAttention) is already built; "
                             "quantize it before its first call.")
        config = {k: v for k, v in target.get_config().items() if k not in ("query_shape", "key_shape", "value_shape")}
        layer = QuantizedMultiHeadAttention(**config, kernel_quantizer=kernel_quantizer, input_quantizer=input_quantizer,
                                            attention_ranges=attention_ranges)
        if target.built:  # Keras 3: same shapes, then each projection's float weights
            layer.build_from_config(target.get_build_config())
            for attr in layer.PROJECTIONS:
                float_weights = getattr(target, attr).weights
                quantized = getattr(layer, attr)
                for old, new in zip(float_weights, quantized.weights[:len(float_weights)]):
                    new.assign(old)
        return layer
    if attention_ranges is not False:
        raise ValueError(f"syq_tf.quantize: attention_ranges is for MultiHeadAttention layers (an instance); "
                         f"{cls.__name__} has no attention.")
    if recurrent_quantizer is not None and not (
        isinstance(cls, type) and issubclass(cls, tf.keras.layers.RNN)
    ):
        raise ValueError(
            f"syq_tf.quantize: recurrent_quantizer is for recurrent layers (LSTM, GRU, SimpleRNN); "
            f"{cls.__name__} has no recurrent kernel."
        )
    if depthwise_quantizer is not None and not (
        isinstance(cls, type) and issubclass(cls, tf.keras.layers.SeparableConv2D)
    ):
        raise ValueError(
            f"syq_tf.quantize: depthwise_quantizer is for SeparableConv2D (its depthwise kernel); "
            f"{cls.__name__} has one kernel: use kernel_quantizer."
        )
    extra = {} if recurrent_quantizer is None else {"recurrent_quantizer": recurrent_quantizer}
    if depthwise_quantizer is not None:
        extra["depthwise_quantizer"] = depthwise_quantizer
    if isinstance(target, type):
        if not issubclass(target, tf.keras.layers.Layer):
            raise TypeError(f"syq_tf.quantize: {target!r} is not a tf.keras layer class.")
        _check_keras2(target)
        quantized = _quantized_class(target)
        # Validate the quantizers now (role errors), then bake them in as defaults.
        _copy_quantizer(kernel_quantizer, "kernel_quantizer", target.__name__)
        _copy_quantizer(input_quantizer, "input_quantizer", target.__name__)
        _copy_quantizer(recurrent_quantizer, "recurrent_quantizer", target.__name__)
        _copy_quantizer(depthwise_quantizer, "depthwise_quantizer", target.__name__)
        defaults = {"kernel_quantizer": kernel_quantizer, "input_quantizer": input_quantizer, **extra}
        return type(
            quantized.__name__,
            (quantized,),
            {"_syq_defaults": defaults, "__module__": target.__module__,
             "__qualname__": quantized.__qualname__, "__doc__": quantized.__doc__},
        )
    if isinstance(target, tf.keras.layers.Layer):
        _check_keras2(type(target))
        if isinstance(target, QuantizedLayerMixin):
            raise ValueError(f"syq_tf.quantize: layer '{target.name}' is already quantized.")
        cls = _quantized_class(type(target))
        layer = cls.from_config(
            {**target.get_config(), "kernel_quantizer": kernel_quantizer,
             "input_quantizer": input_quantizer, **extra}
        )
        if target.built:
            if KERAS == 2:
                layer.build(target._build_input_shape)
            else:
                layer.build_from_config(target.get_build_config())
            quantizer_weights = [
                w for q in _quantizers_of(layer) if isinstance(q, tf.keras.layers.Layer) for w in q.weights
            ]
            own = [w for w in layer.weights if not any(w is q for q in quantizer_weights)]
            for src, dst in zip(target.weights, own):
                dst.assign(src)
        return layer
    if type(target).__module__.split(".")[0] in ("keras", "tf_keras", "larq"):
        _check_keras2(type(target))  # a layer of the other frontend's Keras
    raise TypeError(
        f"syq_tf.quantize: expected a tf.keras layer class or instance, got {type(target).__name__}."
    )


class InnerRanges:
    """8-bit moving-average ranges (:class:`~syq_tf.quantizers.MovingAverageActivation`) on tensors
    inside a layer that int8 TFLite stores, sub-layers ``<layer>_<tensor>_range``; the layer names
    them in ``_range_names()`` and computes with ``self._ranged(training)`` as its ``ranged(name,
    tensor)``. The export fixes them (:meth:`int8_ranges`) in a plain layer
    (:class:`syq_tf.export.inference.FixedRanges`)."""

    def _range_names(self):
        raise NotImplementedError

    def _add_ranges(self):
        for name in self._range_names():
            setattr(self, f"{name}_range", MovingAverageActivation(8, name=f"{self.name}_{name}_range"))

    def range_quantizers(self):
        """``{tensor name: MovingAverageActivation}``."""
        return {name: getattr(self, f"{name}_range") for name in self._range_names()}

    def _build_ranges(self):
        for quantizer in self.range_quantizers().values():
            if not quantizer.built:
                quantizer.build(())

    def _ranged(self, training):
        ranges = self.range_quantizers()
        return lambda name, x: ranges[name](x, training=training)

    def int8_ranges(self):
        """``{tensor name: (low, high, top)}``, each range's int8 form for the export."""
        return {name: q.int8_form() for name, q in self.range_quantizers().items()}


ATTENTION_RANGES = ("query", "key", "value", "scores", "scaled_scores", "context")


def ranged_attention(layer, ranged, query, key, value, attention_mask=None, training=None,
                     return_attention_scores=False, use_causal_mask=False):
    """Scaled dot-product attention of the MultiHeadAttention ``layer`` (its equations, mask, softmax
    and dropout) in the order int8 TFLite computes it, each tensor TFLite stores in int8 passed
    through ``ranged(name, tensor)`` (names: ``ATTENTION_RANGES``) and the softmax probabilities
    put on SOFTMAX's fixed int8 output grid ``k / 256`` (:func:`int8_unit_grid`)::

        q, k, v  = ranged(query), ranged(key), ranged(value)          (the projections' outputs)
        scores   = ranged(einsum(k, q));  scaled = ranged(scores / sqrt(key_dim))
        p        = int8_unit_grid(softmax(scaled, mask))
        context  = ranged(einsum(dropout(p), v))

    TFLite: FULLY_CONNECTED, BATCH_MATMUL, MUL, SOFTMAX, BATCH_MATMUL, each with an int8 output.
    Returns ``(context, p)``, as Keras's ``_compute_attention``."""
    del return_attention_scores  # the probabilities are returned either way
    query, key, value = ranged("query", query), ranged("key", key), ranged("value", value)
    if use_causal_mask:  # Keras 3 passes the causal mask as a flag
        causal = layer._compute_causal_mask(query, value)
        attention_mask = causal if attention_mask is None else tf.logical_and(tf.cast(attention_mask, tf.bool), causal)
    scores = ranged("scores", tf.einsum(layer._dot_product_equation, key, query))
    scores = ranged("scaled_scores", scores * (1.0 / math.sqrt(float(layer._key_dim))))
    probabilities = int8_unit_grid(layer._masked_softmax(scores, attention_mask))
    weights = layer._dropout_layer(probabilities, training=training) if layer._dropout > 0 else probabilities
    return ranged("context", tf.einsum(layer._combine_equation, weights, value)), probabilities


class QuantizedMultiHeadAttention(InnerRanges, tf.keras.layers.MultiHeadAttention):
    """MultiHeadAttention whose query, key, value and output projections (EinsumDense layers) are
    quantized, each with its own copy of ``kernel_quantizer`` (and ``input_quantizer`` on its input).
    The attention arithmetic (scores, softmax, weighted sum) stays float, or with
    ``attention_ranges=True`` computes on the values int8 TFLite stores (:func:`ranged_attention`):
    8-bit moving-average ranges (``MovingAverageActivation``, sub-layers ``<layer>_<tensor>_range``) on the
    projected query, key and value, the scores before and after the ``1/sqrt(key_dim)`` scale and the
    weighted sum, and the softmax probabilities on SOFTMAX's int8 grid ``k / 256``; the export gives
    TFLite those ranges. Made by ``syq_tf.quantize(tf.keras.layers.MultiHeadAttention(...),
    kernel_quantizer=..., attention_ranges=...)``."""

    PROJECTIONS = ("_query_dense", "_key_dense", "_value_dense", "_output_dense")

    def __init__(self, *args, kernel_quantizer=None, input_quantizer=None, attention_ranges=False, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(attention_ranges, bool):
            raise ValueError(f"syq_tf.quantize: layer '{self.name}' (MultiHeadAttention): attention_ranges="
                             f"{attention_ranges!r}; allowed: True, False.")
        if attention_ranges and KERAS == 2:
            raise ValueError(f"syq_tf.quantize: layer '{self.name}' (MultiHeadAttention): attention_ranges=True "
                             "is for the Keras 3 frontend (syq_tf.keras3); TensorFlow's converter fails on a "
                             "tf_keras attention with inner ranges (FULLY_CONNECTED given int8 input).")
        self.attention_ranges = attention_ranges
        self._add_ranges()
        # untracked: the templates (each projection gets its own copy) are no sub-layers of the attention,
        # which Keras would otherwise list, calibrate (never called: "saw no inputs") and save
        object.__setattr__(self, "_syq_quantizers", {"kernel_quantizer": kernel_quantizer,
                                                     "input_quantizer": input_quantizer})
        _copy_quantizer(kernel_quantizer, "kernel_quantizer", self.name)  # role errors now
        _copy_quantizer(input_quantizer, "input_quantizer", self.name)

    def _quantize_projections(self):
        with tf.init_scope():
            for attr in self.PROJECTIONS:
                dense = getattr(self, attr)
                if not isinstance(dense, QuantizedLayerMixin):
                    quantized = quantize(dense, **{k: v for k, v in self._syq_quantizers.items() if v is not None})
                    if KERAS == 3:  # Keras 3 would keep the float projection's weights listed too
                        self._tracker.untrack(dense)
                    setattr(self, attr, quantized)

    def _range_names(self):
        return ATTENTION_RANGES if self.attention_ranges else ()

    if KERAS == 2:
        def _build_from_signature(self, query, value, key=None):
            super()._build_from_signature(query, value, key)
            self._quantize_projections()
            self._build_ranges()
    else:  # Keras 3 builds the projections in build()
        def build(self, query_shape, value_shape, key_shape=None):
            if getattr(self, "_use_gate", False):
                raise ValueError(f"syq_tf.quantize: layer '{self.name}': MultiHeadAttention with use_gate=True "
                                 "is not supported (its gate projection would stay float).")
            super().build(query_shape, value_shape, key_shape)
            self._quantize_projections()
            self._build_ranges()

    def _compute_attention(self, query, key, value, attention_mask=None, training=None, *args, **kwargs):
        if not self.attention_ranges:
            return super()._compute_attention(query, key, value, attention_mask, training, *args, **kwargs)
        return ranged_attention(self, self._ranged(training), query, key, value, attention_mask, training,
                                *args, **kwargs)

    def float_kernels(self):
        """{projection name (query, key, value, attention_output): (quantizer, float kernel)}."""
        out = {}
        for attr in self.PROJECTIONS:
            dense = getattr(self, attr, None)
            if isinstance(dense, QuantizedLayerMixin) and dense.built:
                out[dense.name] = dense.float_kernels()["kernel"]
        return out

    def get_config(self):
        return {**super().get_config(), **{k: _serialize(v) if not isinstance(v, (str, dict)) else v
                                           for k, v in self._syq_quantizers.items()},
                "attention_ranges": self.attention_ranges}

    @classmethod
    def from_config(cls, config):
        return super().from_config(_deserialized(config, ("kernel_quantizer", "input_quantizer")))


_register_plain(QuantizedMultiHeadAttention)
# Classes that quantize a stock Keras layer (the export builds the stock layer behind them).
QUANTIZED_CLASSES = (QuantizedLayerMixin, QuantizedMultiHeadAttention)


def _quantizers_of(layer):
    return [layer.input_quantizer] + [q for q, _, _ in layer._kernel_slots()]


def _check_keras2(cls):
    """``cls`` must come from the process' Keras (its frontend's): tf_keras, or Keras 3 under syq_tf.keras3."""
    package = cls.__module__.split(".")[0]
    if KERAS == 2 and package == "keras":
        raise TypeError(
            f"syq_tf.quantize: {cls.__name__} comes from Keras 3 (module {cls.__module__}); syq_tf, "
            "larq and tfmot use Keras 2: build the model with tf.keras after `import syq_tf` (or use "
            "`import syq_tf.keras3` in a Keras 3 program)."
        )
    if KERAS == 3 and package in ("tf_keras", "larq"):
        raise TypeError(
            f"syq_tf.keras3.quantize: {cls.__name__} comes from Keras 2 (module {cls.__module__}); this "
            "process uses Keras 3: build the model with keras.layers."
        )
