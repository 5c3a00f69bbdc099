"""A Keras 3 BatchNormalization that trains with TensorFlow's fused kernel.

Keras 3's ``BatchNormalization`` on the TensorFlow backend computes a training step from separate
ops: ``tf.nn.moments`` (a mean, then the mean of squared differences) and ``tf.nn.batch_normalization``,
each differentiated op by op. tf_keras (Keras 2) calls one fused kernel, ``FusedBatchNormV3``, and
its one gradient kernel. On the benchmark CNN (five BatchNormalizations) that difference is all of
the gap between the two frontends' training steps (benchmarks/keras3_step_time.py): Keras 3 is
1.10-1.13x Keras 2 with them, 0.94-0.97x without.

:class:`FusedBatchNormalization` is Keras 3's layer (same weights, config, file format and inference
graph) whose *training* call uses the fused kernel where it computes the same thing:

    y      = gamma * (x - mean_B) / sqrt(var_B + epsilon) + beta       (mean_B, var_B over the batch,
                                                                         every axis but the channel's)
    moving_mean     <- momentum * moving_mean     + (1 - momentum) * mean_B
    moving_variance <- momentum * moving_variance + (1 - momentum) * var_B   (var_B biased, as Keras 3)

The fused kernel returns the batch variance with Bessel's correction (n / (n - 1), n the values per
channel); it is taken out before the moving variance is updated, as tf_keras does. The fused path
needs: a 4-D input with the channel axis last or first (or 5-D, channel last or first), float16 /
bfloat16 / float32 inputs, ``epsilon`` >= 1.001e-5 (the kernel's floor), no ``mask``, no
``renorm``, no ``synchronized``. Anything else and inference (``training=False``, or the layer not
trainable) run Keras 3's own code unchanged. (``syq_tf.keras3`` runs on the TensorFlow backend only.)

:func:`syq_tf.keras3.quantize_model` puts this class in place of every plain
``keras.layers.BatchNormalization`` (``fused_batchnorm=False`` keeps Keras's); in a model built by
hand use it as the BatchNormalization. It is an ordinary subclass: ``isinstance(layer,
keras.layers.BatchNormalization)`` holds, export folds it like Keras's (its inference graph is
Keras's), and ``.keras`` files load in safe mode once ``syq_tf.keras3`` is imported.
"""

import keras
import tensorflow as tf

MIN_EPSILON = 1.001e-5  # FusedBatchNormV3 raises its epsilon to this; below it, the fused path would differ
_FUSED_DTYPES = ("float16", "bfloat16", "float32")
_FORMATS = {(4, 3): "NHWC", (4, 1): "NCHW", (5, 4): "NDHWC", (5, 1): "NCDHW"}  # (rank, channel axis)


@keras.saving.register_keras_serializable(package="syq_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose training step runs TensorFlow's fused kernel
    (module docstring); the same arguments, weights and saved config."""

    def _fused_format(self, inputs, mask):
        """The fused kernel's data format for ``inputs``, or None where it would not compute what
        Keras's code computes (module docstring)."""
        if mask is not None or self.renorm or self.synchronized or self.epsilon < MIN_EPSILON:
            return None
        if keras.backend.standardize_dtype(inputs.dtype) not in _FUSED_DTYPES:
            return None
        rank = len(inputs.shape)
        return _FORMATS.get((rank, self.axis % rank))

    def call(self, inputs, training=None, mask=None):
        data_format = self._fused_format(inputs, mask) if training and self.trainable else None
        if data_format is None:
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, "float32")
        channels = self.moving_mean.shape
        gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones(channels, "float32")
        beta = tf.cast(self.beta, "float32") if self.center else tf.zeros(channels, "float32")
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, epsilon=self.epsilon, data_format=data_format, is_training=True)
        n = tf.cast(tf.size(x, out_type=tf.int64) // tf.size(variance, out_type=tf.int64), "float32")
        variance = variance * (tf.maximum(n - 1.0, 0.0) / tf.maximum(n, 1.0))  # Bessel's correction out
        momentum = self.momentum
        self.moving_mean.assign(tf.cast(self.moving_mean, "float32") * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(tf.cast(self.moving_variance, "float32") * momentum + variance * (1.0 - momentum))
        return tf.cast(y, self.compute_dtype)
