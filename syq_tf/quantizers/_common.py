"""Shared pieces of all quantizers: registration, base class, weight subgroups.

Kernel layouts (Keras): Dense ``[c_in, c_out]``, Conv1D ``[k, c_in, c_out]``, Conv2D
``[kh, kw, c_in, c_out]``, DepthwiseConv2D ``[kh, kw, c_in, multiplier]``.
"""

import contextlib
import contextvars
import numbers

from syq_tf import _bootstrap

KERAS = _bootstrap.frontend()  # 2 (tf_keras, larq) or 3 (keras): tf.keras below is that Keras

import numpy as np  # noqa: E402  (after the frontend is chosen)
import tensorflow as tf  # noqa: E402

if KERAS == 2:
    import larq as lq  # noqa: E402

    QuantizerBase = lq.quantizers.Quantizer  # larq's models.summary and quantizers.get know it
else:

    class QuantizerBase(tf.keras.layers.Layer):
        """Keras 3: a layer with larq's one extra attribute, the output's bit width."""

        precision = None

# add_weight(aggregation=...) for variables every replica writes alone (Keras 3 takes the name).
NO_AGGREGATION = tf.VariableAggregation.NONE if KERAS == 2 else "none"

GRANULARITIES = ("layer", "row", "pixel", "channel")


def is_int(value):
    """An integer argument: Python or numpy (``np.int64(2)``), never a bool or a float."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value):
    """A real-number argument: Python or numpy int / float (``np.float32(0.1)``), never a bool.
    NaN and infinities are numbers here: range checks refuse them."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def shown(value):
    """``value`` for an error message: numpy scalars as the Python value (numpy 2's repr would print
    ``np.float32(nan)`` and ``np.True_`` where numpy 1 printed ``nan`` and ``True``)."""
    return value.item() if isinstance(value, np.generic) else value


def owner_name(kind, kwargs):
    """The owner an error message names: ``kind`` and, when the constructor got one, the layer
    name among its ``kwargs`` (``"SYQ conv1"``, or ``"SYQ"`` before the name is known)."""
    return f"{kind} {kwargs.get('name', '')!s}".rstrip()


def register(alias=None):
    """Register a quantizer as a Keras custom object so saved models load without a scope.

    Two names: ``syq_tf>Name`` (Keras' package-qualified name) and the plain class name, which
    Keras' legacy (h5) deserialization and larq's ``quantizers.get`` look up. Plain names must not
    collide with larq's (larq has a ``DoReFa``; ours is ``DoReFaActivation``), checked here.
    """

    def decorate(cls):
        cls = tf.keras.utils.register_keras_serializable(package="syq_tf")(cls)
        objects = tf.keras.utils.get_custom_objects()
        for name in (cls.__name__, alias):
            if name is None:
                continue
            taken = objects.get(name)
            if taken is not None and taken.__module__.split(".")[0] != "syq_tf":
                raise RuntimeError(f"quantizer name {name!r} is already registered by {taken.__module__}")
            objects[name] = cls
        return cls

    return decorate


class WeightQuantizer(QuantizerBase):
    """Base of quantizers meant for kernels (``kernel_quantizer``), never for activations."""

    role = "weight"

    def compute_output_shape(self, input_shape):
        return input_shape

    def _check_shape(self, shape):
        """A quantizer with per-kernel state is built for one kernel shape (``_kernel_shape``)."""
        if not self._kernel_shape.is_compatible_with(shape):
            kind = type(self).__name__
            raise ValueError(
                f"{kind} quantizer '{self.name}' was built for a kernel of shape {self._kernel_shape} "
                f"and now got {tf.TensorShape(shape)}: each layer needs its own quantizer instance "
                f"(pass a new {kind}(...) per layer, or let syq_tf.quantize copy it)."
            )


