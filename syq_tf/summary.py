"""``syq_tf.summary(model)``: what each layer stores and computes at its quantized bit width.

Per layer with weights: the method (quantizer class and mode), weight bits, granularity, number of
scale parameters (alpha / delta / loss-aware scales), parameters, bytes at the stored bit width
(kernel bits x kernel weights / 8, plus 32-bit floats for everything else: biases, BatchNorm, scales),
multiply-accumulates per example and how many of them are binary (1-bit weights) or ternary
(2-bit SYQ / LAT / lsT). Works for syq_tf layers, larq layers and tfmot-wrapped models.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from syq_tf.models import flat_layers, layer_kernels, require_model, unwrapped


@dataclasses.dataclass
class LayerSummary:
    """One row of :func:`summary`: what a layer stores (bits, scales, bytes) and computes (MACs)."""

    layer: str
    type: str
    method: str  # "float" for unquantized kernels, "-" for layers without a kernel
    bits: int  # kernel bits (32 for float)
    granularity: str
    scales: int  # scale parameters of the kernel quantizers
    params: int
    bytes: float  # at the stored bit width
    macs: int  # multiply-accumulates per example
    binary_macs: int
    ternary_macs: int


def method_name(quantizer):
    if quantizer is None:
        return "float"
    config = quantizer.get_config() if hasattr(quantizer, "get_config") else {}
    name = type(quantizer).__name__ if hasattr(quantizer, "get_config") else getattr(quantizer, "__name__", "?")
    mode = config.get("mode")
    return f"{name}({mode})" if mode else name


def quantizer_bits(quantizer):
    if quantizer is None:
        return 32
    return int(getattr(quantizer, "precision", None) or getattr(quantizer, "bits", None) or 32)


def _ternary(quantizer):
    if quantizer is None or quantizer_bits(quantizer) != 2:
        return False
    mode = getattr(quantizer, "mode", None)
    if mode is not None:  # least squares lsT, loss-aware LAT (ls2/gf2/LAQ-2: not {-a, 0, a})
        return mode in ("lsT", "ternary", "ternary_exact", "ternary_two_scale", "linear", "log")
    return type(quantizer).__name__ == "SYQ"


def _scale_count(quantizer):
    if quantizer is None or not hasattr(quantizer, "weights"):
        return 0
    return int(sum(int(np.prod(w.shape)) for w in quantizer.weights if tf.as_dtype(w.dtype).is_floating))


def _tfmot_bits(layer):
    """{id(kernel): bits} of kernels quantized by tfmot's own quantizers in a QuantizeWrapper."""
    out = {}
    for weight, quantizer, _ in getattr(layer, "_weight_vars", []) or []:
        if type(quantizer).__name__ != "TfmotQuantizer" and hasattr(quantizer, "num_bits"):
            out[id(weight)] = int(quantizer.num_bits)
    return out


def _shape(layer, end):
    """The layer's ``input`` / ``output`` shape (tf_keras: ``layer.output_shape``; Keras 3 keeps only
    the symbolic tensor ``layer.output``), a list for several tensors."""
    try:
        return getattr(layer, f"{end}_shape")
    except AttributeError:
        tensors = getattr(layer, end)
        return [tuple(t.shape) for t in tensors] if isinstance(tensors, (list, tuple)) else tuple(tensors.shape)


def _output_positions(layer):
    """Spatial (or time) positions of the layer's output per example."""
    shape = _shape(layer, "output")
    if isinstance(shape, list):
        shape = shape[0]
    dims = [d for d in shape[1:-1] if d is not None]
    return int(np.prod(dims)) if dims else 1


def _macs(layer, kernels):
    inner = unwrapped(layer)
    if isinstance(inner, tf.keras.layers.RNN):  # every time step: input and recurrent products
        steps = _output_positions(layer) if inner.return_sequences else int(_shape(layer, "input")[1] or 1)
        return {name: steps * int(np.prod(v.shape)) for name, (_, v) in kernels.items()}
    positions = _output_positions(layer)
    return {name: positions * int(np.prod(v.shape)) for name, (_, v) in kernels.items()}


