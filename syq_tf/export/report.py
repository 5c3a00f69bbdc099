"""What an export stored, per kernel, against the least it could take, and the result object every
target returns (:class:`ExportResult`; targets with more to say subclass it)."""

import dataclasses
import json
import os

from syq_tf.export import codebook
from syq_tf.export.match import kernel_matches
from syq_tf.files import write_all

SCALE_BYTES = codebook.SCALE_BYTES


def describe(quantizer):
    if quantizer is None:
        return "float"
    cfg = quantizer.get_config() if hasattr(quantizer, "get_config") else {}
    parts = [type(quantizer).__name__ if hasattr(quantizer, "get_config") else getattr(quantizer, "__name__", "?")]
    for key in ("mode", "bits", "granularity"):
        if cfg.get(key) is not None:
            parts.append(f"{key}={cfg[key]}")
    return " ".join(parts)


@dataclasses.dataclass
class LayerReport:
    """What one kernel became in the flatbuffer, against the least it could take.

    ``bits`` is the codebook's ``ceil(log2(levels))`` (the quantizer's ``bits`` where it has one:
    SYQ, UniQ, LossAware, LeastSquares; else from ``keras_levels``; 8 for float kernels),
    ``scales`` the float scales the codebook needs (the quantizer's scale variables -- SYQ alpha,
    UniQ delta, LossAware alpha(s) -- else one per stored TFLite scale), and
    ``min_bytes = ceil(bits * weights / 8) + 4 * scales`` (float32 scales). ``stored_bytes`` is the
    tensor data as stored (``weight_bytes``; LUT indices and tables for target 'tflm') plus 4 bytes
    per float32 TFLite scale; zero points and flatbuffer metadata are not counted."""

    layer: str
    op: str
    quantizer: str
    keras_levels: int  # distinct kernel values per output channel in Keras (max over channels)
    stored_levels: int  # distinct int8 values per channel in the flatbuffer
    max_rel_alpha_error: float  # largest relative error of a stored codebook level
    exact: bool
    weight_bytes: int  # the weight tensor's data (int8: one byte a weight, INT4: two weights a byte)
    note: str = ""
    storage: str = ""  # stored tensor type: int8, int4 (packed), float32, lut (target 'tflm')
    bits: int = 0
    weights: int = 0
    scales: int = 0
    stored_bytes: int = 0
    min_bytes: int = 0
    channels: int = 0  # slices with a stored scale of their own (1 for a per-tensor scale), over its tensors
    exact_channels: int = 0  # of which hold their Keras codebook exactly


def low_bit_totals(reports):
    """Stored bytes vs the theoretical minimum, summed over the quantized (non-float) kernels."""
    low = [r for r in reports if r.quantizer != "float" and r.weights]
    stored = sum(r.stored_bytes for r in low)
    minimum = sum(r.min_bytes for r in low)
    return {"layers": len(low), "weights": sum(r.weights for r in low), "stored_bytes": stored,
            "min_bytes": minimum, "stored_over_min": (stored / minimum) if minimum else None}