class LearnedScaleQuantizer(WeightQuantizer):
    """A weight quantizer with one trainable scale per subgroup (SYQ's alpha, UniQ's delta).

    The scale variable (``SCALE_NAME``) starts from the weights the first time the quantizer sees
    real values, in eager and in graph mode (so a float checkpoint loaded before training is
    used), tracked by a bool variable ``<SCALE_NAME>_initialized``; ``initialize_from`` sets it
    again. Subclasses give ``SCALE_NAME``, ``reduce_axes(shape)`` and ``initial_scale(w)``.
    """

    SCALE_NAME = "scale"
    SCALE_CONSTRAINT = None

    def reduce_axes(self, kernel_shape):
        raise NotImplementedError

    def initial_scale(self, w):
        raise NotImplementedError

    @property
    def _scale(self):
        return getattr(self, self.SCALE_NAME)

    @property
    def _scale_initialized(self):
        return getattr(self, self.SCALE_NAME + "_initialized")

    def build(self, input_shape):
        self._reduce_axes = self.reduce_axes(input_shape)
        self._kernel_shape = tf.TensorShape(input_shape)
        constraint = self.SCALE_CONSTRAINT() if self.SCALE_CONSTRAINT else None
        setattr(self, self.SCALE_NAME, self.add_weight(
            name=self.SCALE_NAME, shape=scale_shape(input_shape, self._reduce_axes), initializer="ones",
            trainable=True, constraint=constraint,
        ))
        # False until the scale has been set from real weights (first call or initialize_from).
        setattr(self, self.SCALE_NAME + "_initialized", self.add_weight(
            name=self.SCALE_NAME + "_initialized", shape=(), dtype=tf.bool, initializer="zeros",
            trainable=False,
        ))
        super().build(input_shape)

    def initialize_from(self, kernel):
        """Set the scales from the given float kernel."""
        kernel = tf.convert_to_tensor(kernel, dtype=self.dtype)
        if not self.built:
            self.build(kernel.shape)
        self._check_shape(kernel.shape)
        self._scale.assign(self.initial_scale(kernel))
        self._scale_initialized.assign(True)

    def scale_for(self, w):
        """The scale tensor to quantize ``w`` with, initialising it from ``w`` on first use."""
        self._check_shape(w.shape)

        def init():
            self._scale.assign(self.initial_scale(w))
            self._scale_initialized.assign(True)
            return tf.constant(True)

        if tf.executing_eagerly():
            if not bool(self._scale_initialized.numpy()):
                init()
            return tf.identity(self._scale)
        ready = tf.cond(tf.convert_to_tensor(self._scale_initialized), lambda: tf.constant(True), init)
        with tf.control_dependencies([ready]):
            return tf.identity(self._scale)


class ActivationQuantizer(QuantizerBase):
    """Base of quantizers meant for layer inputs (``input_quantizer``)."""

    role = "activation"

    def compute_output_shape(self, input_shape):
        return input_shape

    def export_grid(self):
        """(step, number of levels) if the output levels are exactly {0, step, ..., (n-1) step}
        (export then stores them exactly: an int8 tensor of scale ``step``), else None."""
        return None

    def exact_in_int8(self):
        """True if int8 TFLite computes exactly this quantizer's levels (it has an export grid)."""
        return self.export_grid() is not None

    def export_range(self):
        """(min, max) int8 range for quantizers without an exact grid (an approximation)."""
        raise NotImplementedError(f"{type(self).__name__} has no int8 export range")

    def int8_form(self):
        """``(low, high, top)`` of this quantizer's int8 TFLite stand-in (:func:`int8_fake_quant`).
        With a grid of ``n`` levels of ``step`` the int8 range is ``[0, 255 step]``, so the int8
        scale is the step and TFLite itself rounds to the quantizer's levels; ``top = (n - 1) step``
        clips at the highest level (None for 256 levels), the int8 floor at 0 clips below. Without a
        grid: :meth:`export_range` and no clip (an approximation)."""
        grid = self.export_grid()
        if grid is None:
            return (*self.export_range(), None)
        step, levels = grid
        return 0.0, 255.0 * step, ((levels - 1) * step if levels < 256 else None)


