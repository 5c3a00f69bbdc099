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
from syq_tf.export.litert import (
    LayerReport,
    activation_notes,
    build_inference_model,
    convert,
    convert_dynamic,
    exact_codebooks,
    layer_reports,
    recurrent_layers,
)
from syq_tf.export.runtime import agreement, litert_predict

TARGETS = ("litert", "tflm")


@dataclasses.dataclass
class ExportResult:
    flatbuffer: bytes
    target: str
    layers: list
    notes: list
    verification: dict = None

    def __bytes__(self):
        return bytes(self.flatbuffer)

    @property
    def model_bytes(self):
        return len(self.flatbuffer)

    def to_dict(self):
        return {
            "target": self.target,
            "model_bytes": self.model_bytes,
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "notes": list(self.notes),
            "verification": self.verification,
        }

    def save(self, path):
        """Write ``path`` (.tflite) and the report next to it (``path`` + ``.json``); each file is
        written to a temporary name first and renamed, so a failure never leaves a partial file."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _write_atomic(path, bytes(self.flatbuffer))
        _write_atomic(path + ".json", json.dumps(self.to_dict(), indent=2).encode())
        return path

    def table(self):
        wl = max([18] + [len(r.layer) + 2 for r in self.layers])
        wo = max([20] + [len(r.op) + 2 for r in self.layers])
        wq = max([44] + [len(r.quantizer) + 2 for r in self.layers])
        head = f"{'layer':<{wl}}{'op':<{wo}}{'quantizer':<{wq}}{'levels':>7}{'exact':>7}{'max alpha err':>15}{'bytes':>8}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            is_float = r.quantizer == "float"
            exact = "-" if is_float else ("yes" if r.exact else "NO")
            err = "-" if is_float else f"{r.max_rel_alpha_error:.2e}"
            rows.append(
                f"{r.layer:<{wl}}{r.op:<{wo}}{r.quantizer:<{wq}}{r.stored_levels:>7}{exact:>7}"
                f"{err:>15}{r.weight_bytes:>8}"
            )
        rows.append(f"model: {self.model_bytes} bytes ({self.target})")
        rows.extend(f"note: {n}" for n in self.notes)
        if self.verification:
            rows.append("verification: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in self.verification.items()))
        return "\n".join(rows)

    def __str__(self):
        return self.table()


def _write_atomic(path, data):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_tflite(model, representative_data, target="litert", verify_data=None, verify_labels=None,
              representative_samples=200, require_exact=False):
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

    Codebooks that are integer multiples of a unit step per channel (UniQ up to 7 bits, binary and
    ternary ones) are stored exactly: where the converter's scale max|w|/127 misses their levels,
    the int8 weights are re-expressed as k*m with a matching scale.
    """
    if target not in TARGETS:
        raise ValueError(f"to_tflite: unknown target {target!r}; available here: {TARGETS}.")
    from syq_tf import tfmot as _tfmot  # noqa: PLC0415

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
    buffer, rescaled = exact_codebooks(model, buffer)
    reports = layer_reports(model, buffer, rescaled)
    inexact = [r for r in reports if r.quantizer != "float" and not r.exact]
    if require_exact and inexact:
        raise ValueError(
            f"to_tflite(target={target!r}, require_exact=True): these layers' codebooks cannot be "
            "stored exactly in int8: "
            + "; ".join(f"'{r.layer}' ({r.quantizer}): {r.note}" for r in inexact)
        )
    notes = activation_notes(model)
    notes += [f"layer '{r.layer}': {r.note}" for r in reports
              if r.note and r.quantizer != "float" and not r.exact]
    result = ExportResult(buffer, target, reports, notes)
    if target == "tflm":
        return _tflm.finish(model, result, representative_data, verify_data, verify_labels)
    if verify_data is not None:
        x = np.asarray(verify_data)
        x = x.astype(np.float32) if x.dtype.kind == "f" else x
        keras_out = model.predict(x, batch_size=256, verbose=0)
        result.verification = agreement(keras_out, litert_predict(buffer, x), verify_labels)
    return result


__all__ = ["to_tflite", "ExportResult", "LayerReport", "build_inference_model", "litert_predict",
           "flatbuffer", "TARGETS"]
