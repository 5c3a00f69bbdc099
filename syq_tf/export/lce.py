"""larq-compute-engine export (``to_tflite(..., target="lce")``): binary layers as bit-packed
``LceBconv2d`` ops, run and verified with LCE's own interpreter.

A Conv2D -- or a Dense on a flat ``[batch, features]`` input, exported as a 1x1 conv on
``[batch, 1, 1, features]`` (LCE has no binary fully-connected op) -- whose quantized kernel is
``±alpha_c`` per output channel (SYQ ``bits=1`` with granularity ``layer`` / ``channel``, UniQ
``bits=1``, least-squares ``ls1``, loss-aware ``binary``, larq ``ste_sign`` ...) and whose input
quantizer has two levels becomes an
``LceBconv2d``: the filter's signs bit-packed 32 input channels per int32 word (bit ``i`` of word
``w`` is input channel ``32 w + i``, set for -1, the last word zero-padded), ``alpha_c`` folded into
the op's per-output-channel float multiplier.

The export first builds an inference model in the form LCE's converter recognises: the input
quantizer becomes ``tf.where(. >= 0, 1., -1.)`` (LceQuantize), the kernel a ``±scale`` constant of
a plain Conv2D. Results are exact, not just close:

* sign inputs ``±b`` (larq ste_sign / approx_sign / swish_sign: ``b = 1``; ``LeastSquaresActivation
  ("ls1")`` with trained moving scalars: ``b = v``) -- ``b`` goes into the multiplier; Keras pads
  the quantized input with zeros, which is LCE's ``pad_values=0`` (``pad_values=1`` for larq layers
  built with ``pad_values=1``).
* per-sample sign inputs ``v_n sign(x)`` (``LeastSquaresActivation("ls1")`` without moving
  scalars, ``v_n`` the per-sample mean |clip(x)|): a per-sample scale cannot be folded into a
  per-channel multiplier, so the LceBconv2d output is multiplied by ``v_n``, computed in float by
  the same ops (then the bias is added).
* ``{0, h}`` inputs (``DoReFa(1)``: h = 1, ``UniQActivation(1)``: h = delta, larq
  ``ste_heaviside``): with ``t = +1`` where the input quantizes to 0 and ``-1`` where to ``h``,
  ``q = h (1 - t) / 2`` and, because the zero padding of ``q`` is ``t = +1`` (LCE's
  ``pad_values=1``), ``conv(q, W) = h/2 sum(W_c) + conv_pad1(t, -h/2 W)``: a Bconv2d with the
  negated kernel and a per-channel bias.

A tfmot model (``quantize_model``) is first turned into syq_tf quantized layers computing the same
(:mod:`syq_tf.export.tfmot_layers`): its binary schemes (``syq-w1a1``, ``lab-w1a1`` ...) then pack
like hand-built binary layers, its 8-bit first / last layers keep tfmot's int8 weights and its 8-bit
activation ranges become FakeQuants the converter turns into int8 QUANTIZE / DEQUANTIZE.

Quantized layers LCE cannot pack (pixel / row scales, ternary or multi-bit kernels, Dense on
rank > 2 inputs, depthwise, non-binary or float inputs) are reported with the reason and, with ``weights="int8"``
(the default), their weights are stored as int8 -- symmetric, one scale per output channel -- and
turned into the float weight by a DEQUANTIZE op that TFLite runs once when the interpreter is
prepared; the op itself computes in float. A codebook whose levels are integer multiples k of one
step per channel (binary, ternary, UniQ, 2-bit least squares, LAQ ...) is stored as k*m with scale
step/m, m = 127 // max|k|: exact. Other codebooks (SYQ ``pixel`` / ``row`` scales: up to one
magnitude per kernel pixel in a channel) are rounded to the nearest of 255 levels and reported
inexact, with a warning naming the layer (``require_exact=True`` raises; ``weights="float32"``
keeps them float32, which holds every codebook exactly). Activations stay float: LCE's converter
has no post-training int8 calibration (it only quantizes graphs that carry FakeQuant ranges on
every tensor), and int8-rounded inputs to a binary layer flip signs near zero, which compounds
through a binary network. Layers without a quantizer stay float32. Stock LiteRT cannot run the
LceQuantize / LceBconv2d custom ops; LCE's interpreter
(``larq_compute_engine.testing.Interpreter``) can.
"""