# Inside :func:`fine_grid_scales`: {fine int8 scale (float32 of top / 255): (step, m)} of the grids
# written in their fine form; None outside.
_FINE_GRIDS = contextvars.ContextVar("syq_tf_fine_grids", default=None)


@contextlib.contextmanager
def fine_grid_scales():
    """Within this context :func:`int8_fake_quant` writes a grid of ``n`` levels whose ``n - 1``
    divides 255 (1-, 2- and 4-bit grids) in its fine form, and records it: yields ``{fine scale:
    (step, m)}``, ``m = 255 / (n - 1)`` (None where grids of different steps share a fine scale, a
    2-bit and a 4-bit DoReFa on [0, 1] say: their tensors cannot be told apart in the flatbuffer).
    The fine form rounds to the levels, then holds them at the int8 scale ``top / 255 = step / m``
    (the levels are exact multiples of it, and the int8 range ends at the top level): the converter then computes the int32 bias of every op reading the tensor on a
    grid ``m`` times finer than at scale ``step``. The converter keeps only the last of the two
    ranges, so the rounding to the levels is restored afterwards in the flatbuffer
    (:func:`syq_tf.export.flatbuffer.round_to_grids`)."""
    grids = {}
    token = _FINE_GRIDS.set(grids)
    try:
        yield grids
    finally:
        _FINE_GRIDS.reset(token)


def grid_multiplier(low, high, top):
    """``m = 255 / (n - 1)`` of an int8 stand-in ``[low, high]`` clipped at ``top`` that is a grid of
    ``n`` levels of step ``high / 255`` with ``n - 1`` dividing 255 and ``m > 1``; else None."""
    if top is None or low != 0.0 or not high > 0.0:
        return None
    gaps = top * 255.0 / high  # n - 1
    levels = round(gaps)
    if levels < 1 or levels >= 255 or 255 % levels or abs(gaps - levels) > 1e-4:
        return None
    return 255 // levels


UNIT_GRID_TOP = 255.0 / 256.0  # the largest level of int8 TFLite's LOGISTIC and SOFTMAX outputs


def int8_unit_grid(p):
    """``p`` (a sigmoid or softmax output, in [0, 1]) on the fixed output grid of int8 TFLite's
    LOGISTIC and SOFTMAX, scale 1/256 and zero point -128 (the levels ``k / 256``, ``k = 0 .. 255``):
    ``min(round(256 p), 255) / 256`` (round half up, a FakeQuant on ``[0, 255/256]``), with a
    straight-through gradient inside that range. The converter takes the FakeQuant as the op's own
    output quantization (no extra op)."""
    return tf.quantization.fake_quant_with_min_max_args(p, min=0.0, max=UNIT_GRID_TOP, num_bits=8,
                                                        narrow_range=False)


def int8_fake_quant(x, low, high, top=None):
    """The int8 stand-in of an activation quantizer (:meth:`ActivationQuantizer.int8_form`): a clip
    at ``top`` (a MINIMUM op) and a FakeQuant on ``[low, high]`` the converter turns into the int8
    scale and zero point of the tensor. Inside :func:`fine_grid_scales`, a 1-, 2- or 4-bit grid is
    written in its fine form: the FakeQuant on ``[low, high]`` (the rounding to the levels), the clip,
    and a FakeQuant on ``[0, top]`` (the same values, held at scale ``top / 255``)."""
    grids = _FINE_GRIDS.get()
    m = None if grids is None else grid_multiplier(low, high, top)
    if m is None:
        if top is not None:
            x = tf.minimum(x, float(top))
        return tf.quantization.fake_quant_with_min_max_args(x, min=float(low), max=float(high), num_bits=8,
                                                            narrow_range=False)
    fine, grid = float(np.float32(top / 255.0)), (float(high) / 255.0, m)
    grids[fine] = grid if grids.get(fine, grid) == grid else None  # None: two grids share a fine scale
    x = tf.quantization.fake_quant_with_min_max_args(x, min=float(low), max=float(high), num_bits=8,
                                                     narrow_range=False)
    x = tf.minimum(x, float(top))  # between the two ranges: the converter merges adjacent FakeQuants
    return tf.quantization.fake_quant_with_min_max_args(x, min=0.0, max=float(top), num_bits=8,
                                                        narrow_range=False)


