"""The export targets and their options: one table that ``to_tflite``, the ``syq-tf`` command line
(``--target``, ``--weights``) and the docs read, and the options checked once, in one place.

A target is a module with one public entry, ``export(model, options) -> ExportResult``, imported
only when used (target ``lce`` needs larq-compute-engine). To add a target: write the module, add a
row to :data:`REGISTRY`. To add a storage form of the weights: a row in
:data:`syq_tf.export.codebook.STORAGE` and the targets that take it in their row's ``weights``.
"""

import dataclasses
import importlib
import numbers

import numpy as np
import tensorflow as tf

from syq_tf import _bootstrap
from syq_tf.models import check_example_shape


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    module: str
    weights: tuple  # the storage options it takes, the default first
    summary: str

    def load(self):
        return importlib.import_module(self.module)


REGISTRY = {
    "litert": Target("litert", "syq_tf.export.litert", ("int8", "int4", "int2"),
                     "full-integer int8 TFLite for LiteRT (weights int8, or packed INT4 / INT2 where the "
                     "codebook fits), fused int8-weight LSTM for recurrent models"),
    "tflm": Target("tflm", "syq_tf.export.tflm", ("int8",),
                   "the int8 model with LUT-compressed weights for TFLite Micro, and its C array"),
    "lce": Target("lce", "syq_tf.export.lce", ("int8", "float32"),
                  "larq-compute-engine: binary layers bit-packed into LceBconv2d, the rest int8 (dequantized) "
                  "or float32"),
}
TARGETS = tuple(REGISTRY)


def _only(weights):
    takers = [t.name for t in REGISTRY.values() if weights in t.weights]
    return None if len(takers) == len(REGISTRY) else takers[0]


# weights= option -> the one target that takes it (None: every target)
WEIGHTS = {w: _only(w) for t in REGISTRY.values() for w in t.weights}
WEIGHTS_WHY = {
    "int4": "LiteRT's INT4 filters; tflm and lce store low-bit weights in their own packed form.",
    "int2": "LiteRT's INT2 fully-connected filters; tflm and lce store low-bit weights in their own packed form.",
    "float32": "float kernels for the layers LCE cannot pack; litert and tflm are full-integer int8.",
}


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What ``to_tflite`` was asked for, checked (:func:`options`)."""

    target: str = "litert"
    weights: str = "int8"
    representative_data: object = None
    representative_samples: int = 200
    verify_data: object = None
    verify_labels: object = None
    require_exact: bool = False
    requantization: str = "single"  # resolved: "single" or "double" (REQUANTIZATIONS)


# requantization= option: how the runtime rounds an accumulator onto its int8 output ("auto": the
# target's usual runtime, below)
REQUANTIZATIONS = ("auto", "single", "double")
_AUTO_REQUANTIZATION = {"litert": "single", "tflm": "double"}  # XNNPACK rounds once, TFLite Micro twice
REQUANTIZATION_TARGETS = tuple(_AUTO_REQUANTIZATION)


def _weights_allowed():
    parts = [f"'{w}'" + (" (default)" if w == "int8" else f" (target '{t}')") for w, t in WEIGHTS.items()]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def options(model, *, target="litert", weights="int8", representative_data=None, representative_samples=200,
            verify_data=None, verify_labels=None, require_exact=False, requantization="auto"):
    """The export options, checked against each other and against ``model``; ValueError naming the
    argument and what is allowed."""
    if target not in REGISTRY:
        here = [repr(t) + (" (Keras 2 only)" if t == "lce" else "") for t in TARGETS]
        raise ValueError(f"to_tflite: unknown target {target!r}; allowed: {', '.join(here)}.")
    if weights not in WEIGHTS:
        raise ValueError(f"to_tflite: weights={weights!r}; allowed: {_weights_allowed()}.")
    if weights not in REGISTRY[target].weights:
        raise ValueError(f"to_tflite: weights={weights!r} is for target {WEIGHTS[weights]!r} (got "
                         f"target={target!r}): " + WEIGHTS_WHY[weights])
    if requantization not in REQUANTIZATIONS:
        raise ValueError(f"to_tflite: requantization={requantization!r}; allowed: 'auto' (default), 'single' "
                         "(runtimes that round once: XNNPACK) or 'double' (TFLite Micro, LiteRT's builtin kernels).")
    if requantization != "auto" and target not in REQUANTIZATION_TARGETS:
        raise ValueError(f"to_tflite: requantization={requantization!r} is for targets 'litert' and 'tflm' (got "
                         f"target={target!r}); leave it 'auto'.")
    if target == "lce" and _bootstrap.frontend() == 3:
        raise ValueError("to_tflite: target 'lce' is Keras 2 only (larq-compute-engine's converter and larq "
                         "run on tf_keras); from Keras 3 use target 'litert' (weights int8, int4, int2) or 'tflm'.")
    if not isinstance(model, tf.keras.Model):
        raise ValueError(f"to_tflite: expected a Keras model, got {type(model).__name__}.")
    if not model.built or not model.inputs:
        raise ValueError(f"to_tflite: model {model.name!r} is not built (it has no inputs yet); start it with "
                         "tf.keras.Input(shape) or call model.build((None, *input_shape)) / the model on data "
                         "once before exporting.")
    if isinstance(representative_samples, bool) or not isinstance(representative_samples, numbers.Integral) \
            or representative_samples < 1:
        raise ValueError(f"to_tflite: representative_samples={representative_samples!r}; expected a whole "
                         "number >= 1.")
    if representative_data is None:
        raise ValueError("to_tflite: representative_data is None; give a few hundred input examples (an array, "
                         "an (x, y) tuple or a tf.data.Dataset) to calibrate the int8 ranges.")
    _check_inputs(model, representative_data, "representative_data")
    if verify_data is not None:
        _check_inputs(model, verify_data, "verify_data")
        if verify_labels is not None and len(np.asarray(verify_labels)) != len(np.asarray(verify_data)):
            raise ValueError(f"to_tflite: verify_labels has {len(np.asarray(verify_labels))} entries for "
                             f"{len(np.asarray(verify_data))} verify_data examples.")
    if requantization == "auto":
        requantization = _AUTO_REQUANTIZATION.get(target, "single")
    return ExportOptions(target, weights, representative_data, int(representative_samples), verify_data,
                         verify_labels, bool(require_exact), requantization)


def _check_inputs(model, data, argument):
    """Shape and finiteness of array inputs against the model's input (datasets are read later)."""
    if isinstance(data, tf.data.Dataset):
        return
    x = data[0] if isinstance(data, (tuple, list)) else data
    try:
        x = np.asarray(x)
    except (ValueError, TypeError) as err:
        raise ValueError(f"to_tflite: {argument} is not an array of input examples: {err}") from None
    if x.dtype == object or x.ndim == 0:
        raise ValueError(f"to_tflite: {argument} is not an array of input examples (dtype {x.dtype}, "
                         f"shape {x.shape}).")
    check_example_shape(model, x, "to_tflite", argument)
    if x.size and x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ValueError(f"to_tflite: {argument} has {bad} NaN or infinite values of {x.size}; give finite inputs.")
