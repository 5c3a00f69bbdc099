"""tfmot's ``Quantizer`` interface in front of any syq_tf quantizer (:class:`TfmotQuantizer`)."""

import inspect

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from syq_tf.layers import KERNEL_ATTR, deserialize_quantizer
from syq_tf.optimizers import mark_quantized
from syq_tf.quantizers import ActivationQuantizer, LossAware, WeightQuantizer, int8_fake_quant

tq = tfmot.quantization.keras

# The layer kinds a QuantizeConfig quantizes the kernel of (their attributes: syq_tf.layers.KERNEL_ATTR).
KERNEL_LAYERS = (tf.keras.layers.DepthwiseConv2D, tf.keras.layers.Conv2D, tf.keras.layers.Conv1D,
                 tf.keras.layers.Dense)


def kernel_attr(layer):
    """The attribute of the kernel a weight quantizer takes over, None for other layers."""
    for cls in KERNEL_LAYERS:
        if isinstance(layer, cls):
            return KERNEL_ATTR[cls]
    return None


def register(cls):
    return tf.keras.utils.register_keras_serializable(package="syq_tf")(cls)


@register
class TfmotQuantizer(tq.quantizers.Quantizer):
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
            form = self.impl.int8_form()
        return int8_fake_quant(inputs, *form)

    def get_config(self):
        return {"quantizer": tf.keras.utils.serialize_keras_object(self.quantizer), "export": self.export}

    def __eq__(self, other):
        return isinstance(other, TfmotQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


def as_tfmot(quantizer, what):
    if quantizer is None or isinstance(quantizer, TfmotQuantizer):
        return quantizer
    if isinstance(quantizer, (WeightQuantizer, ActivationQuantizer, dict)):
        return TfmotQuantizer(quantizer)
    raise TypeError(f"{what}: expected a syq_tf quantizer or None, got {quantizer!r}.")