def subgroup_reduce_axes(granularity, kernel_shape, depthwise=False, owner="quantizer", transposed=False):
    """Axes of the kernel that one scale is shared over, for a given granularity.

    layer   -> every axis (one scale)
    channel -> every axis but the output channel (last; last two for depthwise kernels; the one
               before last for transposed convolutions, ``transposed=True``: [.., c_out, c_in])
    pixel   -> the two channel axes: one scale per spatial position (kh*kw for Conv2D)
    row     -> every axis but the kernel row: one scale per row i (kh for Conv2D)
    """
    shape = tf.TensorShape(kernel_shape)
    if not shape.is_fully_defined():
        raise ValueError(
            f"{owner}: got a tensor of shape {shape}; weight quantizers quantize kernels of known "
            "shape. Use it as kernel_quantizer, not as input_quantizer."
        )
    rank = shape.rank
    if granularity not in GRANULARITIES:
        raise ValueError(f"{owner}: unknown granularity {granularity!r}; allowed: {GRANULARITIES}.")
    if rank < 2:
        raise ValueError(f"{owner}: kernel of rank {rank} (shape {shape}); expected rank >= 2.")
    if transposed and (depthwise or rank not in (3, 4)):
        raise ValueError(
            f"{owner}: transposed=True marks a Conv1DTranspose / Conv2DTranspose kernel [k, c_out, c_in] "
            f"or [kh, kw, c_out, c_in], got shape {shape}" + (" with depthwise=True" if depthwise else "") + "."
        )
    all_axes = tuple(range(rank))
    if granularity == "layer":
        return all_axes
    if granularity == "channel":
        keep = (rank - 2, rank - 1) if depthwise else (rank - 2,) if transposed else (rank - 1,)
        return tuple(a for a in all_axes if a not in keep)
    if granularity == "pixel":
        if rank < 3:
            raise ValueError(
                f"{owner}: granularity 'pixel' needs a convolution kernel (rank >= 3), got shape "
                f"{shape}; for Dense kernels use 'layer' or 'channel'."
            )
        return (rank - 2, rank - 1)
    # row
    if rank != 4:
        raise ValueError(
            f"{owner}: granularity 'row' needs a 2-D convolution kernel [kh, kw, c_in, c_out] (or "
            f"[kh, kw, c_out, c_in]), got "
            f"shape {shape}; allowed here: 'layer', 'channel'" + (", 'pixel'." if rank >= 3 else ".")
        )
    return (1, 2, 3)


def scale_shape(kernel_shape, reduce_axes):
    """Shape of the scale tensor: the kernel shape with reduced axes set to 1 (broadcastable)."""
    return [1 if axis in reduce_axes else int(dim) for axis, dim in enumerate(kernel_shape)]


def sign_pm1(x):
    """sign with sign(0) := +1, written as LCE's converter recognises it."""
    return tf.where(x >= 0, tf.ones_like(x), -tf.ones_like(x))


def to_groups(w, reduce_axes):
    """Move the kept axes of ``w`` (static shape) to the front and flatten: [groups, n]; returns the
    2-D tensor and the permutation needed to undo it with :func:`from_groups`."""
    rank = w.shape.rank
    keep = [axis for axis in range(rank) if axis not in reduce_axes]
    perm = keep + list(reduce_axes)
    moved = tf.transpose(w, perm)
    groups = 1
    for axis in keep:
        groups *= int(w.shape[axis])
    return tf.reshape(moved, [groups, -1]), perm


def from_groups(q2d, shape, perm):
    """Inverse of :func:`to_groups` for a kernel of static ``shape``."""
    moved_shape = [int(shape[axis]) for axis in perm]
    inverse = [0] * len(perm)
    for position, axis in enumerate(perm):
        inverse[axis] = position
    return tf.transpose(tf.reshape(q2d, moved_shape), inverse)
