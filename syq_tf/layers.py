"""``syq_tf.quantize``: quantize a Keras layer class, subclass or instance.

The quantized layer keeps the float kernel as its trainable variable; every call it runs the input
quantizer on the inputs and the kernel quantizer on the kernel, then the original layer's own
``call`` with the quantized kernel in place of the float one.
"""

import larq as lq
import tensorflow as tf

from syq_tf.quantizers._common import ActivationQuantizer, WeightQuantizer

# Stock Keras layers with one kernel, and the attribute that holds it.
_KERNEL_ATTR = {
    tf.keras.layers.DepthwiseConv2D: "depthwise_kernel",
    tf.keras.layers.Conv1D: "kernel",
    tf.keras.layers.Conv2D: "kernel",
    tf.keras.layers.Conv3D: "kernel",
    tf.keras.layers.Dense: "kernel",
}
# Kernel layers whose layouts or kernels differ; quantizing them needs work not done yet.
_UNSUPPORTED = (
    tf.keras.layers.Conv1DTranspose,
    tf.keras.layers.Conv2DTranspose,
    tf.keras.layers.Conv3DTranspose,
    tf.keras.layers.SeparableConv1D,
    tf.keras.layers.SeparableConv2D,
)
SUPPORTED_LAYERS = tuple(cls.__name__ for cls in _KERNEL_ATTR)


def _kernel_attr_for(cls, what):
    for bad in _UNSUPPORTED:
        if issubclass(cls, bad):
            raise TypeError(
                f"syq_tf.quantize: {what} is a {bad.__name__}, which is not supported yet; "
                f"supported layer types: {', '.join(SUPPORTED_LAYERS)}."
            )
    for base, attr in _KERNEL_ATTR.items():
        if issubclass(cls, base):
            return attr, base
    raise TypeError(
        f"syq_tf.quantize: {what} ({cls.__name__}) has no kernel to quantize; supported layer "
        f"types: {', '.join(SUPPORTED_LAYERS)} and their subclasses."
    )