import dataclasses
import math
import warnings

import numpy as np
import tensorflow as tf

from syq_tf.export import codebook, convert, flatbuffer, inference
from syq_tf.export.lce_format import BCONV_OP, WORD_BITS, bconv_ops, import_lce, lce_predict, pack_signs, unpack_signs
from syq_tf.export.lce_plan import inference_model, plan_layers
from syq_tf.export.match import match_tensor
from syq_tf.export.report import ExportResult, describe
from syq_tf.export.runtime import agreement, keras_outputs
from syq_tf.export.tfmot_layers import as_quantized_layers
from syq_tf.models import is_tfmot_model, layer_kernels

_FLOAT_BYTES = codebook.SCALE_BYTES


@dataclasses.dataclass
class LceLayerReport:
    layer: str
    op: str  # LceBconv2d, or the float op it became
    quantizer: str  # kernel quantizer ("float" for float kernels)
    input_quantizer: str
    packed: bool
    bits: int  # the codebook's bits (the quantizer's ``bits``, else ceil(log2(levels)); 32 for float)
    keras_levels: int  # distinct kernel values per output channel in Keras (max over channels)
    stored_levels: int  # distinct stored values per output channel
    max_rel_alpha_error: float  # packed: multiplier vs alpha (x folded BatchNorm); float: stored vs Keras
    exact: bool
    weights: int
    weight_bytes: int  # packed filter words (packed) / float32 kernel (not packed), as stored
    scale_bytes: int  # LceBconv2d float multiplier (0 for float layers)
    bias_bytes: int  # LceBconv2d float bias (holds the layer's bias and any folded BatchNorm shift)
    stored_bytes: int  # weight_bytes + scale_bytes
    min_bytes: int  # ceil(bits x weights / 8) + 4 x scales (float32 scales)
    pad_values: int = -1
    note: str = ""
    storage: str = ""  # "packed 1-bit (LceBconv2d int32 words)", "int8" (DEQUANTIZE) or "float32"
    scales: int = 0  # float scales the codebook needs (quantizer variables, else distinct magnitudes)
    tensor_index: int = -1  # the stored weight tensor (not packed layers) in the flatbuffer


def _kernel_levels(kernel):
    """Distinct values per slice along the last axis (max over slices)."""
    k = np.asarray(kernel)
    return int(np.max(codebook.channel_levels(k.reshape(-1, k.shape[-1]).T)))


def _bn_scale_after(model, layer):
    """Per-channel scale of a BatchNormalization right after ``layer`` (the converter folds it into
    the LceBconv2d multiplier), or None."""
    nodes = getattr(layer, "_outbound_nodes", [])
    if len(nodes) != 1:
        return None
    nxt = nodes[0].outbound_layer
    if not isinstance(nxt, tf.keras.layers.BatchNormalization):
        return None
    gamma = nxt.gamma.numpy() if nxt.scale else 1.0
    return np.asarray(gamma / np.sqrt(nxt.moving_variance.numpy() + nxt.epsilon), np.float64)


