"""Calibration: set activation steps from data before training (UniQ, METHODS.md §2).

By default the forward passes use batch statistics (``training=True``), as training will: with
quantized weights in place the moving statistics of a float-trained BatchNorm no longer match the
activations, and steps calibrated through them can be off by several times (measured: a W2A2 CNN
calibrated in inference mode did not train). Every non-trainable variable of the model (BatchNorm
moving statistics, moving averages of other quantizers) is restored afterwards, so calibrating never
changes them -- the original UniQ code calibrated in training mode and silently moved them.
``batch_statistics=False`` runs in inference mode instead (moving statistics used, nothing updated).

While calibrating, each activation quantizer passes its input through in float and records
``sqrt(2 E[a^2])`` (the pre-ReLU standard deviation of a rectified Gaussian) per batch; at the end
its step becomes ``k+_b`` times the largest value seen.
"""

import dataclasses
import numbers

import numpy as np
import tensorflow as tf

from syq_tf.models import check_example_shape, layer_kernels, require_model, unwrapped


def calibratable_quantizers(model):
    """Every quantizer in ``model`` (nested layers included) that is set by calibration."""
    found, seen = [], set()
    # tf_keras: every tf.Module inside; Keras 3 layers are no tf.Modules but list their sub-layers
    inside = model.submodules if hasattr(model, "submodules") else model._flatten_layers(include_self=False)
    for module in [model, *inside]:
        # tfmot wrappers keep syq_tf quantizers inside their QuantizeConfig (not as sub-layers)
        config = getattr(module, "quantize_config", None)
        inner = [q.impl for q in getattr(config, "quantizers", lambda: [])() if getattr(q, "impl", None)]
        for candidate in [module, *inner]:
            if hasattr(candidate, "start_calibration") and id(candidate) not in seen:
                seen.add(id(candidate))
                found.append(candidate)
    return found


def _batches(model, data, batches, batch_size, owner="syq_tf.calibrate"):
    if isinstance(data, tf.data.Dataset):
        source = data
    else:
        if isinstance(data, (tuple, list)):
            data = data[0]
        array = np.asarray(data)
        if array.ndim == 0 or len(array) == 0:
            raise ValueError(f"{owner}: no calibration data (an empty array).")
        check_example_shape(model, array, owner, "data")
        source = tf.data.Dataset.from_tensor_slices(array.astype(np.float32)).batch(batch_size)
    for i, batch in enumerate(source):
        if i >= batches:
            return
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def calibrate(model, data, batches=100, batch_size=128, recalibrate=True, batch_statistics=True):
    """Set the step of every activation quantizer of ``model`` from ``data``.

    ``data``: a ``tf.data.Dataset`` of batches (``x`` or ``(x, y)``), or an array / ``(x, y)`` tuple
    of examples (batched by ``batch_size``). Runs at most ``batches`` forward passes, with batch
    statistics unless ``batch_statistics=False``; the model's non-trainable state is unchanged.
    With ``recalibrate=False`` quantizers that already have a step are left alone (what the
    :class:`Calibrate` callback does, so resuming training keeps the learned steps).
    Weight steps initialise themselves on the first forward pass. Returns ``{quantizer name: step}``.
    """
    require_model(model, "syq_tf.calibrate", layers_too=True)
    if isinstance(batches, (bool, np.bool_)) or not isinstance(batches, numbers.Integral) or batches < 1:
        raise ValueError(f"syq_tf.calibrate: batches={batches!r} must be a positive integer.")
    quantizers = calibratable_quantizers(model)
    if not recalibrate:
        quantizers = [q for q in quantizers if not q.calibrated]
    if not quantizers:
        return {}
    seen = 0
    saved = None
    try:
        for x in _batches(model, data, batches, batch_size):
            if x.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(x))):
                raise ValueError(f"syq_tf.calibrate: calibration batch {seen} holds NaN or Inf values; the "
                                 "activation steps would be NaN (check the data)")
            if saved is None:
                for q in quantizers:
                    q.start_calibration()
                model(x[:1], training=False)  # builds every variable, initialises weight scales
                saved = [(v, v.numpy()) for v in model.non_trainable_variables]
                for q in quantizers:
                    q.start_calibration()  # forget what the building pass saw
            model(x, training=batch_statistics)
            seen += 1
    except BaseException:
        for q in quantizers:
            q.cancel_calibration()
        raise
    finally:
        for variable, value in saved or []:
            variable.assign(value)
    if seen == 0:
        raise ValueError("syq_tf.calibrate: the calibration data gave no batches.")
    return {q.name: q.finish_calibration() for q in quantizers}


