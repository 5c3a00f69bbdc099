"""Packed binary / ternary weight kernels with int8 activations (the C library in tflite/).

Weights of a binary/ternary codebook as TFLite stores them in int8 are ``w = m_g * code`` with
``code`` in {-1,+1} / {-1,0,+1} and a small integer ``m_g`` per group (layer, output channel, or
output channel x kernel pixel).  :func:`split_codebook` recovers (codes, m_g); the codes are stored
bit-packed (1 or 2 bits per weight, LCE-style along input channels) and the kernels compute
TFLite's int32 accumulator with additions/subtractions, then requantize exactly like TFLite's
builtin int8 kernels.  :func:`packed_layers` reads every such CONV_2D / FULLY_CONNECTED layer of
an exported int8 flatbuffer; :func:`run_tflite` / :class:`TFLiteRunner` execute a whole int8
model op by op (packed kernels for those layers, numpy int8 references for the other ops).

The C library is compiled by ``pip install -e .`` (setuptools extension ``syq_tf.kernels._libsyq``);
importing this module works without it, calling a kernel raises :class:`KernelsUnavailable`.
"""

import contextlib
import ctypes
import dataclasses
import math

import numpy as np

from syq_tf.kernels._lib import ConvParams, KernelsUnavailable, PackedWeights, check, lib

GRANULARITIES = ("layer", "channel", "pixel")

__all__ = [
    "GRANULARITIES", "KernelsUnavailable", "PackedLayer", "available", "pack", "unpack",
    "split_codebook", "quantize_multiplier", "conv_multipliers", "fc_multipliers",
    "activation_range", "simd_level", "packed_layers", "run_tflite", "TFLiteRunner", "UnsupportedOp",
]


def available():
    """True if the compiled library can be loaded."""
    try:
        lib()
        return True
    except KernelsUnavailable:
        return False


def simd_level():
    """What the optimized kernels use: 0 portable C, 2 AVX2, 3 NEON, 4 NEON + SDOT, 5 Arm DSP (SIMD32), 6 + Helium."""
    return int(lib().syq_simd_level())


def _ptr(a, ctype):
    return a.ctypes.data_as(ctypes.POINTER(ctype))


def _as_ohwi(codes):
    codes = np.asarray(codes)
    if codes.ndim == 2:
        return codes.reshape(codes.shape[0], 1, 1, codes.shape[1])
    if codes.ndim != 4:
        raise ValueError(f"codes must be [out, kh, kw, in] or [out, in], got shape {codes.shape}")
    return codes


def pack(codes, bits):
    """Bit-pack OHWI (or [out, in]) codes in {-1,+1} (bits=1) or {-1,0,+1} (bits=2) -> uint32."""
    c = np.ascontiguousarray(_as_ohwi(codes), dtype=np.int8)
    o, kh, kw, i = c.shape
    n = lib().syq_packed_words(bits, o, kh, kw, i)
    if n == 0:
        raise ValueError(f"cannot pack codes of shape {c.shape} with bits={bits}")
    out = np.zeros(n, np.uint32)
    rc = lib().syq_pack(c.ctypes.data, bits, o, kh, kw, i, _ptr(out, ctypes.c_uint32))
    if rc == -2:
        raise ValueError(f"codes outside the {'binary' if bits == 1 else 'ternary'} codebook")
    check(rc, "pack")
    return out


def unpack(packed, bits, shape):
    """Inverse of :func:`pack`: packed words -> int8 codes of ``shape`` (OHWI or [out, in])."""
    shape = tuple(shape)
    o, kh, kw, i = _as_ohwi(np.empty(shape, np.int8)).shape
    p = np.ascontiguousarray(packed, dtype=np.uint32)
    if p.size != lib().syq_packed_words(bits, o, kh, kw, i):
        raise ValueError(f"{p.size} words do not hold {shape} codes at {bits} bits")
    out = np.empty((o, kh, kw, i), np.int8)
    check(lib().syq_unpack(_ptr(p, ctypes.c_uint32), bits, o, kh, kw, i, out.ctypes.data), "unpack")
    return out.reshape(shape)