def _packed_report(model, plan, bconv):
    layer = plan.layer
    quantizer = layer_kernels(layer)["kernel"][0]
    kh, kw, c_in, c_out = plan.signs.shape
    n = int(plan.signs.size)
    note, exact, err = [], True, float("nan")
    words = bconv.filter
    expected_words = pack_signs(plan.signs * (-1.0 if plan.form.kind == "step" else 1.0))
    if words is None or words.shape != expected_words.shape:
        exact = False
        note.append(f"packed filter of shape {None if words is None else words.shape}, expected "
                    f"{expected_words.shape}")
    else:
        try:
            signs = unpack_signs(words, c_in)
        except ValueError as err_:
            signs, exact = None, False
            note.append(str(err_))
        flip = -1.0 if plan.form.kind == "step" else 1.0
        if signs is not None and not np.array_equal(signs * flip, plan.signs):
            exact = False
            note.append("packed signs differ from the Keras kernel's signs")
    if bconv.options.get("channels_in") != c_in:
        exact = False
        note.append(f"channels_in {bconv.options.get('channels_in')} != {c_in}")
    form = plan.form
    expected = plan.alpha.astype(np.float64) * abs(form.filter_coefficient)
    mult = None if bconv.multiplier is None else bconv.multiplier.astype(np.float64).ravel()
    if mult is None and bconv.thresholds is not None and bconv.thresholds.size == c_out:
        note.append("binary output: the next layer's sign is fused into the op, so alpha and the ops "
                    "in between are folded into int32 per-channel output thresholds (checked: signs)")
    elif mult is None or mult.size != c_out:
        exact = False
        note.append("multiplier not found")
    else:
        err = float(np.max(np.abs(mult - expected) / expected))
        if err > 1e-5:
            bn = _bn_scale_after(model, layer)
            err_bn = float("inf") if bn is None else float(np.max(np.abs(mult - expected * bn) / np.abs(expected * bn)))
            if err_bn <= 1e-5:
                err = err_bn
                note.append("multiplier = alpha x the following BatchNorm's scale (folded)")
            else:  # the converter folded more than a BatchNorm (e.g. the next quantizer's 1/step)
                err = float("nan")
                note.append("multiplier = alpha x a per-channel factor the converter folded in from the ops "
                            "that follow (checked: signs)")
    if form.per_sample_clip is not None:
        note.append("output multiplied by the per-sample ls1 scale v (float MUL)")
    if c_in % WORD_BITS:
        note.append(f"{c_in} input channels padded to {words.shape[-1] * WORD_BITS} bits per pixel")
    n_scales = codebook.codebook_scales(quantizer, codebook.distinct_magnitudes(plan.keras_kernel))
    filt_bytes = 0 if words is None else int(words.nbytes)
    scale_bytes = _FLOAT_BYTES * int(mult.size) if mult is not None else (
        0 if bconv.thresholds is None else int(bconv.thresholds.nbytes))
    bias_bytes = 0 if bconv.bias is None else int(bconv.bias.nbytes)
    levels = max(np.unique(plan.keras_kernel[..., c]).size for c in range(c_out))
    return LceLayerReport(
        layer=layer.name, op=BCONV_OP, quantizer=describe(quantizer), input_quantizer=form.description,
        packed=True, bits=1, keras_levels=levels, stored_levels=2, max_rel_alpha_error=err, exact=exact,
        weights=n, weight_bytes=filt_bytes, scale_bytes=scale_bytes, bias_bytes=bias_bytes,
        stored_bytes=filt_bytes + scale_bytes, min_bytes=math.ceil(n / 8) + _FLOAT_BYTES * n_scales,
        pad_values=int(bconv.options.get("pad_values", -1)), note="; ".join(note),
        storage="packed 1-bit (LceBconv2d int32 words)", scales=n_scales)


