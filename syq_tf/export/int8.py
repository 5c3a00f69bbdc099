"""The full-integer int8 model the int8 targets (``litert``, ``tflm``) start from: inference form ->
TFLite conversion -> biases made consistent -> codebooks re-expressed exactly where int8 can hold
them. Then the report of what was stored (:func:`result`)."""

import contextlib
import dataclasses

import numpy as np
import tensorflow as tf

from syq_tf.export import codebook, convert, flatbuffer, inference
from syq_tf.export.match import kernel_matches
from syq_tf.export.report import ExportResult, layer_reports
from syq_tf.export.runtime import quantize_input
from syq_tf.models import is_tfmot_model
from syq_tf.quantizers import ActivationQuantizer
from syq_tf.quantizers._common import KERAS, fine_grid_scales


@dataclasses.dataclass
class Int8Model:
    buffer: bytes
    rescaled: list  # labels of kernels whose int8 codebook was re-expressed
    notes: list
    lowered: frozenset = frozenset()  # tensor indices of the int32 biases lowered for two roundings


def build(model, options):
    """Convert ``model`` (syq_tf / larq layers, or a tfmot QAT model) to the int8 flatbuffer with
    exact codebooks. Models with LSTM layers get int8 weights and float activations (dynamic range:
    TFLite's full-integer fused LSTM gives wrong outputs on this stack), batch size 1."""
    # TFLite Micro runs one example with static shapes: the model is converted at batch 1. With a
    # free batch dimension the converter computes shapes at run time where an op takes one as a
    # tensor -- TRANSPOSE_CONV's output shape (SHAPE, STRIDED_SLICE, PACK: placeholder shapes, wrong
    # outputs in TFLM), the RESHAPE around a Keras 3 Dense on a sequence (SHAPE, GATHER, REDUCE_PROD,
    # which TFLM has no kernel for: "failed to allocate tensors"); at batch 1 they are constants.
    # A kernel on a sequence (Dense on rank > 2, EinsumDense, attention) at a free batch loses its fused
    # bias (convert.sequence_kernel_layers): such models are converted at batch 1 for every target.
    sequence = convert.sequence_kernel_layers(model)
    batch = 1 if options.target == "tflm" or sequence else None
    recurrent = not is_tfmot_model(model) and convert.recurrent_layers(model)
    if recurrent:
        buffer = convert.dynamic_range(inference.build(model, batch_size=1))
    else:
        buffer = full_integer(model, batch, options)
    buffer, bias_fixed = flatbuffer.consistent_biases(buffer)
    buffer, rescaled = exact_codebooks(model, buffer)
    lowered = []
    if options.requantization == "double":  # for runtimes that round twice (TFLite Micro, LiteRT's builtin kernels)
        buffer, lowered = flatbuffer.lower_biases_for_two_roundings(buffer)
    notes = activation_notes(model)
    if KERAS == 3:
        notes += [f"layer '{layer.name}': TensorFlow's converter fuses only tf_keras' LSTM into TFLite's "
                  "UNIDIRECTIONAL_SEQUENCE_LSTM; this Keras 3 recurrent layer becomes a WHILE loop with float "
                  "weights (it runs, but its kernels are not stored at low bit: use the Keras 2 frontend to "
                  "deploy recurrent models)" for layer in model.layers if isinstance(layer, tf.keras.layers.RNN)]
    if sequence and options.target != "tflm" and not recurrent:
        notes.append(f"converted at batch size 1 (the model takes one example per invoke): layers {sequence} "
                     "multiply kernels along a sequence, whose bias TensorFlow's converter cannot fuse at a free "
                     "batch size (an int8 ADD of an int8 bias after a rounded FULLY_CONNECTED)")
    notes += [f"bias {name!r}: the converter stored it at {factor:.4g}x the scale its op computes with "
              "(input x weight scale); re-expressed" for name, factor in bias_fixed]
    if lowered:
        notes.append(f"{len(lowered)} int32 biases lowered by one for two roundings per requantization "
                     "(requantization='double', flatbuffer.lower_biases_for_two_roundings: such a runtime then "
                     "departs from one rounding only within M - 1/2 accumulator units above a boundary, not 1/2 "
                     "below it)" + ("; verified with LiteRT's builtin kernels" if options.target == "litert" else ""))
    return Int8Model(buffer, rescaled, notes, frozenset(lowered))