def summarize(model):
    """A :class:`LayerSummary` per layer that has weights."""
    require_model(model, "syq_tf.summary")
    rows = []
    for layer in flat_layers(model):
        if not layer.weights:
            continue
        kernels = {k: (q, v) for k, (q, v) in layer_kernels(layer).items()}
        if not kernels and getattr(unwrapped(layer), "kernel", None) is not None and isinstance(
                unwrapped(layer).kernel, tf.Variable):
            kernels = {"kernel": (None, unwrapped(layer).kernel)}
        tfmot_bits = _tfmot_bits(layer)
        kernel_ids = {id(v) for _, v in kernels.values()}
        params, nbytes = 0, 0.0
        for w in layer.weights:
            w = getattr(w, "latent_variable", w)  # larq's QuantizedVariable wraps the float kernel
            if not tf.as_dtype(w.dtype).is_floating:
                continue
            n = int(np.prod(w.shape))
            params += n
            if id(w) in kernel_ids:
                q = next(q for q, v in kernels.values() if v is w)
                nbytes += n * (tfmot_bits.get(id(w)) or quantizer_bits(q)) / 8
            else:
                nbytes += 4 * n
        macs = _macs(layer, kernels) if kernels else {}
        quantizers = [q for q, _ in kernels.values()]
        first = quantizers[0] if quantizers else None
        binary = sum(m for name, m in macs.items() if quantizer_bits(kernels[name][0]) == 1)
        ternary = sum(m for name, m in macs.items() if _ternary(kernels[name][0]))
        granularity = getattr(first, "granularity", None) or ("-" if first is None else "layer")
        methods = [f"tfmot {tfmot_bits[id(v)]}-bit" if id(v) in tfmot_bits else method_name(q)
                   for q, v in kernels.values()]
        bits = [tfmot_bits.get(id(v)) or quantizer_bits(q) for q, v in kernels.values()]
        rows.append(LayerSummary(
            layer=layer.name, type=type(unwrapped(layer)).__name__,
            method=" + ".join(dict.fromkeys(methods)) if quantizers else "-",
            bits=min(bits, default=32), granularity=granularity if quantizers else "-",
            scales=sum(_scale_count(q) for q in quantizers), params=params, bytes=nbytes,
            macs=sum(macs.values()), binary_macs=binary, ternary_macs=ternary,
        ))
    return rows


def summary(model, print_fn=print):
    """Print (with ``print_fn``) and return the per-layer table of :func:`summarize`, with totals."""
    rows = summarize(model)
    wl = max([16] + [len(r.layer) + 2 for r in rows])
    wt = max([18] + [len(r.type) + 2 for r in rows])
    wm = max([26] + [len(r.method) + 2 for r in rows])
    head = (f"{'layer':<{wl}}{'type':<{wt}}{'method':<{wm}}{'bits':>5}{'granularity':>12}{'scales':>8}"
            f"{'params':>10}{'bytes':>11}{'MACs':>12}{'binary':>12}{'ternary':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.layer:<{wl}}{r.type:<{wt}}{r.method:<{wm}}{r.bits:>5}{r.granularity:>12}{r.scales:>8}"
                     f"{r.params:>10}{r.bytes:>11.1f}{r.macs:>12}{r.binary_macs:>12}{r.ternary_macs:>12}")
    total_bytes = sum(r.bytes for r in rows)
    float_bytes = 4 * sum(r.params for r in rows)
    lines.append("-" * len(head))
    lines.append(
        f"total: {sum(r.params for r in rows)} params, {total_bytes:.1f} bytes at stored bit widths "
        f"({float_bytes / max(total_bytes, 1e-9):.1f}x smaller than float32), {sum(r.macs for r in rows)} MACs "
        f"({sum(r.binary_macs for r in rows)} binary, {sum(r.ternary_macs for r in rows)} ternary)"
    )
    if print_fn is not None:
        print_fn("\n".join(lines))
    return rows