def _float_report(plan, tensors, used):
    layer = plan.layer
    kernels = layer_kernels(layer) or {"kernel": (None, layer.kernel)}  # larq layers without quantizers too
    quantizer, variable = kernels.get("kernel", next(iter(kernels.values())))
    n = int(np.prod(variable.shape))
    tensor = match_tensor(layer, variable, tensors, used)
    in_q = getattr(layer, "input_quantizer", None)
    in_desc = "-" if in_q is None else type(in_q).__name__
    if tensor is None:
        return LceLayerReport(layer.name, "?", describe(quantizer), in_desc, False, 32, 0, 0, float("nan"),
                              False, n, 0, 0, 0, 0, 0,
                              note=f"not packed: {plan.reason}; weight tensor not found in the flatbuffer")
    used.add(id(tensor))
    expected = codebook.to_tflite_layout(inference.quantized_value(quantizer, variable), tensor.op, tensor.values.shape)
    int8 = tensor.dequantized or tensor.dtype == "INT8"
    if int8:
        check = dataclasses.replace(tensor, values=codebook.dequantized(tensor))
        kept = ("stored int8, one scale per output channel, dequantized to float when the interpreter "
                "prepares (the op computes in float)" if tensor.dequantized else
                "an int8 op: the converter quantized it between the FakeQuant ranges on its input and "
                f"output (tfmot's 8-bit activations), int8 weights with {tensor.scales.size} scale(s)")
        scale_bytes = _FLOAT_BYTES * int(tensor.scales.size)
    else:
        check = tensor
        kept = "kept float32"
        scale_bytes = 0
    comparison = codebook.compare(expected, check.values, codebook.output_channel_axis(check.op))
    err, levels, keras_levels = comparison.worst, comparison.stored_levels, comparison.keras_levels
    exact = comparison.exact if quantizer is not None else False
    folded = not np.allclose(check.values.astype(np.float64), expected, rtol=1e-6, atol=0)
    note = f"not packed: {plan.reason}; {kept}"
    if quantizer is not None and folded and exact:
        note += ("; stored = Keras kernel x a per-channel factor the converter folded in (a BatchNorm "
                 "scale or the input quantizer's 1/n)")
    if quantizer is not None and int8 and not exact:
        note += (f"; int8 rounds this codebook (max relative error of a level {err:.2g}): it has no "
                 "integer form per channel (weights='float32' keeps it exact)")
    nbytes = int(tensor.stored_bytes)
    if quantizer is None:
        bits, scales, minimum = 32, 0, nbytes + scale_bytes
    else:
        bits = codebook.codebook_bits(quantizer, _kernel_levels(expected))
        scales = codebook.codebook_scales(quantizer, codebook.distinct_magnitudes(expected))
        minimum = math.ceil(bits * n / 8) + _FLOAT_BYTES * scales
    return LceLayerReport(
        layer=layer.name, op=tensor.op, quantizer=describe(quantizer), input_quantizer=in_desc, packed=False,
        bits=bits, keras_levels=keras_levels, stored_levels=levels,
        max_rel_alpha_error=err if quantizer is not None else float("nan"), exact=exact, weights=n,
        weight_bytes=nbytes, scale_bytes=scale_bytes, bias_bytes=0, stored_bytes=nbytes + scale_bytes,
        min_bytes=minimum, note=note, storage=tensor.dtype.lower(), scales=scales,
        tensor_index=tensor.tensor_index)


def store_int8(buffer, reports):
    """The flatbuffer with the float weights of the not-packed quantized layers stored as int8
    (:func:`syq_tf.export.codebook.int8_from_float`, :func:`syq_tf.export.flatbuffer.dequantize_weights`)."""
    tensors = {t.tensor_index: t for t in flatbuffer.weight_tensors(buffer)}
    updates = {}
    for r in reports:
        if r.packed or r.quantizer == "float" or r.tensor_index not in tensors:
            continue
        tensor = tensors[r.tensor_index]
        if tensor.dtype != "FLOAT32":
            continue
        axis = codebook.output_channel_axis(tensor.op)
        values, scales, _ = codebook.int8_from_float(tensor.values, axis)
        updates[tensor.tensor_index] = (values, scales, axis)
    return flatbuffer.dequantize_weights(buffer, updates) if updates else buffer


