"""The loss-aware optimizer: Adam whose second moments are the curvature of the LossAware quantizers.

Loss-aware training (Hou & Kwok; ../shared/METHODS.md §4), one step t for a kernel w quantized by
``LossAware(curvature="optimizer")``:

    forward            Q_t = alpha_t b(w_t)                     (levels at the stored scales)
    gradient           g_t = dL/dQ_t, applied to w unchanged    (identity straight-through)
    Adam               m, v <- EMAs of g, g^2;   w_{t+1} = w_t - lr m_hat / (sqrt(v_hat) + eps)
    clip               w_{t+1} <- clip(w_{t+1}, -1, 1)
    curvature          d_t = sqrt(v_hat_t) + eps                (v_hat = v / (1 - beta_2^t))
                       (curvature="raw": d_t = sqrt(v_t) + eps, the authors' code)
    projection         alpha_{t+1} = argmin_alpha min_b sum d_t (alpha b - w_{t+1})^2

The last two lines are this class's addition to Adam; they run inside ``apply_gradients``, so plain
``model.fit`` trains loss-aware. Which variables are loss-aware is read from the variables themselves
(``syq_tf.quantize`` layers mark their kernels; larq layers hand the optimizer a QuantizedVariable
that carries its quantizer). Other variables get plain Adam.
"""

import numbers
import weakref

import numpy as np

import tensorflow as tf

from syq_tf.quantizers._common import shown
from syq_tf.quantizers.loss_aware import LossAware, use_xla

_MARK = "_syq_quantizer"


