"""Export trained syq_tf / larq models to TFLite.

``to_tflite(model, representative_data=..., target="litert")`` returns an :class:`ExportResult`:
the flatbuffer, a per-layer report of what was stored (codebook levels, exactness, bytes) and,
when ``verify_data`` is given, LiteRT-vs-Keras agreement.
"""

import dataclasses
import json
import os

import numpy as np

from syq_tf.export import flatbuffer
from syq_tf.files import write_all
from syq_tf.export.litert import (
    LayerReport,
    activation_notes,
    build_inference_model,
    convert,
    convert_dynamic,
    exact_codebooks,
    int4_weights,
    layer_reports,
    low_bit_totals,
    recurrent_layers,
)
from syq_tf.export.runtime import agreement, litert_int8_outputs, litert_predict

TARGETS = ("litert", "tflm", "lce")
# weights= options of to_tflite -> the one target that takes it (None: every target)
WEIGHTS = {"int8": None, "int4": "litert", "float32": "lce"}
_WEIGHTS_WHY = {"int4": "LiteRT's INT4 filters; tflm and lce store low-bit weights in their own packed form.",
                "float32": "float kernels for the layers LCE cannot pack; litert and tflm are full-integer int8."}


@dataclasses.dataclass
class ExportResult:
    flatbuffer: bytes
    target: str
    layers: list
    notes: list
    verification: dict = None
    weights: str = "int8"  # storage of the low-bit weights: 'int8', 'int4' (target 'litert'), 'float32' ('lce')

    def __bytes__(self):
        return bytes(self.flatbuffer)

    @property
    def model_bytes(self):
        return len(self.flatbuffer)

    def to_dict(self):
        return {
            "target": self.target,
            "model_bytes": self.model_bytes,
            "weights": self.weights,
            "low_bit_weights": self.low_bit_totals(),
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "notes": list(self.notes),
            "verification": self.verification,
        }

    def low_bit_totals(self):
        """Stored bytes of the quantized kernels vs their theoretical minimum (sum over layers of
        ``ceil(bits x weights / 8) + 4 x scales``, see :class:`LayerReport`)."""
        return low_bit_totals(self.layers)

    def save(self, path):
        """Write ``path`` (.tflite) and the report next to it (``path`` + ``.json``); each file is
        written to a temporary name first and renamed, so a failure never leaves a partial file."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_all([(path, bytes(self.flatbuffer)), (path + ".json", json.dumps(self.to_dict(), indent=2).encode())])
        return path

    def table(self):
        wl = max([18] + [len(r.layer) + 2 for r in self.layers])
        wo = max([20] + [len(r.op) + 2 for r in self.layers])
        wq = max([44] + [len(r.quantizer) + 2 for r in self.layers])
        head = (f"{'layer':<{wl}}{'op':<{wo}}{'quantizer':<{wq}}{'stored':>8}{'levels':>7}{'bits':>5}"
                f"{'exact':>7}{'max alpha err':>15}{'weights':>9}{'scales':>7}{'bytes':>8}{'stored B':>10}"
                f"{'min B':>9}{'ratio':>7}")
        rows = [head, "-" * len(head)]
        for r in self.layers:
            is_float = r.quantizer == "float"
            exact = "-" if is_float else ("yes" if r.exact else "NO")
            err = "-" if is_float else f"{r.max_rel_alpha_error:.2e}"
            ratio = "-" if is_float or not r.min_bytes else f"{r.stored_bytes / r.min_bytes:.2f}"
            rows.append(
                f"{r.layer:<{wl}}{r.op:<{wo}}{r.quantizer:<{wq}}{r.storage or '?':>8}{r.stored_levels:>7}"
                f"{r.bits:>5}{exact:>7}{err:>15}{r.weights:>9}{r.scales:>7}{r.weight_bytes:>8}"
                f"{r.stored_bytes:>10}{('-' if is_float else r.min_bytes):>9}{ratio:>7}"
            )
        low = self.low_bit_totals()
        if low["layers"]:
            rows.append(f"low-bit weights ({low['layers']} layers, {low['weights']} weights): stored "
                        f"{low['stored_bytes']} bytes vs theoretical minimum {low['min_bytes']} "
                        f"(ceil(bits x weights / 8) + 4 bytes per float32 scale): x{low['stored_over_min']:.2f}")
        rows.append(f"model: {self.model_bytes} bytes ({self.target}, {self.weights} weights)")
        rows.extend(f"note: {n}" for n in self.notes)
        if self.verification:
            rows.append("verification: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in self.verification.items()))
        return "\n".join(rows)

    def __str__(self):
        return self.table()


def to_tflite(model, representative_data, target="litert", verify_data=None, verify_labels=None,
              representative_samples=200, require_exact=False, weights="int8"):
    """Export ``model`` as a full-integer int8 TFLite model.

    Models with LSTM layers are exported with int8 weights and float activations instead (dynamic
    range: TFLite's full-integer fused LSTM gives wrong outputs on this stack), batch size 1, the LSTM
    as one fused op whose eight gate weight tensors are checked against the Keras codebooks like any
    other kernel. GRU / SimpleRNN layers are refused with the reason.

    representative_data: input examples (array, (x, y) tuple or tf.data.Dataset) used to
        calibrate the ranges of tensors that have no quantizer of their own (unused for recurrent
        models, whose activations stay float).
    verify_data / verify_labels: optional inputs (and labels) on which LiteRT is run and compared
        with Keras; the result lands in ``ExportResult.verification``.
    require_exact: raise instead of exporting when some quantized layer's codebook cannot be
        stored exactly (it is always reported in ``ExportResult.layers`` and ``notes``).
    weights: ``"int8"`` (default) or ``"int4"`` (target ``litert`` only): the int8 weights of
        quantized CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED layers whose codebook is integer
        multiples k of one step with |k| <= 7 per channel (binary, ternary, UniQ 2-3 bit, LAB,
        LAT, LAQ with at most 7 positive steps, ...) are stored as packed TFLite INT4 (values k*m,
        scale re-expressed: still exact), at half the bytes; the rest stays int8 (``notes`` say
        why; UniQ 4 bit needs odd multiples up to 15). Not the default because the re-expressed
        int32 bias and requantization multipliers differ from the int8 export's by rounding:
        outputs may differ from the int8 model's by a few int8 steps on some values. The
        INT4 model itself is checked to compute bit-identically to its int8 twin (the same integers
        stored as int8) with LiteRT's builtin kernels. XNNPACK (LiteRT's default CPU delegate)
        runs INT4 FULLY_CONNECTED only; INT4 convolutions run with the builtin kernels.
        Target ``lce``: ``"int8"`` (default) stores the weights of quantized layers LCE cannot
        bit-pack as int8 (exact where the codebook has an integer form per channel) dequantized to
        float at load, ``"float32"`` keeps them float32 (see :mod:`syq_tf.export.lce`).

    Codebooks that are integer multiples of a unit step per channel (UniQ up to 7 bits, binary and
    ternary ones) are stored exactly: where the converter's scale max|w|/127 misses their levels,
    the int8 weights are re-expressed as k*m with a matching scale.
    """
    if target not in TARGETS:
        raise ValueError(f"to_tflite: unknown target {target!r}; available here: {TARGETS}.")
    if weights not in WEIGHTS:
        raise ValueError(f"to_tflite: weights={weights!r}; allowed: 'int8' (default), 'int4' (target "
                         "'litert') or 'float32' (target 'lce').")
    only = WEIGHTS[weights]
    if only is not None and target != only:
        raise ValueError(f"to_tflite: weights={weights!r} is for target {only!r} (got target={target!r}): "
                         + _WEIGHTS_WHY[weights])
    from syq_tf import tfmot as _tfmot  # noqa: PLC0415

    if target == "lce":  # bit-packed LceBconv2d for binary layers, LCE's interpreter (lce.py)
        from syq_tf.export import lce as _lce  # noqa: PLC0415

        return _lce.export(model, representative_data, verify_data, verify_labels, require_exact,
                           weights=weights)
    if target == "tflm":  # the same int8 model, then LUT-compressed for TFLite Micro (tflm.py)
        from syq_tf.export import tflm as _tflm  # noqa: PLC0415

        _tflm.check_model(model)

    if any(_tfmot.is_wrapper(layer) for layer in model.layers):
        # tfmot QAT model: its fake-quant ranges are kept; syq_tf kernels become their quantized
        # constants with their int8 range, syq_tf activation quantizers int8 grids (export_form).
        with _tfmot.quantize_scope():
            buffer = convert(_tfmot.export_form(model), representative_data, representative_samples)
    elif recurrent_layers(model):
        buffer = convert_dynamic(build_inference_model(model, batch_size=1))
    else:
        buffer = convert(build_inference_model(model), representative_data, representative_samples)
    buffer, bias_fixed = flatbuffer.consistent_biases(buffer)
    buffer, rescaled = exact_codebooks(model, buffer)
    int8_buffer, int4_twin, int4_labels, int4_skipped = buffer, None, [], {}
    if weights == "int4":
        buffer, int4_twin, int4_labels, int4_skipped = int4_weights(model, buffer)
        _check_int4(buffer, int4_twin, representative_data)
    reports = layer_reports(model, buffer, rescaled, int4_labels)
    inexact = [r for r in reports if r.quantizer != "float" and not r.exact]
    if require_exact and inexact:
        raise ValueError(
            f"to_tflite(target={target!r}, require_exact=True): these layers' codebooks cannot be "
            "stored exactly in int8: "
            + "; ".join(f"'{r.layer}' ({r.quantizer}): {r.note}" for r in inexact)
        )
    notes = activation_notes(model)
    notes += [f"bias {name!r}: the converter stored it at {factor:.4g}x the scale its op computes with "
              "(input x weight scale); re-expressed" for name, factor in bias_fixed]
    notes += [f"layer '{r.layer}': {r.note}" for r in reports
              if r.note and r.quantizer != "float" and not r.exact]
    notes += [f"layer '{label}': kept int8 weights, not INT4 ({why})" for label, why in int4_skipped.items()]
    result = ExportResult(buffer, target, reports, notes, weights=weights)
    if target == "tflm":
        return _tflm.finish(model, result, representative_data, verify_data, verify_labels)
    if verify_data is not None:
        x = np.asarray(verify_data)
        x = x.astype(np.float32) if x.dtype.kind == "f" else x
        keras_out = model.predict(x, batch_size=256, verbose=0)
        result.verification = agreement(keras_out, litert_predict(buffer, x), verify_labels)
        if int4_labels:
            result.verification.update(_int4_verification(buffer, int4_twin, int8_buffer, x))
    return result


def _int4_probe(buffer, x):
    from syq_tf.export.tflm import _quantize_input, input_quantization  # noqa: PLC0415

    return _quantize_input(x, *input_quantization(buffer))


def _check_int4(buffer, twin, representative_data):
    """Refuse an INT4 model whose LiteRT builtin-kernel outputs differ from its int8 twin's."""
    from syq_tf.export.litert import _samples  # noqa: PLC0415

    if buffer is twin:
        return
    probe = _int4_probe(buffer, np.concatenate(_samples(representative_data, 8)))
    a = litert_int8_outputs(buffer, probe, "builtin")
    b = litert_int8_outputs(twin, probe, "builtin")
    if not np.array_equal(a, b):
        raise RuntimeError("to_tflite(weights='int4'): LiteRT's outputs of the INT4 model differ from its "
                           "int8 twin's (the same integer weights) on the representative data")


def _int4_verification(buffer, twin, int8_buffer, x):
    """INT4 model vs its int8 twin (builtin kernels and XNNPACK) and vs the int8 export."""
    xq = _int4_probe(buffer, x)
    out = {}
    for kernels in ("builtin", "xnnpack"):
        a = litert_int8_outputs(buffer, xq, kernels)
        out[f"int4_equals_int8_twin_{kernels}"] = bool(np.array_equal(a, litert_int8_outputs(twin, xq, kernels)))
        if kernels == "xnnpack":
            b = litert_int8_outputs(int8_buffer, xq, kernels)
            diff = np.abs(a.astype(np.int32) - b)
            out["max_int8_diff_vs_int8_export"] = int(diff.max())
            out["int8_outputs_differing_vs_int8_export"] = int(np.count_nonzero(diff))
            out["top1_agreement_vs_int8_export"] = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    return out


__all__ = ["to_tflite", "ExportResult", "LayerReport", "build_inference_model", "litert_predict",
           "flatbuffer", "TARGETS", "WEIGHTS"]