def _copy_quantizer(quantizer, role, layer_name, **overrides):
    """A fresh quantizer instance for one layer (quantizers with scales must not be shared)."""
    if quantizer is None:
        return None
    if isinstance(quantizer, (str, dict)):
        quantizer = lq.quantizers.get(quantizer)
    expected = WeightQuantizer if role == "kernel_quantizer" else ActivationQuantizer
    wrong = ActivationQuantizer if role == "kernel_quantizer" else WeightQuantizer
    if isinstance(quantizer, wrong):
        raise ValueError(
            f"layer '{layer_name}': {type(quantizer).__name__} quantizes "
            f"{'activations' if role == 'kernel_quantizer' else 'weights'} and cannot be used as "
            f"{role}; use a {expected.__name__} such as "
            f"{'SYQ' if role == 'kernel_quantizer' else 'DoReFa'}."
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
    _syq_defaults = {}

    def __init__(self, *args, kernel_quantizer=None, input_quantizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        kernel_quantizer = kernel_quantizer or self._syq_defaults.get("kernel_quantizer")
        input_quantizer = input_quantizer or self._syq_defaults.get("input_quantizer")
        extra = {"depthwise": True} if self._syq_depthwise and _has_depthwise_arg(kernel_quantizer) else {}
        self.kernel_quantizer = _copy_quantizer(kernel_quantizer, "kernel_quantizer", self.name, **extra)
        self.input_quantizer = _copy_quantizer(input_quantizer, "input_quantizer", self.name)

    @property
    def float_kernel(self):
        return getattr(self, self._syq_kernel_attr)

    def build(self, input_shape):
        super().build(input_shape)
        if isinstance(self.kernel_quantizer, tf.keras.layers.Layer):
            try:
                self.kernel_quantizer.build(self.float_kernel.shape)
            except ValueError as err:
                raise ValueError(f"layer '{self.name}' ({type(self).__name__}): {err}") from None
        precision = getattr(self.kernel_quantizer, "precision", None)
        if precision:
            # larq.models.summary reads a weight's bit width from `weight.precision`.
            self.float_kernel.precision = precision

    def call(self, inputs):
        if self.input_quantizer is not None:
            inputs = self.input_quantizer(inputs)
        if self.kernel_quantizer is None:
            return super().call(inputs)
        float_kernel = self.float_kernel
        quantized = self.kernel_quantizer(float_kernel)
        # Swap the quantized tensor in for the duration of the stock call, bypassing Keras'
        # attribute tracking so the float variable stays the tracked, trained one.
        object.__setattr__(self, self._syq_kernel_attr, quantized)
        try:
            return super().call(inputs)
        finally:
            object.__setattr__(self, self._syq_kernel_attr, float_kernel)

    def quantized_kernel(self):
        """The kernel as the layer computes with it (a tensor)."""
        if self.kernel_quantizer is None:
            return tf.convert_to_tensor(self.float_kernel)
        return self.kernel_quantizer(self.float_kernel)

    def get_config(self):
        return {
            **super().get_config(),
            "kernel_quantizer": _serialize(self.kernel_quantizer),
            "input_quantizer": _serialize(self.input_quantizer),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("kernel_quantizer", "input_quantizer"):
            if isinstance(config.get(key), dict):
                config[key] = deserialize_quantizer(config[key])
        return cls(**config)


def _has_depthwise_arg(quantizer):
    return isinstance(quantizer, WeightQuantizer) and "depthwise" in quantizer.get_config()


def deserialize_quantizer(config):
    """A quantizer from its serialized dict, in either Keras serialization format (h5 files use the
    legacy one, where only the plain class name is looked up; ours are registered under it too)."""
    cls = tf.keras.utils.get_registered_object(config.get("registered_name") or config.get("class_name"))
    if isinstance(cls, type) and issubclass(cls, (WeightQuantizer, ActivationQuantizer)):
        return cls.from_config(config.get("config", {}))
    return lq.quantizers.get(config)


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
    name = f"Quantized{base.__name__}" if base in _KERNEL_ATTR else base.__name__
    cls = type(
        name,
        (QuantizedLayerMixin, base),
        {
            "_syq_kernel_attr": attr,
            "_syq_depthwise": issubclass(base, tf.keras.layers.DepthwiseConv2D),
            "__module__": base.__module__ if base not in _KERNEL_ATTR else __name__,
            "__qualname__": name,
            "__doc__": f"{base.__name__} with SYQ-style kernel and input quantizers.",
        },
    )
    _QUANTIZED_CLASSES[base] = _register_plain(cls)
    return cls


QuantizedConv1D = _quantized_class(tf.keras.layers.Conv1D)
QuantizedConv2D = _quantized_class(tf.keras.layers.Conv2D)
QuantizedConv3D = _quantized_class(tf.keras.layers.Conv3D)
QuantizedDepthwiseConv2D = _quantized_class(tf.keras.layers.DepthwiseConv2D)
QuantizedDense = _quantized_class(tf.keras.layers.Dense)


def quantize(target=None, *, kernel_quantizer=None, input_quantizer=None):
    """Quantize a Keras layer class, a subclass (as a decorator) or a layer instance.

    - ``quantize(tf.keras.layers.Conv2D, kernel_quantizer=q, input_quantizer=a)`` returns a class
      whose instances get their own copies of ``q`` and ``a`` unless given others.
    - ``@quantize(kernel_quantizer=q)`` over a user's Conv2D/Dense/DepthwiseConv2D subclass does the same.
    - ``quantize(layer, kernel_quantizer=q)`` returns a new quantized layer with the same config
      (and the same weights, if the layer was built).

    Quantizers with scales are copied per layer, so one ``SYQ(...)`` can configure many layers.
    """
    if target is None:
        return lambda t: quantize(t, kernel_quantizer=kernel_quantizer, input_quantizer=input_quantizer)
    if kernel_quantizer is None and input_quantizer is None:
        raise ValueError("syq_tf.quantize: give a kernel_quantizer, an input_quantizer or both.")
    if isinstance(target, type):
        if not issubclass(target, tf.keras.layers.Layer):
            raise TypeError(f"syq_tf.quantize: {target!r} is not a tf.keras layer class.")
        _check_keras2(target)
        quantized = _quantized_class(target)
        # Validate the quantizers now (role errors), then bake them in as defaults.
        _copy_quantizer(kernel_quantizer, "kernel_quantizer", target.__name__)
        _copy_quantizer(input_quantizer, "input_quantizer", target.__name__)
        defaults = {"kernel_quantizer": kernel_quantizer, "input_quantizer": input_quantizer}
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
             "input_quantizer": input_quantizer}
        )
        if target.built:
            layer.build(target._build_input_shape)
            quantizer_weights = [
                w for q in (layer.kernel_quantizer, layer.input_quantizer)
                if isinstance(q, tf.keras.layers.Layer) for w in q.weights
            ]
            own = [w for w in layer.weights if not any(w is q for q in quantizer_weights)]
            for src, dst in zip(target.weights, own):
                dst.assign(src)
        return layer
    if type(target).__module__.startswith("keras"):
        _check_keras2(type(target))
    raise TypeError(
        f"syq_tf.quantize: expected a tf.keras layer class or instance, got {type(target).__name__}."
    )


def _check_keras2(cls):
    if cls.__module__.split(".")[0] == "keras":
        raise TypeError(
            f"syq_tf.quantize: {cls.__name__} comes from Keras 3 (module {cls.__module__}); syq_tf, "
            "larq and tfmot use Keras 2: build the model with tf.keras after `import syq_tf`."
        )