def split_codebook(w_int8, bits=None, granularity=None):
    """int8 weights OHWI (or [out, in]) -> (codes, mag, granularity, bits), w = mag_g * code exactly.

    ``granularity`` is the coarsest of layer/channel/pixel that holds the weights; ``mag`` has
    1, out or out*kh*kw entries.  ``bits`` None picks 1 when no code is 0.  Raises ValueError when
    the weights are no binary/ternary codebook (e.g. a float layer quantized to int8).
    ``granularity`` asks for a finer grouping than the coarsest (magnitudes repeated)."""
    codes, mag, found, bits = _split_codebook(w_int8, bits)
    if granularity is None or granularity == found:
        return codes, mag, found, bits
    if GRANULARITIES.index(granularity) < GRANULARITIES.index(found):
        raise ValueError(f"weights need granularity {found!r}, not {granularity!r}")
    o, kh, kw, _ = _as_ohwi(codes).shape
    full = np.broadcast_to(mag.reshape(-1, 1) if found == "channel" else mag.reshape(-1)[:1, None], (o, kh * kw))
    mag = np.ascontiguousarray(full[:, 0] if granularity == "channel" else full.reshape(-1), np.uint8)
    return codes, mag, granularity, bits


def _split_codebook(w_int8, bits):
    w = _as_ohwi(np.asarray(w_int8)).astype(np.int32)
    o, kh, kw, i = w.shape
    g = np.abs(w).reshape(o, kh * kw, i)
    m = g.max(axis=2)  # per (o, pixel)
    if np.any((g != 0) & (g != m[:, :, None])):
        raise ValueError("weights are not m_g * {-1, 0, +1} for any group (o, kernel pixel)")
    codes = np.sign(w).astype(np.int8)
    has_zero = bool(np.any(codes == 0))
    if bits is None:
        bits = 2 if has_zero else 1
    if bits == 1 and has_zero:
        raise ValueError("binary codebook requested but some weights are 0")
    if bits not in (1, 2):
        raise ValueError(f"bits must be 1 or 2, got {bits}")
    used = m > 0
    vals = np.unique(m[used])
    if vals.size <= 1:
        return codes.reshape(np.shape(w_int8)), np.array([vals[0] if vals.size else 0], np.uint8), "layer", bits
    per_o = [np.unique(m[k][used[k]]) for k in range(o)]
    if all(v.size <= 1 for v in per_o):
        mag = np.array([v[0] if v.size else 0 for v in per_o], np.uint8)
        return codes.reshape(np.shape(w_int8)), mag, "channel", bits
    return codes.reshape(np.shape(w_int8)), m.reshape(-1).astype(np.uint8), "pixel", bits


def quantize_multiplier(real):
    """TFLite's QuantizeMultiplier: real -> (int32 multiplier, shift). ValueError for inf / NaN."""
    real = float(real)
    if not math.isfinite(real):
        raise ValueError(f"quantize_multiplier: {real} is not a finite number (a scale is inf or NaN)")
    m, s = ctypes.c_int32(), ctypes.c_int32()
    lib().syq_quantize_multiplier(real, ctypes.byref(m), ctypes.byref(s))
    return m.value, s.value


def _f64(x):
    return np.float64(np.float32(x))


def conv_multipliers(input_scale, filter_scales, output_scale, out_c):
    """Per-channel (multiplier, shift) as TFLite's PopulateConvolutionQuantizationParams."""
    fs = np.broadcast_to(np.asarray(filter_scales, np.float32).reshape(-1), (out_c,))
    pairs = [quantize_multiplier(_f64(input_scale) * _f64(f) / _f64(output_scale)) for f in fs]
    return np.array([p[0] for p in pairs], np.int32), np.array([p[1] for p in pairs], np.int32)


def fc_multipliers(input_scale, filter_scales, output_scale, out_c):
    """FullyConnected: per-tensor uses double(float(in * filter)) / out (GetQuantizedConvolution-
    Multipler); per-channel weights use the convolution formula."""
    fs = np.asarray(filter_scales, np.float32).reshape(-1)
    if fs.size > 1:
        return conv_multipliers(input_scale, fs, output_scale, out_c)
    prod = np.float64(np.float32(input_scale) * fs[0])
    m, s = quantize_multiplier(prod / _f64(output_scale))
    return np.full(out_c, m, np.int32), np.full(out_c, s, np.int32)