class Calibrate(tf.keras.callbacks.Callback):
    """Calibrates uncalibrated activation steps when training begins (see :func:`calibrate`)."""

    def __init__(self, data, batches=100, batch_size=128, batch_statistics=True):
        super().__init__()
        self.data, self.batches, self.batch_size = data, batches, batch_size
        self.batch_statistics = batch_statistics

    def on_train_begin(self, logs=None):
        calibrate(self.model, self.data, self.batches, self.batch_size, recalibrate=False,
                  batch_statistics=self.batch_statistics)


# ------------------------------------------------------------------------------------------------
# DoReFa ranges: a float model's ReLU outputs, read by a DoReFa input quantizer (fixed range [0, 1]).

# Layers y = f(x) with f(x / s) = f(x) / s for every s > 0, element by element or by pooling /
# reshaping: a uniform scale passes through them unchanged.
_HOMOGENEOUS = ("MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
                "AveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalAveragePooling1D",
                "GlobalAveragePooling2D", "Flatten", "Reshape", "Dropout", "SpatialDropout1D",
                "SpatialDropout2D", "ZeroPadding1D", "ZeroPadding2D", "Cropping1D", "Cropping2D")


def dorefa_range_error(a, scale, bits):
    """Mean squared error of DoReFa at ``bits`` on values ``a`` read at ``scale``:
    ``mean((scale * round(clip(a / scale, 0, 1) * n) / n - max(a, 0))^2)``, ``n = 2^bits - 1``
    (negative values are zero after the ReLU the quantizer stands for, whatever the scale)."""
    n = float(2**bits - 1)
    a = np.maximum(np.asarray(a, np.float64), 0.0)
    q = np.floor(np.clip(a / scale, 0.0, 1.0) * n + 0.5) / n * scale
    return float(np.mean((q - a) ** 2))


def best_dorefa_scale(a, bits, candidates=64):
    """The scale ``s`` in ``max(a) * r``, ``r`` on a geometric grid from 1/64 to 1 (``candidates``
    points), that minimises :func:`dorefa_range_error`: at 8 bits near the largest value (clipping
    costs more than rounding), at 1-2 bits well inside it. None when no value is positive."""
    a = np.asarray(a, np.float64)
    top = float(a.max()) if a.size else 0.0
    if not top > 0.0 or not np.isfinite(top):
        return None
    grid = top * np.geomspace(1.0 / 64.0, 1.0, candidates)
    errors = [dorefa_range_error(a, s, bits) for s in grid]
    return float(grid[int(np.argmin(errors))])


def _class_name(layer):
    return type(unwrapped(layer)).__name__


def _history_layer(tensor):
    # tf_keras: _keras_history = (layer, node_index, tensor_index); Keras 3: (operation, ...)
    history = getattr(tensor, "_keras_history", None)
    return history[0] if history is not None else None


def _readers(layer, model):
    """The layers of ``model`` that read ``layer``'s output (a layer may also be called in other
    models: a tfmot model keeps the float layers it does not wrap, still called in the model it was
    made from)."""
    readers = []
    for node in getattr(layer, "_outbound_nodes", []):
        reader = getattr(node, "outbound_layer", None) or getattr(node, "operation", None)
        index = reader._inbound_nodes.index(node)
        if hasattr(model, "_network_nodes"):  # tf_keras
            inside = f"{reader.name}_ib-{index}" in model._network_nodes
        elif isinstance(getattr(model, "_nodes", None), (set, frozenset)):  # Keras 3
            inside = f"{id(reader)}_ib-{index}" in model._nodes
        else:
            inside = True
        if inside:
            readers.append(reader)
    return readers


def _single_input(layer):
    inputs = layer.input
    return None if isinstance(inputs, (list, tuple, dict)) else inputs


def _activation_name(layer):
    """A layer's activation function: 'linear' for none (tfmot's NoOpActivation, which replaces it
    where a BatchNormalization follows, included); through tfmot's QuantizeAwareActivation."""
    activation = getattr(unwrapped(layer), "activation", None)
    activation = getattr(activation, "activation", activation)
    if activation is None or type(activation).__name__ == "NoOpActivation":
        return "linear"
    return getattr(activation, "__name__", type(activation).__name__)


