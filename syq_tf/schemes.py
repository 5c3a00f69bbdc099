"""Whole-model scheme names (``syq-w2a8``, ``uniq-w4a4``, ``lab-w1`` ...) and the error of a model
that cannot be quantized, shared by both frontends' ``quantize_model`` (Keras 2: tfmot,
:mod:`syq_tf.tfmot`; Keras 3: :mod:`syq_tf.keras3.model`)."""

import dataclasses
import re

from syq_tf.quantizers import SYQ, DoReFaActivation, LeastSquares, LossAware, UniQ, UniQActivation


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A parsed scheme name ``<method>-w<bits>[a<bits>]``, e.g. syq-w2a8, uniq-w4a4, ls-w1a2, lab-w1."""

    name: str
    method: str
    weight_bits: int
    activation_bits: int  # 8: tfmot's default 8-bit activations

    def weight_quantizer(self):
        m, b = self.method, self.weight_bits
        if m == "syq":
            return SYQ(b, "channel")
        if m == "uniq":
            return UniQ(b, "channel")
        if m == "ls":
            return LeastSquares({1: "ls1", 2: "ls2"}[b])
        if m == "lab":
            return LossAware("binary")
        if m == "lat":
            return LossAware("ternary")
        return LossAware("linear", bits=b)  # laq

    def activation_quantizer(self):
        if self.activation_bits >= 8:
            return None  # tfmot's default 8-bit output quantization
        if self.method == "uniq":
            return UniQActivation(self.activation_bits)
        return DoReFaActivation(self.activation_bits)


_SCHEME = re.compile(r"^(syq|uniq|ls|lab|lat|laq)-w(\d)(?:a(\d))?$")
_WEIGHT_BITS = {"syq": (1, 2), "uniq": tuple(range(1, 9)), "ls": (1, 2), "lab": (1,), "lat": (2,),
                "laq": tuple(range(2, 9))}


def parse_scheme(name):
    """:class:`Scheme` from a name like ``syq-w2a8`` (activations default to 8 bits); ValueError
    naming what is allowed otherwise."""
    match = _SCHEME.match(str(name).strip().lower())
    allowed = ("<method>-w<bits>[a<bits>] with method syq (w1, w2), uniq (w1..w8), ls (w1 ls1, w2 ls2), "
               "lab (w1), lat (w2), laq (w2..w8) and activation bits 1..8, e.g. syq-w2a8, uniq-w4a4, "
               "ls-w1a2, lab-w1")
    if not match:
        raise ValueError(f"quantize_model: unknown scheme {name!r}; expected {allowed}.")
    method, wb, ab = match.group(1), int(match.group(2)), int(match.group(3) or 8)
    if wb not in _WEIGHT_BITS[method] or not 1 <= ab <= 8:
        raise ValueError(f"quantize_model: scheme {name!r} has unsupported bit widths; expected {allowed}.")
    return Scheme(str(name), method, wb, ab)


def check_layer_names(model, keep_float, eight_bit, kernel_layers):
    """Validate quantize_model's ``keep_float`` / ``eight_bit`` name lists against the model: every
    name a layer of it, ``eight_bit`` names kernel layers (``kernel_layers``: their names), no name in
    both. ValueError naming the offending names otherwise."""
    names = {layer.name for layer in model.layers}
    for arg, given in (("keep_float", keep_float), ("eight_bit", eight_bit)):
        if isinstance(given, str):
            raise ValueError(f"quantize_model: {arg} takes a list of layer names, not the string {given!r}.")
        missing = sorted(set(given) - names)
        if missing:
            raise ValueError(f"quantize_model: {arg} names layers the model does not have: {missing}.")
    weightless = sorted(set(eight_bit) - set(kernel_layers))
    if weightless:
        raise ValueError(f"quantize_model: eight_bit names layers without a kernel to quantize: {weightless}; "
                         "it takes kernel layers (Conv, Dense, ...) to keep at 8 bits.")
    both = sorted(set(keep_float) & set(eight_bit))
    if both:
        raise ValueError(f"quantize_model: layers {both} are in both keep_float and eight_bit; choose one.")


@dataclasses.dataclass
class Unsupported:
    """A layer :func:`quantize_model` cannot quantize under the scheme, and why."""

    layer: str
    type: str
    why: str


class UnsupportedLayersError(ValueError):
    """Raised by :func:`quantize_model` (``on_unsupported="raise"``) naming every unsupported layer."""

    def __init__(self, unsupported):
        self.unsupported = list(unsupported)
        lines = "; ".join(f"'{u.layer}' ({u.type}): {u.why}" for u in self.unsupported)
        super().__init__(
            f"quantize_model: {len(self.unsupported)} layer(s) cannot be quantized: {lines}. Pass "
            "on_unsupported='keep_float' to leave them in float, or keep_float=[names]."
        )
