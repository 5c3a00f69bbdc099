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

import numbers

import numpy as np
import tensorflow as tf


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


def _batches(data, batches, batch_size):
    if isinstance(data, tf.data.Dataset):
        source = data
    else:
        if isinstance(data, (tuple, list)):
            data = data[0]
        array = np.asarray(data)
        if array.ndim == 0 or len(array) == 0:
            raise ValueError("syq_tf.calibrate: no calibration data (an empty array).")
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
        for x in _batches(data, batches, batch_size):
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
