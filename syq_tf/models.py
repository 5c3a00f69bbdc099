"""Model-level helpers: find quantized kernels, re-initialise learned scales."""

import numpy as np
import tensorflow as tf

from syq_tf.layers import QuantizedLayerMixin, QuantizedMultiHeadAttention
from syq_tf.quantizers._common import KERAS

# larq layers: quantizer attribute -> kernel attribute
_LARQ_KERNELS = (
    ("kernel_quantizer", "kernel"),
    ("depthwise_quantizer", "depthwise_kernel"),
    ("pointwise_quantizer", "pointwise_kernel"),
)


def require_model(model, owner, layers_too=False):
    """TypeError naming ``owner`` unless ``model`` is a Keras model of this process's Keras (with
    ``layers_too``, or a layer)."""
    kind = tf.keras.layers.Layer if layers_too else tf.keras.Model
    if not isinstance(model, kind):
        cls = type(model)
        got = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
        raise TypeError(f"{owner}: expected a Keras {KERAS} model{' or layer' if layers_too else ''}, got {got}.")


def check_example_shape(model, x, owner, argument):
    """ValueError naming ``owner`` and ``argument`` if the examples ``x`` (an array, batch first) do
    not have the shape of the single input of ``model`` (models without a known input: no check)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # a subclassed model before its first call
        return
    if not inputs or len(inputs) != 1:
        return
    want, got = tuple(inputs[0].shape[1:]), tuple(np.shape(x)[1:])
    if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
        raise ValueError(f"{owner}: {argument} has examples of shape {got}; model {model.name!r} takes "
                         f"{tuple(None if w is None else int(w) for w in want)}.")


def flat_layers(model):
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            yield from flat_layers(layer)
        else:
            yield layer


def _float_variable(variable):
    # larq wraps kernels in a QuantizedVariable whose reads are quantized in a quantized scope.
    return getattr(variable, "latent_variable", variable)


def layer_kernels(layer):
    """{kernel attribute: (quantizer or None, float kernel variable)} of a syq_tf or larq layer."""
    if isinstance(layer, (QuantizedLayerMixin, QuantizedMultiHeadAttention)):
        return layer.float_kernels()
    if KERAS == 2:
        from syq_tf import tfmot  # noqa: PLC0415  (tfmot imports this module's neighbours)

        if tfmot.is_wrapper(layer):
            return tfmot.wrapper_kernels(layer)
    out = {}
    for q_attr, k_attr in _LARQ_KERNELS:
        kernel = getattr(layer, k_attr, None)
        if kernel is not None:
            out[k_attr] = (getattr(layer, q_attr, None), _float_variable(kernel))
    return out


def unwrapped(layer):
    """The layer a tfmot ``QuantizeWrapper`` wraps, or ``layer`` itself (by class name: tfmot is not
    importable under Keras 3, where there are no wrappers)."""
    return getattr(layer, "layer", layer) if type(layer).__name__.startswith("QuantizeWrapper") else layer


def is_tfmot_model(model):
    """True for a tfmot QAT model (a QuantizeWrapper among its layers); always False under Keras 3,
    where tfmot does not run."""
    if KERAS != 2:
        return False
    from syq_tf import tfmot  # noqa: PLC0415

    return any(tfmot.is_wrapper(layer) for layer in model.layers)


def quantized_kernels(model):
    """(layer, quantizer, float kernel variable) for every quantized kernel, syq_tf or larq layer."""
    return [
        (layer, quantizer, kernel)
        for layer in flat_layers(model)
        for quantizer, kernel in layer_kernels(layer).values()
        if quantizer is not None
    ]


def reinitialize_scales(model):
    """Re-initialise every learned scale from the current float weights.

    The papers' recipe: train (or load) a float model, then switch quantization on and set the
    scales from the float weights: SYQ alpha_g = mean|W| over each subgroup, UniQ delta = k_b std(W).
    (Least-squares scalars need nothing: they are recomputed every step. Activation steps are set
    from data by :func:`syq_tf.calibrate`.) Returns the names of the layers whose scales were set.
    """
    require_model(model, "syq_tf.reinitialize_scales")
    names = []
    for layer, quantizer, kernel in quantized_kernels(model):
        if hasattr(quantizer, "initialize_from"):
            quantizer.initialize_from(kernel)
            names.append(layer.name)
    return names


class ReinitializeScales(tf.keras.callbacks.Callback):
    """Calls :func:`reinitialize_scales` when training begins (e.g. after loading float weights)."""

    def on_train_begin(self, logs=None):
        reinitialize_scales(self.model)