def layer_reports(model, plans, buffer):
    """Match the packable layers with the LceBconv2d ops (in order) and the others with their float
    weight tensors; an :class:`LceLayerReport` per layer with a kernel."""
    bconvs = bconv_ops(buffer)
    floats = [t for t in flatbuffer.weight_tensors(buffer)
              if t.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    reports, used, queue = [], set(), list(bconvs)
    for plan in plans:
        if plan.packable:
            shape = (plan.signs.shape[3], plan.signs.shape[0], plan.signs.shape[1],
                     -(-plan.signs.shape[2] // WORD_BITS))
            match = next((b for b in queue if b.filter is not None and b.filter.shape == shape), None)
            if match is not None:
                queue.remove(match)
                reports.append(_packed_report(model, plan, match))
                continue
            plan.reason = "LCE's converter did not turn it into LceBconv2d"
        reports.append(_float_report(plan, floats, used))
    return reports


class LceExportResult(ExportResult):
    """:class:`ExportResult` of target ``lce``; ``layers`` are :class:`LceLayerReport` rows."""

    def __init__(self, buffer, layers, notes, ops, verification=None, weights="int8"):
        super().__init__(bytes(buffer), "lce", layers, notes, verification, weights)
        self.ops = ops

    def totals(self):
        packed = [r for r in self.layers if r.packed]
        return {
            "packed_layers": [r.layer for r in packed],
            "not_packed_layers": {r.layer: r.note for r in self.layers if not r.packed},
            "packed_weight_bytes": sum(r.weight_bytes for r in packed),
            "packed_weight_min_bytes": sum(math.ceil(r.weights / 8) for r in packed),
            "packed_stored_bytes": sum(r.stored_bytes for r in packed),
            "packed_min_bytes": sum(r.min_bytes for r in packed),
            "packed_bias_bytes": sum(r.bias_bytes for r in packed),
            "int8_layers": [r.layer for r in self.layers if r.storage == "int8"],
            "float32_layers": [r.layer for r in self.layers if not r.packed and r.storage == "float32"],
        }

    def to_dict(self):
        d = {
            "target": self.target,
            "weights": self.weights,
            "requantization": self.requantization,  # None: LCE's converter sets its own roundings
            "model_bytes": self.model_bytes,
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "notes": list(self.notes),
            "verification": self.verification,
        }
        d["lce"] = {**self.totals(), "ops": self.ops,
                    "runtime": "larq_compute_engine.testing.Interpreter (stock LiteRT cannot run LCE ops)"}
        return d

    def table(self):
        wl = max([10] + [len(r.layer) + 2 for r in self.layers])
        wq = max([12] + [len(r.quantizer) + 2 for r in self.layers])
        head = (f"{'layer':<{wl}}{'op':<18}{'quantizer':<{wq}}{'stored':>8}{'bits':>5}{'levels':>7}{'exact':>7}"
                f"{'weights':>9}{'weight B':>10}{'scale B':>9}{'bias B':>8}{'stored B':>10}{'minimum B':>11}")
        rows = [head, "-" * len(head)]
        for r in self.layers:
            is_float = r.quantizer == "float"
            exact = "-" if is_float else ("yes" if r.exact else "NO")
            stored = "1-bit" if r.packed else r.storage
            rows.append(f"{r.layer:<{wl}}{r.op:<18}{r.quantizer:<{wq}}{stored:>8}{r.bits:>5}{r.stored_levels:>7}{exact:>7}"
                        f"{r.weights:>9}{r.weight_bytes:>10}{r.scale_bytes:>9}{r.bias_bytes:>8}"
                        f"{r.stored_bytes:>10}{r.min_bytes:>11}")
        for r in self.layers:
            if r.note:
                rows.append(f"  {r.layer}: {r.note}")
        t = self.totals()
        if t["packed_layers"]:
            over = t["packed_stored_bytes"] / max(t["packed_min_bytes"], 1) - 1
            rows.append(f"packed layers: {t['packed_stored_bytes']} bytes stored (filters "
                        f"{t['packed_weight_bytes']} + multipliers) vs minimum {t['packed_min_bytes']} "
                        f"({over:+.1%}); biases {t['packed_bias_bytes']} bytes")
        rows.append(f"model: {self.model_bytes} bytes (lce; ops: {', '.join(self.ops)})")
        rows.extend(f"note: {n}" for n in self.notes)
        if self.verification:
            rows.append("verification (LCE interpreter vs Keras): " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.verification.items()))
        return "\n".join(rows)


def _check_model(model):
    """The model to plan: ``model``, or a tfmot model as syq_tf quantized layers
    (:func:`~syq_tf.export.tfmot_layers.as_quantized_layers`). Refuses what this target cannot export
    before converting (clear errors naming the layers)."""
    if not isinstance(model, tf.keras.Model):
        raise ValueError(f"to_tflite(target='lce'): expected a tf.keras Model, got {type(model).__name__}")
    if is_tfmot_model(model):
        model = as_quantized_layers(model)
    recurrent = [layer.name for layer in model.layers if isinstance(layer, tf.keras.layers.RNN)]
    if recurrent:
        raise ValueError(f"to_tflite(target='lce'): layers {recurrent} are recurrent; LCE packs binary "
                         "Conv2D layers only. Use target='litert' for recurrent models.")
    nested = [layer.name for layer in model.layers if isinstance(layer, tf.keras.Model)]
    if nested:
        raise ValueError(f"to_tflite(target='lce'): layers {nested} are nested models; flatten the model "
                         "first.")
    return model


def export(model, options, verify_samples=32):
    """The ``target="lce"`` export (see the module docstring). Raises ValueError naming every layer
    with a kernel and its reason when no layer can be packed (an LCE model with nothing bit-packed is
    only a float model: use target 'litert'). ``weights``: how quantized layers that are not packed
    store their weights, ``"int8"`` (default) or ``"float32"``. Verifies with LCE's interpreter on
    ``verify_data``, else on up to ``verify_samples`` representative examples."""
    weights, require_exact = options.weights, options.require_exact
    layers = _check_model(model)
    plans = plan_layers(layers)
    packable = [p for p in plans if p.packable]
    if not packable:
        detail = "; ".join(f"'{p.layer.name}': {p.reason}" for p in plans) or "the model has no kernel layers"
        hint = (". quantize_model schemes with 1-bit weights and 1-bit activations (syq-w1a1, lab-w1a1, "
                "ls-w1a1, uniq-w1a1) give binary layers; use target='litert' for the others"
                if layers is not model else "")
        raise ValueError(
            "to_tflite(target='lce'): no layer can be bit-packed into LceBconv2d (LCE needs a Conv2D "
            "with a ±alpha-per-output-channel kernel and a binary input quantizer): " + detail + hint
        )
    inference_form = inference_model(layers, plans)
    lce = import_lce()  # optional: no wheel on Python 3.13

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            buffer = bytes(lce.convert_keras_model(inference_form))
        except Exception as err:
            raise RuntimeError(f"to_tflite(target='lce'): LCE's converter failed: {err}") from err
    reports = layer_reports(layers, plans, buffer)
    if weights == "int8":
        buffer = store_int8(buffer, reports)
        reports = layer_reports(layers, plans, buffer)  # read back from what was written
    notes = [f"layer '{r.layer}': {r.note}" for r in reports if not r.packed and r.quantizer != "float"]
    fallback = [str(w.message) for w in caught if "falling back" in str(w.message)]
    if fallback:
        notes.append("LCE converter: " + fallback[0])
    lost = [r.layer for r in reports if not r.packed and r.layer in {p.layer.name for p in packable}]
    if lost:
        warnings.warn(f"to_tflite(target='lce'): layers {lost} were expected to become LceBconv2d but "
                      "LCE's converter kept them float", stacklevel=3)
    inexact = [r for r in reports if r.quantizer != "float" and not r.exact]
    if require_exact and inexact:
        raise ValueError("to_tflite(target='lce', require_exact=True): these layers are not stored exactly: "
                         + "; ".join(f"'{r.layer}' ({r.quantizer}): {r.note}" for r in inexact))
    rounded = [r.layer for r in inexact if r.storage == "int8"]
    if rounded:
        warnings.warn(f"to_tflite(target='lce'): the int8 weights of layers {rounded} round their codebooks "
                      "(no integer form per output channel); pass weights='float32' to keep them exact",
                      stacklevel=3)
    ops = sorted(set(flatbuffer.op_names(buffer)))
    result = LceExportResult(buffer, reports, notes, ops, weights=weights)
    verify_labels = options.verify_labels
    if options.verify_data is not None:
        x, on = np.asarray(options.verify_data), "verify_data"
    else:
        x, on = np.concatenate(convert.samples(options.representative_data, verify_samples) or [np.zeros((0,))]), \
            "representative_data"
        verify_labels = None
    if len(x):
        x = x.astype(np.float32)
        keras_out = keras_outputs(model, x)
        runtime_out = lce_predict(buffer, x)
        result.verification = {"data": on, **agreement(keras_out.reshape(len(x), -1),
                                                        runtime_out.reshape(len(x), -1), verify_labels)}
    return result