def activation_range(activation, output_scale, output_zero_point):
    """int8 clamp of a fused activation ('NONE', 'RELU', 'RELU6', 'RELU_N1_TO_1') as TFLite."""
    def q(v):
        r = np.float32(v) / np.float32(output_scale)
        return int(output_zero_point) + int(np.sign(r) * np.floor(np.abs(r) + np.float32(0.5)))

    act = activation.upper() if isinstance(activation, str) else activation
    if act in ("NONE", None):
        return -128, 127
    if act == "RELU":
        return max(-128, q(0.0)), 127
    if act == "RELU6":
        return max(-128, q(0.0)), min(127, q(6.0))
    if act == "RELU_N1_TO_1":
        return max(-128, q(-1.0)), min(127, q(1.0))
    raise ValueError(f"unsupported fused activation {activation!r}")


def _out_size(n, k, s, padding):
    return (n + s - 1) // s if padding == "SAME" else (n - k + s) // s


@contextlib.contextmanager
def _portable():
    prev = lib().syq_force_portable(1)
    try:
        yield
    finally:
        lib().syq_force_portable(prev)


@dataclasses.dataclass
class PackedLayer:
    """A Conv2D (``kind='conv'``, NHWC) or FullyConnected (``kind='fc'``) layer with packed codes."""

    kind: str
    shape: tuple  # (out, kh, kw, in)
    bits: int
    granularity: str
    codes: np.ndarray  # uint32, packed
    mag: np.ndarray  # uint8
    multiplier: np.ndarray  # int32 per output channel
    shift: np.ndarray  # int32 per output channel
    bias: np.ndarray = None  # int32 per output channel or None
    input_zero_point: int = 0
    output_zero_point: int = 0
    act_min: int = -128
    act_max: int = 127
    stride: tuple = (1, 1)
    padding: str = "VALID"
    name: str = ""

    @classmethod
    def from_int8(cls, kind, w_int8, multiplier, shift, bias=None, input_zero_point=0,
                  output_zero_point=0, act_range=(-128, 127), stride=(1, 1), padding="VALID",
                  bits=None, granularity=None, name=""):
        """From TFLite int8 weights (OHWI conv, [out, in] FC) whose values are a codebook."""
        codes, mag, gran, bits = split_codebook(w_int8, bits, granularity)
        shape = _as_ohwi(codes).shape
        return cls(kind, tuple(int(d) for d in shape), bits, gran, pack(codes, bits), mag,
                   np.ascontiguousarray(multiplier, np.int32), np.ascontiguousarray(shift, np.int32),
                   None if bias is None else np.ascontiguousarray(bias, np.int32),
                   int(input_zero_point), int(output_zero_point), int(act_range[0]), int(act_range[1]),
                   tuple(int(s) for s in stride), padding.upper(), name)

    def int8_weights(self):
        """The int8 weights m_g * code these packed codes stand for (OHWI / [out, in])."""
        o, kh, kw, i = self.shape
        c = unpack(self.codes, self.bits, self.shape).astype(np.int32)
        if self.granularity == "pixel":
            m = self.mag.reshape(o, kh, kw, 1)
        elif self.granularity == "channel":
            m = self.mag.reshape(o, 1, 1, 1)
        else:
            m = self.mag.reshape(1, 1, 1, 1)
        w = (c * m.astype(np.int32)).astype(np.int8)
        return w.reshape(o, i) if self.kind == "fc" else w

    @property
    def weight_bytes(self):
        """Bytes of packed codes plus magnitudes (compare with prod(shape) int8 bytes)."""
        return int(self.codes.nbytes + self.mag.nbytes)

    def _check(self):
        """Every array the C kernels read against the shape they assume (ValueError naming the layer):
        the kernels take pointers, not lengths, so a short array would be read past its end."""
        if self.kind not in ("conv", "fc") or len(self.shape) != 4 or min(self.shape) < 1:
            raise ValueError(f"{self.name}: kind {self.kind!r} / shape {self.shape} (conv or fc, 4 dims >= 1)")
        o, kh, kw, i = (int(d) for d in self.shape)
        if self.kind == "fc" and (kh, kw) != (1, 1):
            raise ValueError(f"{self.name}: a fully connected layer has a 1x1 kernel, got {kh}x{kw}")
        if self.bits not in (1, 2) or self.granularity not in GRANULARITIES:
            raise ValueError(f"{self.name}: bits {self.bits} / granularity {self.granularity!r}")
        if o * kh * kw * i >= 1 << 31:
            raise ValueError(f"{self.name}: {o * kh * kw * i} weights (the kernels take fewer than 2^31)")
        mags = {"layer": 1, "channel": o, "pixel": o * kh * kw}[self.granularity]
        arrays = [("codes", self.codes, np.uint32, lib().syq_packed_words(self.bits, o, kh, kw, i)),
                  ("mag", self.mag, np.uint8, mags), ("multiplier", self.multiplier, np.int32, o),
                  ("shift", self.shift, np.int32, o)]
        if self.bias is not None:
            arrays.append(("bias", self.bias, np.int32, o))
        for what, a, dtype, size in arrays:
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.size != size or not a.flags.c_contiguous:
                got = f"{a.size} x {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(f"{self.name}: {what} has {got}; the layer needs {size} contiguous {np.dtype(dtype)}")
        if self.mag.size and int(self.mag.max()) > 127:
            raise ValueError(f"{self.name}: magnitude {int(self.mag.max())} (the codebook magnitudes are 0..127)")
        if self.shift.size and (int(self.shift.min()) < -31 or int(self.shift.max()) > 31):
            raise ValueError(f"{self.name}: shift outside -31..31")
        for what, v in (("input zero point", self.input_zero_point), ("output zero point", self.output_zero_point),
                        ("act_min", self.act_min), ("act_max", self.act_max)):
            if not -128 <= v <= 127:
                raise ValueError(f"{self.name}: {what} {v} is outside -128..127")
        if self.act_min > self.act_max:
            raise ValueError(f"{self.name}: act_min {self.act_min} > act_max {self.act_max}")
        if self.kind == "conv" and (min(self.stride) < 1 or self.padding not in ("SAME", "VALID")):
            raise ValueError(f"{self.name}: stride {self.stride} (>= 1) / padding {self.padding!r} (SAME or VALID)")

    def _structs(self, x):
        self._check()
        o, kh, kw, i = self.shape
        w = PackedWeights(self.bits, GRANULARITIES.index(self.granularity), o, kh, kw, i,
                          _ptr(self.codes, ctypes.c_uint32), _ptr(self.mag, ctypes.c_uint8))
        p = ConvParams()
        if self.kind == "conv":
            n, h, wd, c = x.shape
            if c != i:
                raise ValueError(f"{self.name}: input has {c} channels, layer expects {i}")
            sh, sw = self.stride
            oh, ow = _out_size(h, kh, sh, self.padding), _out_size(wd, kw, sw, self.padding)
            if oh <= 0 or ow <= 0 or n < 1:
                raise ValueError(f"{self.name}: input {x.shape} too small for a {kh}x{kw} kernel")
            big = max(n * h * wd * c, n * oh * ow * o, ((oh - 1) * sh + kh) * ((ow - 1) * sw + kw) * 32 * ((i + 31) // 32))
            if big >= 1 << 31:
                raise ValueError(f"{self.name}: input {x.shape} with a {kh}x{kw} kernel, stride {self.stride}: "
                                 f"{big} elements (the kernels take fewer than 2^31 per array)")
            pt = max((oh - 1) * sh + kh - h, 0) // 2 if self.padding == "SAME" else 0
            pl = max((ow - 1) * sw + kw - wd, 0) // 2 if self.padding == "SAME" else 0
            p.batch, p.in_h, p.in_w, p.out_h, p.out_w = n, h, wd, oh, ow
            p.stride_h, p.stride_w, p.pad_top, p.pad_left = sh, sw, pt, pl
            out_shape = (n, oh, ow, o)
        else:
            if x.shape[-1] != i:
                raise ValueError(f"{self.name}: input has {x.shape[-1]} features, layer expects {i}")
            p.batch = x.size // i
            if p.batch < 1 or x.size % i:
                raise ValueError(f"{self.name}: input of shape {x.shape} has no whole rows of {i} features")
            out_shape = (p.batch, o)
        p.input_zero_point, p.output_zero_point = self.input_zero_point, self.output_zero_point
        p.act_min, p.act_max = self.act_min, self.act_max
        p.bias = _ptr(self.bias, ctypes.c_int32) if self.bias is not None else None
        p.out_multiplier, p.out_shift = _ptr(self.multiplier, ctypes.c_int32), _ptr(self.shift, ctypes.c_int32)
        return p, w, out_shape

    def __call__(self, x, impl="opt"):
        """Run on int8 input (NHWC for conv, [..., in] for FC). impl: 'opt', 'ref' or 'portable'."""
        x = np.ascontiguousarray(x, dtype=np.int8)
        if self.kind == "conv" and x.ndim != 4:
            raise ValueError(f"{self.name}: conv input must be NHWC, got shape {x.shape}")
        p, w, out_shape = self._structs(x)
        out = np.empty(out_shape, np.int8)
        L = lib()
        conv = self.kind == "conv"
        if impl == "ref":
            fn = L.syq_conv2d_ref if conv else L.syq_fully_connected_ref
            check(fn(ctypes.byref(p), ctypes.byref(w), x.ctypes.data, out.ctypes.data), f"{self.name} ref")
            return out
        if impl not in ("opt", "portable"):
            raise ValueError(f"impl must be 'opt', 'ref' or 'portable', got {impl!r}")
        nbytes = (L.syq_conv2d_scratch_bytes if conv else L.syq_fully_connected_scratch_bytes)(
            ctypes.byref(p), ctypes.byref(w))
        scratch = np.empty(nbytes, np.uint8)
        fn = L.syq_conv2d_opt if conv else L.syq_fully_connected_opt
        with _portable() if impl == "portable" else contextlib.nullcontext():
            check(fn(ctypes.byref(p), ctypes.byref(w), x.ctypes.data, out.ctypes.data,
                     scratch.ctypes.data, nbytes), f"{self.name} {impl}")
        return out

    def make_runner(self, input_shape, impl="opt"):
        """A zero-allocation closure for repeated calls on inputs of one shape (benchmarks).

        Output and scratch buffers are allocated once and their addresses taken once; the input's
        address is taken per call, except when the same array object comes again (the runner keeps
        a reference to it, so numpy cannot move its data: ``resize`` refuses referenced arrays).
        The closure returns its own output buffer (overwritten by the next call)."""
        x0 = np.zeros(input_shape, np.int8)
        p, w, out_shape = self._structs(x0)
        out = np.empty(out_shape, np.int8)
        L = lib()
        conv = self.kind == "conv"
        pr, wr = ctypes.byref(p), ctypes.byref(w)
        out_p = out.ctypes.data
        last = [None, 0]  # last input array and its data address

        def addr(x):
            if x is not last[0]:
                last[0], last[1] = x, x.ctypes.data
            return last[1]

        if impl == "ref":
            fn = L.syq_conv2d_ref if conv else L.syq_fully_connected_ref
            keep = (p, w, out, self)

            def run(x):
                _ = keep
                rc = fn(pr, wr, addr(x), out_p)
                if rc:
                    check(rc, "ref")
                return out
            return run
        if impl not in ("opt", "portable"):
            raise ValueError(f"impl must be 'opt', 'ref' or 'portable', got {impl!r}")
        nbytes = (L.syq_conv2d_scratch_bytes if conv else L.syq_fully_connected_scratch_bytes)(pr, wr)
        scratch = np.empty(nbytes, np.uint8)
        scratch_p = scratch.ctypes.data
        fn = L.syq_conv2d_opt if conv else L.syq_fully_connected_opt
        keep = (p, w, scratch, out, self)

        def run(x):
            _ = keep
            if impl == "portable":
                with _portable():
                    rc = fn(pr, wr, addr(x), out_p, scratch_p, nbytes)
            else:
                rc = fn(pr, wr, addr(x), out_p, scratch_p, nbytes)
            if rc:
                check(rc, impl)
            return out
        return run

from syq_tf.kernels.runner import TFLiteRunner, UnsupportedOp, packed_layers, run_tflite  # noqa: E402
