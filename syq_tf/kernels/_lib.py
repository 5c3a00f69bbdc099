"""ctypes binding of the packed-kernel C library (tflite/src, built as syq_tf.kernels._libsyq)."""

import ctypes
import importlib.machinery
import os
import pathlib


class KernelsUnavailable(ImportError):
    """The compiled packed-kernel library is missing (the C extension was not built)."""


class PackedWeights(ctypes.Structure):
    _fields_ = [
        ("bits", ctypes.c_int32), ("granularity", ctypes.c_int32),
        ("out_c", ctypes.c_int32), ("k_h", ctypes.c_int32), ("k_w", ctypes.c_int32),
        ("in_c", ctypes.c_int32),
        ("codes", ctypes.POINTER(ctypes.c_uint32)), ("mag", ctypes.POINTER(ctypes.c_uint8)),
    ]


class ConvParams(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int32), ("in_h", ctypes.c_int32), ("in_w", ctypes.c_int32),
        ("out_h", ctypes.c_int32), ("out_w", ctypes.c_int32),
        ("stride_h", ctypes.c_int32), ("stride_w", ctypes.c_int32),
        ("pad_top", ctypes.c_int32), ("pad_left", ctypes.c_int32),
        ("input_zero_point", ctypes.c_int32), ("output_zero_point", ctypes.c_int32),
        ("act_min", ctypes.c_int32), ("act_max", ctypes.c_int32),
        ("bias", ctypes.POINTER(ctypes.c_int32)),
        ("out_multiplier", ctypes.POINTER(ctypes.c_int32)),
        ("out_shift", ctypes.POINTER(ctypes.c_int32)),
    ]


ERRORS = {-1: "bad argument (shape, parameter or NULL pointer)", -2: "code outside the codebook",
          -3: "scratch buffer too small"}


def _candidates():
    env = os.environ.get("SYQ_KERNELS_LIB")
    if env:
        yield pathlib.Path(env)
    here = pathlib.Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        yield here / f"_libsyq{suffix}"


def _load():
    tried = []
    for path in _candidates():
        tried.append(str(path))
        if path.is_file():
            try:
                return ctypes.CDLL(str(path))
            except OSError as err:
                raise KernelsUnavailable(f"syq_tf.kernels: cannot load {path}: {err}") from None
    raise KernelsUnavailable(
        "syq_tf.kernels: the packed-kernel C library was not built (looked for "
        + ", ".join(tried)
        + "). Build it with `.venv/bin/python -m pip install -e .` (needs a C compiler, e.g. gcc), "
        "or point SYQ_KERNELS_LIB at a shared library built from tflite/src/*.c."
    )


_LIB = None


def lib():
    """The loaded library (raises KernelsUnavailable with instructions if it was not built)."""
    global _LIB
    if _LIB is None:
        L = _load()
        i32, u32p, i8p, sz = ctypes.c_int32, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p, ctypes.c_size_t
        pw, pp = ctypes.POINTER(PackedWeights), ctypes.POINTER(ConvParams)
        sig = {
            "syq_packed_words": (sz, [i32, i32, i32, i32, i32]),
            "syq_pack": (ctypes.c_int, [i8p, i32, i32, i32, i32, i32, u32p]),
            "syq_unpack": (ctypes.c_int, [u32p, i32, i32, i32, i32, i32, i8p]),
            "syq_quantize_multiplier": (None, [ctypes.c_double, ctypes.POINTER(i32), ctypes.POINTER(i32)]),
            "syq_multiply_by_quantized_multiplier": (i32, [i32, i32, i32]),
            "syq_conv2d_ref": (ctypes.c_int, [pp, pw, i8p, i8p]),
            "syq_conv2d_scratch_bytes": (sz, [pp, pw]),
            "syq_conv2d_opt": (ctypes.c_int, [pp, pw, i8p, i8p, ctypes.c_void_p, sz]),
            "syq_fully_connected_ref": (ctypes.c_int, [pp, pw, i8p, i8p]),
            "syq_fully_connected_scratch_bytes": (sz, [pp, pw]),
            "syq_fully_connected_opt": (ctypes.c_int, [pp, pw, i8p, i8p, ctypes.c_void_p, sz]),
            "syq_simd_level": (ctypes.c_int, []),
            "syq_force_portable": (ctypes.c_int, [ctypes.c_int]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(L, name)
            fn.restype, fn.argtypes = res, args
        _LIB = L
    return _LIB


def check(rc, what):
    if rc != 0:
        raise RuntimeError(f"syq_tf.kernels: {what} failed: {ERRORS.get(rc, rc)}")