def _relu_cap(layer):
    """``(True, max_value or None)`` for a plain ReLU layer (ReLU without threshold or negative slope,
    Activation 'relu' / 'relu6'), ``(False, None)`` for any other layer. A ReLU passes a scale
    ``s`` unchanged below its cap; a cap at or above the fitted range (ReLU6's 6) is cut by DoReFa's
    clip first, and the range fitted on its outputs never exceeds it."""
    inner = unwrapped(layer)
    if type(inner).__name__ == "ReLU":
        if float(inner.threshold) != 0.0 or float(inner.negative_slope) != 0.0:
            return False, None
        return True, None if inner.max_value is None else float(inner.max_value)
    if type(inner).__name__ == "Activation":
        name = _activation_name(inner)
        if name in ("relu", "relu6"):
            return True, 6.0 if name == "relu6" else None
    return False, None


def _dorefa_of(layer):
    """``(DoReFa quantizer, "input" | "output")`` of a layer: a syq_tf / larq layer's
    ``input_quantizer`` or the output quantizer of a tfmot wrapper's config; ``(None, None)``."""
    from syq_tf.quantizers.activations import DoReFaActivation  # noqa: PLC0415

    if isinstance(getattr(layer, "input_quantizer", None), DoReFaActivation):
        return layer.input_quantizer, "input"
    output = getattr(getattr(layer, "quantize_config", None), "output_quantizer", None)
    quantizer = getattr(output, "quantizer", None)
    if isinstance(quantizer, DoReFaActivation):
        return quantizer, "output"
    return None, None


@dataclasses.dataclass
class _Chain:
    """A DoReFa quantizer (held by ``owner``) between the BatchNormalization ``producer`` whose
    output it reads and the kernel layer ``consumer`` that reads it (``owner`` itself for an input
    quantizer). ``path``: the layers in between whose outputs the scale also divides (their output
    ranges follow it); ``cap``: a ReLU's max_value the probed values are cut at."""

    owner: object
    quantizer: object
    probe: object = None
    producer: object = None
    consumer: object = None
    path: list = dataclasses.field(default_factory=list)
    cap: float = None
    reason: str = None


def _trace_back(model, chain, tensor):
    """Follow ``tensor`` back through scale-preserving layers to the BatchNormalization making it."""
    while chain.reason is None and chain.producer is None:
        layer = _history_layer(tensor) if tensor is not None else None
        if layer is None or _class_name(layer) in ("InputLayer", "QuantizeLayer"):
            chain.reason = "its input comes from the model's input, not from a BatchNormalization"
        elif len(readers := _readers(layer, model)) != 1:
            chain.reason = f"'{layer.name}' feeds {len(readers)} layers (rescaling it would change the others)"
        elif isinstance(unwrapped(layer), tf.keras.layers.BatchNormalization):
            if not (unwrapped(layer).scale and unwrapped(layer).center):
                chain.reason = f"BatchNormalization '{layer.name}' has no gamma or no beta to rescale"
            else:
                chain.producer = layer
                chain.path.append(layer)
        elif _class_name(layer) in _HOMOGENEOUS or _relu_cap(layer)[0] or _is_output_range(layer):
            chain.path.append(layer)
            tensor = _single_input(layer)
        else:
            chain.reason = f"'{layer.name}' ({_class_name(layer)}) lies between it and a BatchNormalization"


def _trace_forward(model, chain):
    """Follow the owner's output (a tfmot output quantizer) through scale-preserving layers to the
    kernel layer that reads it."""
    layer = chain.owner
    while chain.reason is None and chain.consumer is None:
        readers = _readers(layer, model)
        if len(readers) != 1:
            chain.reason = f"'{layer.name}' feeds {len(readers)} layers (rescaling it would change the others)"
        elif layer_kernels(readers[0]):
            chain.consumer = readers[0]
        elif _class_name(readers[0]) in _HOMOGENEOUS:
            layer = readers[0]
            chain.path.append(layer)
        else:
            chain.reason = (f"'{readers[0].name}' ({_class_name(readers[0])}) lies between it and the kernel layer "
                            "that reads it")


def _chains(model):
    chains = []
    for layer in model.layers:
        quantizer, where = _dorefa_of(layer)
        if quantizer is None:
            continue
        chain = _Chain(layer, quantizer, probe=_single_input(layer))
        if where == "input":
            chain.consumer = layer
        else:  # a tfmot wrapper's output quantizer: the wrapped layer must be the ReLU it quantizes
            is_relu, chain.cap = _relu_cap(layer)
            if not is_relu:
                chain.reason = f"its DoReFa quantizes the output of a {_class_name(layer)}, not of a ReLU"
            chain.path.append(layer)
            _trace_forward(model, chain)
        _trace_back(model, chain, chain.probe)
        if chain.reason is None:
            kernels = layer_kernels(chain.consumer)
            attr = "depthwise_kernel" if "depthwise_kernel" in kernels else "kernel"
            kernel_quantizer = kernels.get(attr, (None, None))[0]
            if attr not in kernels:
                chain.reason = f"'{chain.consumer.name}' has no kernel to take the scale"
            elif kernel_quantizer is not None and not hasattr(kernel_quantizer, "initialize_from"):
                chain.reason = (f"'{chain.consumer.name}': its {attr} quantizer {type(kernel_quantizer).__name__} has "
                                "no scale set from the weights (the rescaled kernel would change its output)")
        chains.append(chain)
    return chains