def layer_reports(model, buffer, rescaled=(), packed=None):
    """One :class:`LayerReport` per kernel (the gates of a fused LSTM kernel are summed up), read
    back from ``buffer``; ``rescaled``: labels whose int8 codebook was re-expressed, ``packed``:
    ``{label: StorageForm}`` of kernels rewritten to a sub-byte type (for the notes)."""
    packed = packed or {}
    groups = {}
    for match in kernel_matches(model, buffer):
        groups.setdefault(match.label, []).append(match)
    reports = []
    for label, matches in groups.items():
        quantizer = matches[0].quantizer
        if any(m.tensor is None for m in matches):
            reports.append(LayerReport(label, "?", describe(quantizer), 0, 0, float("nan"), False, 0,
                                       "weight tensor not found in the flatbuffer"))
            continue
        err, zeros_ok, levels, keras_levels, nbytes, dtypes = 0.0, True, 0, 0, 0, set()
        weights, stored_scales, exact_channels, channels = 0, 0, 0, 0
        for m in matches:
            c = codebook.compare(*_check(m))
            err, zeros_ok = max(err, c.worst), zeros_ok and c.zeros_ok
            levels, keras_levels = max(levels, c.stored_levels), max(keras_levels, c.keras_levels)
            exact_channels, channels = exact_channels + c.exact_channels, channels + c.channels
            nbytes += int(m.tensor.stored_bytes or m.tensor.values.nbytes)
            weights += int(m.tensor.values.size)
            stored_scales += int(m.tensor.scales.size)
            dtypes.add(m.tensor.dtype)
        op = matches[0].tensor.op
        storage = "/".join(sorted(dtypes)).lower()
        stored = nbytes + SCALE_BYTES * stored_scales
        if quantizer is None:
            bits = 32 if dtypes == {"FLOAT32"} else 8
            reports.append(LayerReport(label, op, "float", keras_levels, levels, float("nan"), False, nbytes,
                                       f"float weights, stored as ordinary {storage}", storage, bits,
                                       weights, stored_scales, stored, stored))
            continue
        bits = codebook.codebook_bits(quantizer, keras_levels)
        scales = codebook.codebook_scales(quantizer, stored_scales)
        exact = codebook.is_exact(err, zeros_ok)
        note = ""
        tensor = matches[0].tensor
        if not exact and "FLOAT32" in dtypes:
            note = f"stored as float32 (the converter kept this op in float), up to {err:.2%} off the codebook"
        elif not exact:
            note = (f"int8 {'per-channel' if tensor.scales.size > 1 else 'per-tensor'} scales "
                    f"cannot hold this codebook exactly: stored levels off by up to {err:.2%}"
                    + ("" if zeros_ok else "; zero weights were not kept at zero")
                    + (f"; exact in {exact_channels} of {channels} channels" if 0 < exact_channels < channels else ""))
        elif label in packed:
            note = (f"codebook stored exactly as packed {packed[label].tflite_type} integer multiples of its "
                    "unit step (scales"
                    + (" and int32 bias" if tensor.bias_index >= 0 else "") + " re-expressed)")
        elif label in rescaled:
            note = ("codebook stored exactly as integer multiples of its unit step (int8 scales"
                    + (" and int32 bias" if tensor.bias_index >= 0 else "") + " re-expressed)")
        elif "FLOAT32" in dtypes and op == "CONV_3D":
            note = ("stored as float32, so exact: LiteRT has no int8 CONV_3D, the converter keeps the op in "
                    "float between DEQUANTIZE and QUANTIZE")
        elif "FLOAT32" in dtypes:
            note = "stored as float32 (the converter keeps small tensors in float), so exact"
        reports.append(LayerReport(label, op, describe(quantizer), keras_levels, levels, err, exact,
                                   nbytes, note, storage, bits, weights, scales, stored,
                                   codebook.minimum_bytes(bits, weights, scales), channels, exact_channels))
    return reports


def _check(match):
    """:func:`codebook.compare`'s arguments for one stored tensor: the Keras kernel, the stored values
    (a lookup table's dequantized: the weights themselves, no factor folded in), the axis."""
    table = match.tensor.op == "GATHER"
    stored = codebook.dequantized(match.tensor) if table else match.tensor.values
    return match.expected(), stored, codebook.quantization_axis(match.tensor), table


@dataclasses.dataclass
class ExportResult:
    flatbuffer: bytes
    target: str
    layers: list
    notes: list
    verification: dict = None
    weights: str = "int8"  # storage of the low-bit weights: 'int8', 'int4' / 'int2' (target 'litert'), 'float32' ('lce')
    # the rounding the int32 biases were set for: 'single' or 'double' (targets 'litert', 'tflm'); None for 'lce'
    requantization: str = None

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
            "requantization": self.requantization,
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
        """Write ``path`` (.tflite), the report next to it (``path`` + ``.json``) and whatever else
        the target writes (:meth:`files`). Everything is generated before anything is written, and
        each file goes to a temporary name first and is renamed: a failure never leaves a partial
        file."""
        path = os.fspath(path)
        files = self.files(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_all(files)
        return path

    def files(self, path):
        """[(path, bytes)] that :meth:`save` writes."""
        return [(path, bytes(self.flatbuffer)), (path + ".json", json.dumps(self.to_dict(), indent=2).encode())]

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


