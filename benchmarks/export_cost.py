"""Export cost (issue 23): ``to_tflite`` on ResNet50 (64x64x3 inputs, 10 classes, no pretrained
weights, ``quantize_model(scheme="syq-w2a8")``, Keras 2 frontend) against TensorFlow's own float
conversion of the same network, measured in one run.

Timed (wall seconds, ``time.perf_counter``): TF's float TFLite conversion of the float ResNet50;
``to_tflite(target="litert")``; ``to_tflite(target="tflm")`` with a breakdown -- conversion (TF's
int8 converter, ``syq_tf.export.convert.int8``), codebook checks (the rest of the int8 stage:
bias and codebook rewrites, reading the weights back and comparing them with the Keras codebooks),
compression (``syq_tf.export.tflm.compress``: LUT encoding, the DECODE graph, the flatbuffer, and
decoding every tensor back), TFLM checks (the rest of ``tflm.finish``: both models run in the
TFLite Micro interpreter, arena measured). For the before/after of the compression step, TFLM's own
Python compressor (``tflite_micro...compression.compress``, what ``tflm.compress`` called before)
is timed on the same int8 model and the same tensors. Ratios are to the float conversion of this
run, timed first and last and averaged (the machine is shared: absolute seconds vary between runs,
ratios less); process CPU seconds (``time.process_time``, all threads) are recorded too, less
sensitive to other jobs than wall time.

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/export_cost.py

Writes benchmarks/results/export_cost.json.
"""

import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/machine.py, also when imported by path
from machine import write_json  # noqa: E402

import syq_tf  # noqa: I001  (before TensorFlow: the Keras 2 frontend)
import numpy as np
import tensorflow as tf

from syq_tf.export import convert, flatbuffer, int8, tflm

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "export_cost.json")


class Stopwatch:
    """Wraps module functions; accumulates their wall seconds (and process CPU seconds, in
    ``cpu``) by label."""

    def __init__(self):
        self.seconds, self.cpu, self._saved = {}, {}, []

    def wrap(self, module, name, label):
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.cpu[label] = self.cpu.get(label, 0.0) + time.process_time() - cpu

        self._saved.append((module, name, original))
        setattr(module, name, timed)

    def restore(self):
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved = []


def timed(fn):
    """(fn(), wall seconds, process CPU seconds)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def float_conversion(model):
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def tflm_compressor(model, buffer):
    """TFLM's Python compressor on the tensors syq_tf compresses (the code path before issue 23)."""
    from tflite_micro.tensorflow.lite.micro.compression import compress as tflm_compress  # noqa: PLC0415
    from tflite_micro.tensorflow.lite.micro.compression import spec  # noqa: PLC0415

    specs = []
    for report, tensor, axis in tflm._plan(model, buffer):
        if tensor is not None:
            mode = spec.PerTensor() if axis is None else spec.PerChannel(axis)
            specs.append(spec.Tensor(0, tensor.tensor_index, [spec.LookUpTableCompression(report.bits, mode)]))
    return bytes(tflm_compress(buffer, specs))