def dorefa_chains(model):
    """[(BatchNormalization, layer holding a DoReFa quantizer, reason or None)] for every DoReFa
    quantizer of ``model``: a layer's ``input_quantizer`` (syq_tf, larq and Keras 3 layers), or the
    output quantizer of a tfmot wrapper around a ReLU (``syq_tf.tfmot.quantize_model``'s low-bit
    activations). Its input is traced back through scale-preserving layers (pooling, flatten, reshape,
    dropout, padding, cropping, ReLU) to the BatchNormalization that makes it, and a tfmot output
    forward through such layers to the kernel layer that reads it. ``reason`` says why the chain
    cannot be rescaled (then nothing is changed for it)."""
    return [(chain.producer, chain.owner, chain.reason) for chain in _chains(model)]


def fit_dorefa_ranges(model, data, batches=10, batch_size=128, batch_statistics=True):
    """Rescale ``model`` so that each DoReFa quantizer's fixed range [0, 1] fits the activations it
    quantizes; the model's float function is unchanged (up to the clipping it fixes).

    DoReFa quantizes ``round(clip(a, 0, 1) * n) / n``. Switched on in a model trained in float with
    ReLU, it cuts every activation above 1 -- after a BatchNormalization, a large share (measured:
    ranges up to 6 in the benchmark CNN). For each DoReFa quantizer whose input comes from a
    BatchNormalization (through pooling, flatten, dropout, ReLU ...) and is read by one kernel
    layer (the quantizer's own layer for an ``input_quantizer``; for a tfmot model made by
    :func:`syq_tf.tfmot.quantize_model`, the layer reading the quantized ReLU), the scale ``s`` that
    minimises the quantizer's squared error on ``data`` (:func:`best_dorefa_scale`) is moved out of
    the activations and undone after that kernel layer::

        gamma, beta  <-  gamma / s, beta / s            (the BatchNormalization before)
        b            <-  b / s                          (the kernel layer's bias)
        m, v         <-  m / s, (v + eps) / s^2 - eps   (the moving statistics of the BatchNormalization
                                                         that reads the kernel layer's output)

    so the kernel, its quantizer's scales and the size of the optimizer's steps relative to them
    stay as they are. Where no BatchNormalization follows (or ``v`` would turn negative), the kernel
    takes it instead: ``W <- s W`` (the depthwise kernel of separable and depthwise convolutions),
    its quantizer re-initialised from it (every syq_tf weight quantizer's scale follows ``W``: SYQ
    alpha = mean|W|, UniQ delta = k std(W), ...). tfmot's 8-bit ranges of the tensors the scale
    divides (outputs of pooling, of the layers in between) are divided with them, a tfmot kernel
    range multiplied with its kernel. A ReLU with a cap (ReLU6) may stand in the chain: the range
    fitted to its outputs is never above the cap, so DoReFa's clip comes first.
    Quantizers are done in order, each measured after the ones before it were rescaled; the passes
    use batch statistics (as training will) unless ``batch_statistics=False``, and every
    non-trainable variable is restored afterwards. Chains that cannot be rescaled are left alone
    (see :func:`dorefa_chains` for the reasons). Use it when quantization is switched on, after the
    float weights are in place (with ``quantize_model``: right after it, before ``calibrate`` and
    training). Returns ``{name of the layer holding the quantizer: s or the reason it was left alone}``.
    """
    require_model(model, "syq_tf.fit_dorefa_ranges")
    if isinstance(batches, (bool, np.bool_)) or not isinstance(batches, numbers.Integral) or batches < 1:
        raise ValueError(f"syq_tf.fit_dorefa_ranges: batches={batches!r} must be a positive integer.")
    result = {}
    for chain in _chains(model):
        name = chain.owner.name
        if chain.reason is not None:
            result[name] = chain.reason
            continue
        values = _probe(model, chain.probe, data, batches, batch_size, batch_statistics)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"syq_tf.fit_dorefa_ranges: the input of '{name}' holds NaN or Inf "
                             "values on the data (check the data and the weights)")
        if chain.cap is not None:  # the output quantizer of a capped ReLU reads its outputs
            values = np.minimum(values, chain.cap)
        scale = best_dorefa_scale(values, chain.quantizer.bits)
        if scale is None:
            result[name] = "its input is never positive on the data"
            continue
        _rescale(model, chain, scale)
        result[name] = scale
    return result