def full_integer(model, batch, options):
    """The converter's full-integer flatbuffer of ``model``'s inference form. 1-, 2- and 4-bit activation
    grids are converted in their fine form (:func:`~syq_tf.quantizers._common.fine_grid_scales`: the ops
    reading them get their int32 bias on a grid 17, 85 or 255 times finer than at the grid's step) and
    their rounding restored (:func:`~syq_tf.export.flatbuffer.round_to_grids`); where the converter
    refuses that form or some grid cannot be restored so (one read by two quantizers, one behind a layer
    that keeps its input's scale), the model is converted again in the usual form."""
    def convert_form():
        return convert.int8(inference.build(model, batch_size=batch), options.representative_data,
                            options.representative_samples)

    with contextlib.ExitStack() as scope:
        if is_tfmot_model(model):
            # tfmot QAT model: its fake-quant ranges are kept; syq_tf kernels become their quantized
            # constants with their int8 range, syq_tf activation quantizers int8 grids.
            from syq_tf.tfmot import quantize_scope  # noqa: PLC0415  (Keras 2 only)

            scope.enter_context(quantize_scope())
        try:
            with fine_grid_scales() as grids:
                buffer = convert_form()
        except Exception:  # noqa: BLE001  (the converter refused the fine form: the usual one decides)
            return convert_form()
        if not grids:
            return buffer
        buffer, rounded = flatbuffer.round_to_grids(buffer, grids)
        return convert_form() if rounded is None else buffer


def exact_codebooks(model, buffer):
    """Rewrite the int8 weights of quantized layers whose codebook the converter's scale rounded, in
    every channel where an exact integer form exists (:func:`syq_tf.export.codebook.exact_int8`; the
    other channels keep the converter's rounding). Returns the new flatbuffer and the rewritten
    kernel labels."""
    updates, names = {}, []
    biases = flatbuffer.bias_tensors(buffer)
    for match in kernel_matches(model, buffer):
        tensor = match.tensor
        if match.quantizer is None or tensor is None or tensor.dtype != "INT8":
            continue
        expected = match.expected()
        if codebook.compare(expected, tensor.values, codebook.quantization_axis(tensor)).exact:
            continue
        update = codebook.exact_int8(expected, tensor, biases.get(tensor.bias_index))
        if update is not None:
            updates[tensor.tensor_index] = update
            names.append(match.label)
    if not updates:
        return buffer, []
    return flatbuffer.rewrite_weights(buffer, updates), names


def activation_notes(model):
    notes = []
    for layer in model.layers:
        quantizer = getattr(layer, "input_quantizer", None)
        if isinstance(quantizer, ActivationQuantizer) and not quantizer.exact_in_int8():
            low, high = quantizer.export_range()
            notes.append(
                f"layer '{layer.name}': {type(quantizer).__name__} levels are not a fixed uniform grid, "
                f"which int8 TFLite cannot compute; its input is stored as int8 on [{low:g}, {high:g}] "
                "without the quantizer's levels."
            )
    return notes


def result(model, buffer, options, rescaled=(), notes=(), packed=None, skipped=None):
    """The :class:`ExportResult` of an int8 (or partly sub-byte) flatbuffer, read back and checked
    against the Keras codebooks; raises with ``require_exact`` when one is not stored exactly.
    ``packed``: ``{label: StorageForm}`` of sub-byte kernels, ``skipped``: ``{label: why}`` of
    kernels kept int8 although a narrower storage was asked for."""
    reports = layer_reports(model, buffer, rescaled, packed)
    inexact = [r for r in reports if r.quantizer != "float" and not r.exact]
    if options.require_exact and inexact:
        raise ValueError(
            f"to_tflite(target={options.target!r}, require_exact=True): these layers' codebooks cannot be "
            "stored exactly in int8: "
            + "; ".join(f"'{r.layer}' ({r.quantizer}): {r.note}" for r in inexact)
        )
    notes = list(notes)
    notes += [f"layer '{r.layer}': {r.note}" for r in reports if r.note and r.quantizer != "float" and not r.exact]
    notes += [f"layer '{label}': {why}" for label, why in (skipped or {}).items()]
    return ExportResult(buffer, options.target, reports, notes, weights=options.weights,
                        requantization=options.requantization)


def input_quantization(buffer):
    """(scale, zero point) of the model's int8 input."""
    return flatbuffer.io_quantization(buffer, "input")


def output_quantization(buffer):
    """(scale, zero point) of the model's int8 output."""
    return flatbuffer.io_quantization(buffer, "output")


def model_input(buffer, x):
    """Examples as the model takes them: quantized for an int8 input, else (integer inputs such as
    token ids, which the converter keeps) cast to the input's type."""
    kind = flatbuffer.io_type(buffer, "input")
    if kind == "INT8":
        return quantize_input(x, *input_quantization(buffer))
    return np.asarray(x).astype(flatbuffer.NUMPY_TYPES.get(kind, np.float32))


def probe(buffer, data, count=8):
    """Up to ``count`` examples of ``data`` as the model takes them (:func:`model_input`)."""
    return model_input(buffer, np.concatenate(convert.samples(data, count)))
