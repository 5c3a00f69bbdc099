"""Packed binary/ternary kernels vs LiteRT int8 vs TFLite Micro, single thread, one run.

Layers: the demo CNN's quantized layers (examples/fashion_mnist_syq.py: conv2 28x28x32->32,
conv3 14x14x32->64, conv4 14x14x64->64, all 3x3 SAME; fc1 3136->128) and a ResNet-18-sized
3x3 conv (56x56x64->64).  Each layer is a one-layer Keras model with a binary / ternary SYQ
pixel codebook converted to full-integer int8; our kernels run the packed codes read back from that
flatbuffer.  Timings are interleaved (round-robin over implementations), median per call, in CPU
time of the calling thread (time.thread_time: every implementation runs single-threaded in this
thread; on a shared, loaded machine wall time also counts the time other processes hold the CPU).
``--baseline-lib`` adds "ours_opt_baseline": the optimized kernels of another build of the library
(e.g. a copy of the previous _libsyq*.so), timed in the same run.

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/kernels.py [--rounds 15] [--quick] \
        [--baseline-lib /tmp/old_libsyq.so]

Writes benchmarks/results/kernels.json.
"""

import argparse
import os
import pathlib
import platform
import statistics
import time

import numpy as np

import syq_tf  # noqa: F401
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from syq_tf import kernels as K
from syq_tf.export.convert import int8 as convert_int8

from machine import cpuinfo, write_json  # noqa: E402  (benchmarks/machine.py)

LAYERS = [
    ("demo conv2 28x28x32->32 3x3", "conv", (28, 28, 32), 32),
    ("demo conv3 14x14x32->64 3x3", "conv", (14, 14, 32), 64),
    ("demo conv4 14x14x64->64 3x3", "conv", (14, 14, 64), 64),
    ("demo fc1 3136->128", "fc", (3136,), 128),
    ("resnet18 conv 56x56x64->64 3x3", "conv", (56, 56, 64), 64),
]


def convert(kind, in_shape, out_c, bits, rng):
    inp = tf.keras.Input(in_shape)
    layer = (tf.keras.layers.Conv2D(out_c, 3, padding="same", activation="relu") if kind == "conv"
             else tf.keras.layers.Dense(out_c, activation="relu"))
    model = tf.keras.Model(inp, layer(inp))
    shape = tuple(layer.kernel.shape)
    codes = rng.choice([-1, 1] if bits == 1 else [-1, 0, 1], size=shape)
    alpha = rng.uniform(0.02, 0.2, size=list(shape[:-2]) + [1, 1]) if kind == "conv" else 0.05
    layer.kernel.assign((codes * alpha).astype(np.float32))
    layer.bias.assign(rng.normal(0, 0.2, size=out_c).astype(np.float32))

    # the project's own full-integer int8 conversion (int8 in and out), on 8 random examples
    return convert_int8(model, rng.uniform(0, 1, size=(8,) + tuple(in_shape)))


def litert_runner(fb, x, resolver):
    it = Interpreter(model_content=fb, experimental_op_resolver_type=resolver, num_threads=1)
    it.allocate_tensors()
    d, o = it.get_input_details()[0], it.get_output_details()[0]
    it.set_tensor(d["index"], x)

    def run():
        it.invoke()
    run.output = lambda: it.get_tensor(o["index"])
    return run


def tflm_runner(fb, x):
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError as err:
        return None, f"tflite-micro not installed ({err})"
    it = runtime.Interpreter.from_bytes(fb, arena_size=8 << 20)
    it.set_input(x, 0)

    def run():
        it.invoke()
    run.output = lambda: it.get_output(0)
    return run, None


def ours_runner(layer, x, impl, lib_path=None):
    xin = x if layer.kind == "conv" else x.reshape(1, -1)
    if lib_path is None:
        r = layer.make_runner(xin.shape, impl=impl)
    else:  # another build of the library (the runner keeps its own handle)
        from syq_tf.kernels import _lib

        saved, env = _lib._LIB, os.environ.get("SYQ_KERNELS_LIB")
        _lib._LIB, os.environ["SYQ_KERNELS_LIB"] = None, lib_path
        try:
            r = layer.make_runner(xin.shape, impl=impl)
        finally:
            _lib._LIB = saved
            if env is None:
                os.environ.pop("SYQ_KERNELS_LIB")
            else:
                os.environ["SYQ_KERNELS_LIB"] = env

    def run():
        r(xin)
    run.output = lambda: r(xin)
    return run


def time_call(fn, min_time):
    n, t = 1, 0.0
    while True:  # calls per sample so one sample takes >= min_time
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        t = time.thread_time() - t0
        if t >= min_time:
            return t / n
        n *= 2


ISA_FLAGS = ("sse4_2", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8",
             "amx_bf16", "asimd", "asimddp", "i8mm", "sve", "sve2")  # /proc/cpuinfo names (x86 flags, arm64 Features)


