"""Callbacks: TensorBoard logging of the quantizers (QuantizerLogger) and a NaN/Inf check (CheckFinite).

``QuantizerLogger(log_dir)`` writes, every ``every`` epochs (and at the end of training), for each
quantized kernel of the model (syq_tf, larq and tfmot layers):
  - ``<layer>/<kernel>/<scale>``: every scale variable (SYQ alpha, UniQ delta, loss-aware alpha /
    alpha_neg) as a scalar (its mean, and each element for up to ``max_scalars`` of them) and a
    histogram;
  - ``<layer>/<kernel>/codebook``: the distinct values of the quantized kernel as a histogram and
    their count as a scalar ``levels``; ``<layer>/<kernel>/weights``: the float kernel histogram;
  - ``<layer>/<kernel>/curvature``: for loss-aware kernels trained with LossAwareAdam, the curvature
    d = sqrt(v_hat) + eps the next projection uses (histogram, and its mean);
  - activation quantizers' steps (``<quantizer>/<variable>``) as scalars.
"""

import numpy as np
import tensorflow as tf

from syq_tf.calibration import calibratable_quantizers
from syq_tf.models import quantized_kernels
from syq_tf.quantizers._common import is_int


def _clean(name):
    return name.split(":")[0].replace("/", "_")


class QuantizerLogger(tf.keras.callbacks.Callback):
    """A Keras callback writing the quantizers' state to TensorBoard (module docstring)."""

    def __init__(self, log_dir, every=1, max_scalars=16):
        super().__init__()
        if not is_int(every) or every < 1:
            raise ValueError(f"QuantizerLogger: every={every!r} must be an integer >= 1 (epochs).")
        self.log_dir = log_dir
        self.every = int(every)
        self.max_scalars = int(max_scalars)
        self._writer = None

    def _writer_(self):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        return self._writer

    def log(self, step):
        """Write everything for ``step`` now (also callable outside ``fit``)."""
        optimizer = getattr(self.model, "optimizer", None)
        with self._writer_().as_default(step=int(step)):
            for layer, quantizer, kernel in quantized_kernels(self.model):
                prefix = f"{layer.name}/{_clean(kernel.name.split('/')[-1])}"
                for variable in getattr(quantizer, "weights", []):
                    if not tf.as_dtype(variable.dtype).is_floating:
                        continue
                    values = variable.numpy().ravel()
                    tag = f"{prefix}/{_clean(variable.name.split('/')[-1])}"
                    tf.summary.scalar(f"{tag}/mean", float(values.mean()))
                    tf.summary.histogram(tag, values)
                    if values.size <= self.max_scalars:
                        for i, v in enumerate(values):
                            tf.summary.scalar(f"{tag}/{i}", float(v))
                q = np.asarray(quantizer(tf.convert_to_tensor(kernel)))
                levels = np.unique(q)
                tf.summary.histogram(f"{prefix}/codebook", levels)
                tf.summary.scalar(f"{prefix}/levels", float(levels.size))
                tf.summary.histogram(f"{prefix}/weights", kernel.numpy().ravel())
                d = _curvature(optimizer, quantizer, kernel)
                if d is not None:
                    tf.summary.histogram(f"{prefix}/curvature", d)
                    tf.summary.scalar(f"{prefix}/curvature/mean", float(d.mean()))
            for quantizer in calibratable_quantizers(self.model):
                for variable in quantizer.weights:
                    if tf.as_dtype(variable.dtype).is_floating and int(np.prod(variable.shape)) == 1:
                        tf.summary.scalar(f"{quantizer.name}/{_clean(variable.name.split('/')[-1])}",
                                          float(variable.numpy().ravel()[0]))
        self._writer_().flush()

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            self.log(epoch + 1)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _curvature(optimizer, quantizer, kernel):
    """d = sqrt(v_hat) + eps of a loss-aware kernel from LossAwareAdam, else None."""
    if optimizer is None or quantizer not in getattr(optimizer, "loss_aware_quantizers", []):
        return None
    if not getattr(optimizer, "_built", getattr(optimizer, "built", False)):  # tf_keras / Keras 3
        return None
    try:
        # the curvature the last update projected with (iterations counts the updates applied)
        return optimizer._curvature(kernel, step=optimizer.iterations).numpy().ravel()  # noqa: SLF001
    except KeyError:
        return None


class CheckFinite(tf.keras.callbacks.Callback):
    """Stops training with a FloatingPointError naming the layer and variable as soon as a quantized
    kernel or one of its quantizer's variables (scales, steps) holds NaN or Inf (checked every
    ``every`` batches and at the end of each epoch)."""

    def __init__(self, every=1):
        super().__init__()
        if not is_int(every) or every < 1:
            raise ValueError(f"CheckFinite: every={every!r} must be an integer >= 1 (batches).")
        self.every = int(every)

    def check(self):
        for layer, quantizer, kernel in quantized_kernels(self.model):
            for variable in [kernel, *getattr(quantizer, "weights", [])]:
                if tf.as_dtype(variable.dtype).is_floating and not np.all(np.isfinite(variable.numpy())):
                    bad = int(np.sum(~np.isfinite(variable.numpy())))
                    raise FloatingPointError(
                        f"layer '{layer.name}': {variable.name} has {bad} non-finite value(s) (NaN/Inf); "
                        "training stopped (check the learning rate, the inputs and the loss)."
                    )

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.every == 0:
            self.check()

    def on_epoch_end(self, epoch, logs=None):
        self.check()