def _probe(model, tensor, data, batches, batch_size, batch_statistics):
    """The values of ``tensor`` (a tensor of ``model``'s graph) on the batches, flat; every
    non-trainable variable (BatchNorm moving statistics) restored afterwards."""
    probe = tf.keras.Model(model.inputs, tensor)
    saved = [(v, v.numpy()) for v in model.non_trainable_variables]
    values = []
    try:
        for x in _batches(model, data, batches, batch_size, owner="syq_tf.fit_dorefa_ranges"):
            values.append(np.asarray(probe(x, training=batch_statistics), np.float32).ravel())
    finally:
        for variable, value in saved:
            variable.assign(value)
    if not values:
        raise ValueError("syq_tf.fit_dorefa_ranges: the data gave no batches.")
    return np.concatenate(values)


def _next_batchnorm(model, consumer):
    """The BatchNormalization that alone reads ``consumer``'s output (through no activation but
    ReLU or none), or None."""
    readers = _readers(consumer, model)
    if len(readers) != 1 or _activation_name(consumer) not in ("linear", "relu"):
        return None
    if isinstance(unwrapped(readers[0]), tf.keras.layers.BatchNormalization) and not getattr(
            unwrapped(readers[0]), "renorm", False):
        return readers[0]
    return None


def _is_output_range(layer):
    """A Keras 3 ``quantize_model`` output range: a MovingAverageActivation used as a layer of its own."""
    return type(layer).__name__ == "MovingAverageActivation"


def _ranges(layer, kinds):
    """The range variables of ``layer`` for the given kinds: tfmot's (``<kind>_min`` / ``<kind>_max``
    of a wrapper), or the low and high of a Keras 3 output range (kind 'output')."""
    if _is_output_range(layer):
        return [layer.low, layer.high] if "output" in kinds and layer.built else []
    found = []
    for variable in getattr(layer, "non_trainable_weights", []) if hasattr(layer, "quantize_config") else []:
        stem = variable.name.split("/")[-1].split(":")[0]
        if any(stem in (f"{kind}_min", f"{kind}_max") for kind in kinds):
            found.append(variable)
    return found


_OUTPUT_RANGES = ("output", "pre_activation", "post_activation")


def _undo_in_next_batchnorm(model, consumer, scale):
    """Undo a division of ``consumer``'s input by ``scale`` in its bias and the moving statistics of
    the BatchNormalization alone after it; False (nothing changed) without one, or where the
    variance would turn negative."""
    following = _next_batchnorm(model, consumer)
    if following is None:
        return False
    # (y / s - m') / sqrt(v' + eps) = (y - m) / sqrt(v + eps):  m' = m / s,  v' = (v + eps) / s^2 - eps
    bn = unwrapped(following)
    eps = float(bn.epsilon)
    variance = (bn.moving_variance.numpy().astype(np.float64) + eps) / scale**2 - eps
    if not np.all(variance >= 0.0):
        return False
    bias = getattr(unwrapped(consumer), "bias", None)
    if bias is not None:
        bias.assign(bias / scale)
    bn.moving_mean.assign(bn.moving_mean / scale)
    bn.moving_variance.assign(variance.astype(np.float32))
    return True


def _rescale(model, chain, scale):
    """Divide the producer's output by ``scale`` and undo it after the consumer: in the moving
    statistics of the BatchNormalization that follows it when there is one (the kernel and its
    quantizer keep their values, so the optimizer's steps keep their size relative to them), else
    in the consumer's kernel (re-initialising its quantizer's scale)."""
    producer, consumer = unwrapped(chain.producer), chain.consumer
    producer.gamma.assign(producer.gamma / scale)
    producer.beta.assign(producer.beta / scale)
    divided = list(chain.path)
    if _undo_in_next_batchnorm(model, consumer, scale):
        divided.append(consumer)  # its output is divided too
    else:
        kernels = layer_kernels(consumer)
        attr = "depthwise_kernel" if "depthwise_kernel" in kernels else "kernel"
        quantizer, kernel = kernels[attr]
        kernel.assign(kernel * scale)
        if quantizer is not None:
            quantizer.initialize_from(kernel)
        for variable in _ranges(consumer, (attr,)):
            variable.assign(variable * scale)
    for layer in divided:
        for variable in _ranges(layer, _OUTPUT_RANGES):
            variable.assign(variable / scale)