def cpu_info():
    """CPU model and the ISA extensions that decide int8 kernel speed (ours use AVX2 / NEON+SDOT only;
    XNNPACK and LiteRT use AVX-512 VNNI / AMX where present)."""
    # keys in lower case (x86 "flags", arm64 "Features"); reversed, so the first of two spellings wins
    fields = {k.lower(): v for k, v in reversed(cpuinfo().items())}
    model = platform.processor() or platform.machine()
    if model in ("", platform.machine()):
        model = next((fields[k] for k in ("model name", "cpu model", "hardware") if k in fields), model)
    flags = set(next((fields[k] for k in ("flags", "features") if k in fields), "").split())
    return dict(cpu_model=model, isa=[f for f in ISA_FLAGS if f in flags])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--min-time", type=float, default=0.02, help="seconds per timing sample")
    ap.add_argument("--quick", action="store_true", help="3 rounds, skip the slow reference kernels on big layers")
    ap.add_argument("--baseline-lib", default=None, help="another build of _libsyq*.so to time as ours_opt_baseline")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "kernels.json"))
    args = ap.parse_args()
    rounds = 3 if args.quick else args.rounds
    rng = np.random.default_rng(0)
    load_start = list(os.getloadavg())
    results = []
    tflm_note = None
    cpu = cpu_info()
    paths = {2: "AVX2", 3: "NEON", 4: "NEON + SDOT"}
    print(f"CPU: {cpu['cpu_model']}; ISA extensions: {', '.join(cpu['isa']) or 'none listed'}")
    print(f"optimized path: {paths.get(K.simd_level(), 'portable C')}; single thread; "
          f"median of {rounds} interleaved rounds, microseconds per call")
    for name, kind, in_shape, out_c in LAYERS:
        for bits in (1, 2):
            fb = convert(kind, in_shape, out_c, bits, rng)
            (layer,) = K.packed_layers(fb).values()
            x = rng.integers(-128, 128, size=(1,) + in_shape).astype(np.int8)
            impls = {
                "ours_opt": ours_runner(layer, x, "opt"),
                **({"ours_opt_baseline": ours_runner(layer, x, "opt", args.baseline_lib)} if args.baseline_lib else {}),
                "ours_portable": ours_runner(layer, x, "portable"),
                "ours_ref": ours_runner(layer, x, "ref"),
                "litert_builtin": litert_runner(fb, x, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES),
                "litert_xnnpack": litert_runner(fb, x, OpResolverType.AUTO),
                "litert_builtin_ref": litert_runner(fb, x, OpResolverType.BUILTIN_REF),
            }
            tflm, tflm_note = tflm_runner(fb, x)
            if tflm is not None:
                impls["tflm_ref"] = tflm
            ref_out = None
            exact = {}
            for k, fn in impls.items():
                fn()
                out = np.asarray(fn.output()).reshape(-1)
                if k == "litert_builtin_ref":
                    ref_out = out
                exact[k] = out
            exact = {k: int(np.sum(v != ref_out)) for k, v in exact.items()}
            samples = {k: [] for k in impls}
            for _ in range(rounds):
                for k, fn in impls.items():
                    samples[k].append(time_call(fn, args.min_time))
            us = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
            o, kh, kw, i = layer.shape
            row = dict(layer=name, kind=kind, bits=bits, granularity=layer.granularity,
                       macs=int(np.prod(layer(x if kind == "conv" else x.reshape(1, -1)).shape[1:-1] or [1]) * o * kh * kw * i),
                       int8_weight_bytes=int(o * kh * kw * i), packed_code_bytes=int(layer.codes.nbytes),
                       magnitude_bytes=int(layer.mag.nbytes), us=us,
                       mismatches_vs_builtin_ref=exact)
            row["speed_vs"] = {k: us[k] / us["ours_opt"] for k in us if k != "ours_opt"}
            results.append(row)
            print(f"\n{name}  {'binary' if bits == 1 else 'ternary'} ({layer.granularity}), "
                  f"{row['macs'] / 1e6:.1f} MMAC, weights {row['packed_code_bytes']}+{row['magnitude_bytes']} B "
                  f"vs int8 {row['int8_weight_bytes']} B ({row['int8_weight_bytes'] / row['packed_code_bytes']:.1f}x)")
            for k in impls:
                print(f"  {k:20s} {us[k]:10.1f} us   {us[k] / us['ours_opt']:6.2f}x ours_opt   "
                      f"outputs != builtin_ref: {exact[k]}")
    meta = dict(machine=platform.machine(), processor=platform.processor(), **cpu, cpus=os.cpu_count(),
                simd_level=K.simd_level(), rounds=rounds, timer="time.thread_time (CPU time of the calling thread)",
                load_average_start=load_start, load_average_end=list(os.getloadavg()),
                baseline_lib=args.baseline_lib, tflm=tflm_note or "tflite-micro runtime (reference int8 kernels)")
    try:
        import tflite_micro
        meta["tflm_version"] = getattr(tflite_micro.python.tflite_micro._version, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    write_json(args.out, dict(meta=meta, results=results), indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