def _real(value):
    """A real number that is no bool (numpy scalars included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _allowed(value, bound):
    """False for a number or a string unless it is a real number within ``bound``; True otherwise
    (a schedule, a callable or a tensor: Keras's to check)."""
    return (_real(value) and bound(value)) or not (_real(value) or isinstance(value, str))


def mark_quantized(variable, quantizer):
    """Record on a kernel variable which quantizer reads it (a weak reference)."""
    setattr(variable, _MARK, weakref.ref(quantizer))


def loss_aware_quantizer_of(variable):
    """The LossAware quantizer that quantizes ``variable`` (a syq_tf or larq kernel), else None."""
    candidates = [variable]
    container = getattr(variable, "_distributed_container", None)
    if callable(container):
        candidates.append(container())
    candidates += [getattr(v, "latent_variable", None) for v in list(candidates)]
    for candidate in candidates:
        if candidate is None:
            continue
        ref = getattr(candidate, _MARK, None)
        quantizer = ref() if ref is not None else None
        if quantizer is None:
            quantizer = candidate.__dict__.get("quantizer") if hasattr(candidate, "__dict__") else None
        if isinstance(quantizer, LossAware):
            return quantizer
    return None


@tf.function(jit_compile=True)
def _curvature_xla(v, scale, epsilon):
    """sqrt(v * scale) + eps in one fused pass (scale: 1 / (1 - beta_2^t), or 1 for "raw")."""
    return tf.sqrt(v * scale) + epsilon


@tf.keras.utils.register_keras_serializable(package="syq_tf")
class LossAwareAdam(tf.keras.optimizers.Adam):
    """Adam that also clips and projects the kernels of LossAware quantizers (module docstring).

    Arguments are Adam's (``epsilon`` is also the eps of d = sqrt(v_hat) + eps; the paper uses 1e-8),
    plus ``clip``: loss-aware kernels are clipped to [-clip, clip] after every update (default 1, the
    paper's; None disables). Kernels of ``LossAware(curvature="constant")`` are clipped but not
    projected (their quantizer projects with d = 1 itself).

    ``curvature``: "bias_corrected" (default) d = sqrt(v_hat) + eps with Adam's bias-corrected
    v_hat = v / (1 - beta_2^t); "raw": d = sqrt(v) + eps, the authors' code. The projections are
    invariant to scaling d by a constant, so the two differ only where sqrt(v) is comparable with
    eps (README, Fidelity).
    """

    CURVATURES = ("bias_corrected", "raw")

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-8, clip=1.0,
                 curvature="bias_corrected", name="LossAwareAdam", **kwargs):
        if curvature not in self.CURVATURES:
            raise ValueError(
                f"LossAwareAdam: curvature={curvature!r}; allowed: 'bias_corrected' (d = sqrt(v_hat) + "
                "eps) or 'raw' (d = sqrt(v) + eps, the authors' code)."
            )
        if clip is not None and not (_real(clip) and 0 < clip < float("inf")):
            raise ValueError(f"LossAwareAdam: clip={shown(clip)!r} must be a finite number > 0 or None.")
        if not _allowed(learning_rate, lambda v: 0 <= v < float("inf")):  # a negative rate climbs the loss
            raise ValueError(f"LossAwareAdam: learning_rate={shown(learning_rate)!r} must be a finite number "
                             ">= 0, a LearningRateSchedule or a callable.")
        for key, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not _allowed(value, lambda v: 0 <= v < 1):
                raise ValueError(f"LossAwareAdam: {key}={shown(value)!r} must be a number in [0, 1) "
                                 "(an exponential decay rate).")
        if not (_real(epsilon) and 0 < epsilon < float("inf")):
            raise ValueError(f"LossAwareAdam: epsilon={shown(epsilon)!r} must be a finite number > 0 (the "
                             "curvature d = sqrt(v) + eps divides the projection's weights).")
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         name=name, **kwargs)
        self.clip = None if clip is None else float(clip)
        self.curvature = curvature
        # kernel key -> quantizer; a plain dict on purpose: as a tracked attribute it would make the
        # quantizers part of the optimizer's SavedModel graph (revived as extra, unbuilt copies).
        object.__setattr__(self, "_loss_aware", {})

    def build(self, var_list):
        super().build(var_list)
        for variable in var_list:
            quantizer = loss_aware_quantizer_of(variable)
            if quantizer is None:
                continue
            self._loss_aware[self._var_key(variable)] = quantizer
            if quantizer.curvature == "optimizer":
                if not quantizer.built:
                    quantizer.build(variable.shape)
                with tf.init_scope():
                    quantizer._bound.assign(True)

    @property
    def loss_aware_quantizers(self):
        """The LossAware quantizers whose kernels this optimizer trains."""
        return list(self._loss_aware.values())

    def _curvature(self, variable, step=None):
        """d = sqrt(v_hat) + eps (curvature "raw": sqrt(v) + eps) for ``variable`` after update number
        ``step`` (default: the step being applied, ``iterations + 1``; after training, pass
        ``iterations``, the last step applied)."""
        index = self._slot_index(variable)
        v = self._velocity_hats[index] if self.amsgrad else self._velocities[index]
        dtype = variable.dtype
        if self.curvature == "raw":
            scale = tf.ones([], dtype)
        else:
            step = tf.cast(self.iterations + 1 if step is None else step, dtype)
            scale = 1.0 / (1.0 - tf.pow(tf.cast(self.beta_2, dtype), step))
        if use_xla(variable.shape):
            return _curvature_xla(tf.convert_to_tensor(v), scale, tf.cast(self.epsilon, dtype))
        return tf.sqrt(v * scale) + tf.cast(self.epsilon, dtype)

    def _slot_index(self, variable):
        """Position of ``variable``'s Adam slots (Keras 3 and tf_keras index them differently)."""
        if hasattr(self, "_get_variable_index"):  # Keras 3
            return self._get_variable_index(variable)
        return self._index_dict[self._var_key(variable)]

    def update_step(self, gradient, variable, *learning_rate):
        """Adam's step (Keras 3 also passes the learning rate), then clip and project."""
        quantizer = self._loss_aware.get(self._var_key(variable))
        if quantizer is None:
            return super().update_step(gradient, variable, *learning_rate)
        projected = quantizer.curvature == "optimizer"
        # the last step's kernel: its support starts the approximate LAT iterations (LAB needs
        # nothing, LAQ starts from the stored scale; True just marks a warm start)
        warm_support = quantizer.mode in ("ternary", "ternary_two_scale")
        previous = (tf.identity(variable) if warm_support else True) if projected else None
        super().update_step(gradient, variable, *learning_rate)
        if self.clip is not None:
            variable.assign(tf.clip_by_value(variable, -self.clip, self.clip))
        if projected:
            w = tf.identity(variable)
            quantizer.set_scales(quantizer.project(w, self._curvature(variable), previous=previous))

    def get_config(self):
        return {**super().get_config(), "clip": self.clip, "curvature": self.curvature}