def main():
    tf.keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).uniform(0, 1, (64, 64, 64, 3)).astype(np.float32)
    float_model = tf.keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
    _, float_first, float_first_cpu = timed(lambda: float_conversion(float_model))
    print(f"float conversion: {float_first:.1f} s", flush=True)
    model = syq_tf.quantize_model(float_model, scheme="syq-w2a8")
    model(x[:2])

    watch = Stopwatch()
    watch.wrap(convert, "int8", "conversion")
    _, litert_s, litert_cpu = timed(lambda: syq_tf.export.to_tflite(model, x, target="litert"))
    litert_conversion = watch.seconds.pop("conversion")
    watch.cpu.pop("conversion")
    print(f"litert: {litert_s:.1f} s (conversion {litert_conversion:.1f} s)", flush=True)

    watch.wrap(int8, "build", "int8 stage")
    watch.wrap(int8, "result", "codebook report")
    watch.wrap(tflm, "compress", "compression")
    watch.wrap(tflm, "finish", "finish")
    result, tflm_s, tflm_cpu = timed(lambda: syq_tf.export.to_tflite(model, x, target="tflm"))
    watch.restore()

    def parts(s, total):
        out = {
            "conversion": s["conversion"],
            "codebook_checks": s["int8 stage"] - s["conversion"] + s["codebook report"],
            "compression": s["compression"],
            "tflm_checks": s["finish"] - s["compression"],
        }
        out["other"] = total - sum(out.values())
        return out

    breakdown, breakdown_cpu = parts(watch.seconds, tflm_s), parts(watch.cpu, tflm_cpu)
    print(f"tflm: {tflm_s:.1f} s " + ", ".join(f"{k} {v:.1f} s" for k, v in breakdown.items()), flush=True)

    theirs, theirs_s, theirs_cpu = timed(lambda: tflm_compressor(model, bytes(result.uncompressed)))
    print(f"TFLM's compressor on the same model: {theirs_s:.1f} s ({len(theirs)} bytes; syq_tf's "
          f"{result.model_bytes} bytes)", flush=True)
    before_s = tflm_s - breakdown["compression"] + theirs_s
    before_cpu = tflm_cpu - breakdown_cpu["compression"] + theirs_cpu
    # the float conversion again: the shared machine's load drifts; ratios use the mean of both
    _, float_last, float_last_cpu = timed(lambda: float_conversion(float_model))
    float_s, float_cpu = (float_first + float_last) / 2, (float_first_cpu + float_last_cpu) / 2
    print(f"float conversion again: {float_last:.1f} s", flush=True)
    same = {  # the two compressors' files: the same ops, and every tensor encoded to the same bytes
        "op_sequence": flatbuffer.op_names(theirs) == flatbuffer.op_names(result.flatbuffer),
        "decode_pairs": tflm.decode_pairs(theirs) == tflm.decode_pairs(result.flatbuffer),
    }
    print(f"same as TFLM's compressor: {same}", flush=True)
    out = {
        "model": "ResNet50 (keras.applications, weights=None) 64x64x3, 10 classes, quantize_model syq-w2a8, Keras 2",
        "representative_examples": len(x),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "tensorflow": tf.__version__,
        "seconds": {
            "float_conversion_first_last": [float_first, float_last],
            "float_conversion": float_s,
            "litert": litert_s,
            "litert_conversion": litert_conversion,
            "tflm": tflm_s,
            "tflm_breakdown": breakdown,
            "tflm_compression_with_tflms_compressor": theirs_s,
            "tflm_before_estimate": before_s,
        },
        "cpu_seconds": {
            "float_conversion_first_last": [float_first_cpu, float_last_cpu],
            "float_conversion": float_cpu,
            "litert": litert_cpu,
            "tflm": tflm_cpu,
            "tflm_breakdown": breakdown_cpu,
            "tflm_compression_with_tflms_compressor": theirs_cpu,
            "tflm_before_estimate": before_cpu,
        },
        "ratio_to_float_conversion": {
            "litert": litert_s / float_s,
            "tflm": tflm_s / float_s,
            "tflm_before_estimate": before_s / float_s,
            "tflm_compression": breakdown["compression"] / float_s,
            "tflm_compression_with_tflms_compressor": theirs_s / float_s,
        },
        "cpu_ratio_to_float_conversion": {
            "litert": litert_cpu / float_cpu,
            "tflm": tflm_cpu / float_cpu,
            "tflm_before_estimate": before_cpu / float_cpu,
        },
        "compression_speedup": theirs_s / breakdown["compression"],
        "bytes": {"int8": len(result.uncompressed), "tflm_syq_tf": result.model_bytes,
                  "tflm_tflms_compressor": len(theirs)},
        "compressed_tensors": sum(r.compressed for r in result.compression),
        "same_as_tflms_compressor": same,
        "note": ("tflm_before_estimate: the tflm export of this run with its compression step replaced by "
                 "TFLM's compressor timed on the same model (the export before issue 23 called it)."),
    }
    print(json.dumps({k: out[k] for k in ("ratio_to_float_conversion", "cpu_ratio_to_float_conversion")}, indent=1),
          flush=True)
    write_json(OUT, out, indent=1)


if __name__ == "__main__":
    main()
