"""Target ``litert``: the full-integer int8 model (:mod:`syq_tf.export.int8`) for LiteRT, with the
low-bit weights stored int8 (default) or packed in a sub-byte TFLite type where the codebook fits:
``weights="int4"`` (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED) or ``weights="int2"``
(FULLY_CONNECTED; the other ops INT4 where they fit). A packed model is checked to compute
bit-identically to its int8 twin (the same integers stored as int8) with LiteRT's builtin kernels,
and verified against Keras on ``verify_data``."""

import numpy as np

from syq_tf.export import codebook, flatbuffer, int8
from syq_tf.export.match import kernel_matches
from syq_tf.export.runtime import agreement, keras_outputs, litert_int8_outputs, litert_predict

# The packed storage a weights= option asks for, narrowest first: each kernel takes the first that
# its op and codebook allow (int8 otherwise).
_PACKED = {"int4": ("int4",), "int2": ("int2", "int4")}


def export(model, options):
    """The ``target="litert"`` export (see :func:`syq_tf.export.to_tflite`)."""
    base = int8.build(model, options)
    buffer, twin, packed, skipped = base.buffer, base.buffer, {}, {}
    if options.weights in _PACKED:
        buffer, twin, packed, skipped = pack(model, base.buffer, [codebook.STORAGE[f] for f in _PACKED[options.weights]],
                                             base.lowered)
        _check_twin(buffer, twin, options)
    result = int8.result(model, buffer, options, base.rescaled, base.notes, packed, skipped)
    if options.verify_data is not None:
        x = np.asarray(options.verify_data)
        x = x.astype(np.float32) if x.dtype.kind == "f" else x
        kernels = "builtin" if options.requantization == "double" else "xnnpack"  # the runtime it was made for
        result.verification = agreement(keras_outputs(model, x), litert_predict(buffer, x, kernels=kernels),
                                        options.verify_labels)
        if packed:
            result.verification.update(_packed_verification(options.weights, buffer, twin, base.buffer, x))
    return result


def _why_not(tensor, form):
    """Why an int8 weight tensor cannot be stored in ``form`` (a string), or its update."""
    if not form.takes(tensor.op):
        return f"{tensor.op} takes no {form.tflite_type} weights in LiteRT"
    if tensor.dtype != "INT8":
        return f"stored as {tensor.dtype.lower()}, not int8"
    if not np.isfinite(tensor.input_scale):
        return f"float input (dynamic-range model): LiteRT's {form.tflite_type} filters need int8 inputs"
    if tensor.zero_points.size and np.any(tensor.zero_points != 0):
        return "non-zero weight zero points"
    return None


def pack(model, buffer, forms, lowered=frozenset()):
    """Rewrite the int8 weight tensors of quantized kernels in the first of ``forms`` (StorageForms,
    narrowest first) their op and codebook allow (:func:`syq_tf.export.codebook.narrowed`).
    ``lowered``: tensor indices of int32 biases lowered by one for two roundings
    (:func:`~syq_tf.export.flatbuffer.lower_biases_for_two_roundings`), kept one unit lower in the
    new scale.

    Returns (packed flatbuffer, its int8 twin -- the same integers and scales stored as int8, which
    LiteRT must compute bit-identically --, {label: StorageForm} rewritten, {label: note} for kernels
    stored wider than the first form)."""
    biases = flatbuffer.bias_tensors(buffer)
    updates, chosen, packed, notes = {}, {}, {}, {}
    for match in kernel_matches(model, buffer):
        tensor, label = match.tensor, match.label
        if match.quantizer is None or tensor is None:
            continue
        reasons = []
        for form in forms:
            update = _why_not(tensor, form) or codebook.narrowed(tensor, biases.get(tensor.bias_index), form,
                                                                 lowered=tensor.bias_index in lowered)
            if isinstance(update, str):
                reasons.append((form, update))
                continue
            updates[tensor.tensor_index], chosen[tensor.tensor_index], packed[label] = update, form, form
            break
        if label in packed and packed[label].name == "int2" and tensor.values.shape[-1] % 4:
            notes[label] = (f"INT2 rows of {tensor.values.shape[-1]} input features (not a multiple of 4): "
                            "XNNPACK leaves this FULLY_CONNECTED to LiteRT's builtin kernels (measured)")
        if reasons:
            tried = "/".join(f.tflite_type for f, _ in reasons)
            why = "; ".join(f"{f.tflite_type}: {r}" if len(reasons) > 1 else r for f, r in reasons)
            kept = f"stored {packed[label].tflite_type}" if label in packed else "kept int8 weights"
            notes[label] = f"{kept}, not {tried} ({why})"
    if not updates:
        return buffer, buffer, {}, notes
    return (flatbuffer.rewrite_weights(buffer, updates, packed=chosen),
            flatbuffer.rewrite_weights(buffer, updates), packed, notes)


def _check_twin(buffer, twin, options):
    """Refuse a packed model whose LiteRT builtin-kernel outputs differ from its int8 twin's."""
    if buffer is twin:
        return
    probe = int8.probe(buffer, options.representative_data)
    if not np.array_equal(litert_int8_outputs(buffer, probe, "builtin"), litert_int8_outputs(twin, probe, "builtin")):
        raise RuntimeError(f"to_tflite(weights={options.weights!r}): LiteRT's outputs of the packed model "
                           "differ from its int8 twin's (the same integer weights) on the representative data")


def _packed_verification(weights, buffer, twin, int8_buffer, x):
    """The packed model vs its int8 twin (builtin kernels and XNNPACK) and vs the int8 export."""
    xq = int8.model_input(buffer, x)
    out = {}
    for kernels in ("builtin", "xnnpack"):
        a = litert_int8_outputs(buffer, xq, kernels)
        out[f"{weights}_equals_int8_twin_{kernels}"] = bool(np.array_equal(a, litert_int8_outputs(twin, xq, kernels)))
        if kernels == "xnnpack":
            b = litert_int8_outputs(int8_buffer, xq, kernels)
            diff = np.abs(a.astype(np.int32) - b)
            out["max_int8_diff_vs_int8_export"] = int(diff.max())
            out["int8_outputs_differing_vs_int8_export"] = int(np.count_nonzero(diff))
            out["top1_agreement_vs_int8_export"] = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    return out
