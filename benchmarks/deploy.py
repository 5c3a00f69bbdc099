"""Deployment benchmark: the demo CNN at W1 and W2 exported for every target, measured in one run.

Models (``build_cnn`` of syq_tf.recipes, the demo's CNN, SYQ channel granularity, DoReFa
activations): W1A8 and W2A8 (binary / ternary weights), and, when ``"lce"`` is a target, a W1A1
variant (DoReFa(1) inputs of the binary layers, which LCE's LceBconv2d needs and which the int8
targets export too). A short training on a subset of Fashion-MNIST (``syq_tf.data``, by default
one float epoch on 8000 images, then one quantized epoch per model): this benchmark measures size,
memory and latency; its accuracies are not the models' best.

Per model and target -- litert int8, litert int4 and int2 (``weights="int4"`` / ``"int2"``), tflm (LUT-compressed), lce
(the layers it cannot pack stored int8, the default, and float32) -- it records the model bytes,
the low-bit weight bytes stored against the theoretical minimum ``sum(ceil(bits x weights / 8) +
4 x scales)`` (the export report's ``low_bit_totals``; for lce every quantized layer, and the
packed ones on their own), the TFLite Micro tensor arena, and per runtime the single-thread latency of
one image and the top-1 agreement with Keras on test images:

* LiteRT (ai-edge-litert) with its default XNNPACK delegate and with the builtin kernels
  (``num_threads=1``), on the int8, int4 and int2 models;
* TFLite Micro (tflite-micro's Python runtime, the LUT-compressed model);
* our packed kernels (``syq_tf.kernels.TFLiteRunner``) on the int8 model;
* LCE's interpreter (x86: LCE's reference kernels, not its ARM-optimized ones).

Latency: every runtime is prepared once, then timed round-robin (all runtimes interleaved, so a
busy shared machine slows them alike), median over rounds of the CPU time of the calling thread
(``time.thread_time``; every runtime here runs single-threaded in that thread).

    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/deploy.py [--quick]

Writes benchmarks/results/deploy.json.
"""

import argparse
import pathlib
import platform
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/machine.py, also when imported by path
from machine import write_json  # noqa: E402

import numpy as np

import syq_tf  # noqa: F401  (first: selects Keras 2)
import tensorflow as tf

from syq_tf import recipes
from syq_tf.data import fashion_mnist_dataset, load_fashion_mnist
from syq_tf.export import TARGETS, to_tflite
from syq_tf.export.lce_format import import_lce
from syq_tf.export.runtime import litert_interpreter
from syq_tf.export import int8 as int8_stage
from syq_tf.export import tflm as tflm_mod

ROOT = pathlib.Path(__file__).resolve().parent.parent


def train_models(args):
    """The demo's CNN in float, then fine-tuned to each variant (syq_tf.recipes)."""
    train = fashion_mnist_dataset("train", 128, limit=args.train_limit, shuffle_seed=0)
    float_model = recipes.build_cnn(None)
    recipes.compile_model(float_model, 1e-3)
    float_model.fit(train, epochs=args.float_epochs, verbose=0)
    variants = [("W1A8", 1, 8), ("W2A8", 2, 8)]
    try:
        import_lce()
        variants.append(("W1A1", 1, 1))
    except ModuleNotFoundError as err:  # no wheel on Python 3.13
        print(f"  W1A1 (target lce) skipped: {err}", flush=True)
    models = {}
    for name, bits, act_bits in variants:
        t0 = time.time()
        model = recipes.build_cnn(bits, "channel", act_bits)
        recipes.finetune_from_float(model, float_model, train, args.quant_epochs, verbose=0)
        models[name] = model
        print(f"  trained {name} in {time.time() - t0:.0f} s", flush=True)
    return models


def low_bit(result):
    """(stored bytes, minimum bytes) of the low-bit weights, from the export report."""
    if result.target == "lce":  # packed layers and the quantized layers LCE cannot pack (int8 / float32)
        quantized = [r for r in result.layers if r.quantizer != "float"]
        return sum(r.stored_bytes for r in quantized), sum(r.min_bytes for r in quantized)
    t = result.low_bit_totals()
    return t["stored_bytes"], t["min_bytes"]


# ---- runtimes: (prepare once) -> run one int8 / float image --------------------------------------


def litert_run(buffer, kernels, x_row):
    it = litert_interpreter(buffer, kernels, num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.set_tensor(inp["index"], x_row)

    def run():
        it.invoke()

    def batch(xq):
        it.resize_tensor_input(inp["index"], list(xq.shape))
        it.allocate_tensors()
        it.set_tensor(inp["index"], xq)
        it.invoke()
        y = it.get_tensor(out["index"]).reshape(len(xq), -1)
        it.resize_tensor_input(inp["index"], list(x_row.shape))
        it.allocate_tensors()
        it.set_tensor(inp["index"], x_row)
        return y

    return run, batch


def tflm_run(buffer, x_row):
    it = tflm_mod.tflm_interpreter(buffer)
    it.set_input(x_row, 0)

    def run():
        it.invoke()

    return run, lambda xq: tflm_mod.tflm_predict_int8(buffer, xq)


def ours_run(buffer, x_row):
    from syq_tf.kernels import TFLiteRunner

    runner = TFLiteRunner(buffer)

    def run():
        runner(x_row)

    return run, lambda xq: np.asarray(runner(xq)).reshape(len(xq), -1)


def lce_run(buffer, x_row_float):
    Interpreter = import_lce("larq_compute_engine.tflite.python.interpreter").Interpreter
    it = Interpreter(bytes(buffer), num_threads=1)

    def run():
        it.predict(x_row_float)

    return run, lambda x: np.asarray(it.predict(x)).reshape(len(x), -1)


def time_round_robin(runners, rounds, min_time):
    """Median seconds per call of every runner, timed interleaved."""
    samples = {k: [] for k in runners}
    reps = {}
    for k, fn in runners.items():  # warm up, and calls per sample so one takes >= min_time
        fn()
        n, t = 1, 0.0
        while True:
            t0 = time.thread_time()
            for _ in range(n):
                fn()
            t = time.thread_time() - t0
            if t >= min_time or n >= 256:
                break
            n *= 2
        reps[k] = n
    for _ in range(rounds):
        for k, fn in runners.items():
            t0 = time.thread_time()
            for _ in range(reps[k]):
                fn()
            samples[k].append((time.thread_time() - t0) / reps[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-limit", type=int, default=8000, help="training images (of 60000)")
    ap.add_argument("--float-epochs", type=int, default=1)
    ap.add_argument("--quant-epochs", type=int, default=1)
    ap.add_argument("--verify", type=int, default=500, help="test images for the Keras-vs-runtime agreement")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per timing sample")
    ap.add_argument("--quick", action="store_true", help="2000 training images, 200 test images, 3 rounds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deploy.json"))
    args = ap.parse_args()
    if args.quick:
        args.train_limit, args.verify, args.rounds = 2000, 200, 3
    started = time.time()
    tf.keras.utils.set_random_seed(0)
    x_train, _ = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    rep = x_train[:200]
    xv, yv = x_test[: args.verify], y_test[: args.verify]

    print(f"== training (float {args.float_epochs} epoch(s), then 1 quantized epoch per model, "
          f"{args.train_limit} images)", flush=True)
    models = train_models(args)

    print("== exports", flush=True)
    rows, runners, checks = [], {}, {}
    for name, model in models.items():
        keras_out = model.predict(xv, batch_size=256, verbose=0)
        keras_top1 = keras_out.argmax(-1)
        keras_acc = float(np.mean(keras_top1 == yv))
        exports = []
        targets = [("litert", "int8"), ("litert", "int4"), ("litert", "int2"), ("tflm", "int8")]
        if name == "W1A1":
            targets = [("lce", "int8"), ("lce", "float32")] + targets
        for target, weights in targets:
            t0 = time.time()
            try:
                kwargs = {"weights": weights} if weights != "int8" else {}
                result = to_tflite(model, rep, target=target, **kwargs)
            except (ValueError, RuntimeError) as err:
                print(f"  {name} {target}: export failed: {err}", flush=True)
                rows.append({"model": name, "target": target, "weights": weights, "error": str(err)})
                continue
            exports.append((target, weights, result))
            print(f"  {name} {target} {weights}: {result.model_bytes} bytes ({time.time() - t0:.0f} s)", flush=True)
        x_row_q = None
        for target, weights, result in exports:
            stored, minimum = low_bit(result)
            label = target if target == "tflm" else f"{target} {weights}"
            base = {"model": name, "target": label, "model_bytes": result.model_bytes,
                    "low_bit_stored_bytes": stored, "low_bit_min_bytes": minimum,
                    "stored_over_min": round(stored / minimum, 4) if minimum else None,
                    "arena_bytes": getattr(result, "arena_bytes", None), "keras_accuracy": keras_acc}
            if target == "lce":
                t = result.totals()
                base.update({"packed_layers": t["packed_layers"], "packed_stored_bytes": t["packed_stored_bytes"],
                             "packed_min_bytes": t["packed_min_bytes"], "int8_layers": t["int8_layers"],
                             "float32_layers": t["float32_layers"]})
            if target == "lce":
                kinds = {"lce interpreter": lce_run(result.flatbuffer, xv[:1])}
            else:
                if x_row_q is None:
                    xq_all = int8_stage.quantize_input(xv, *int8_stage.input_quantization(result.flatbuffer))
                    x_row_q = xq_all[:1]
                if target == "tflm":
                    kinds = {"tflm": tflm_run(result.flatbuffer, x_row_q)}
                else:
                    kinds = {"litert xnnpack": litert_run(result.flatbuffer, "xnnpack", x_row_q),
                             "litert builtin": litert_run(result.flatbuffer, "builtin", x_row_q)}
                    if weights == "int8":
                        kinds["ours packed kernels"] = ours_run(result.flatbuffer, x_row_q)
            for runtime, (run, batch) in kinds.items():
                key = f"{name} | {label} | {runtime}"
                runners[key] = run
                out = batch(xv if target == "lce" else xq_all)
                top1 = out.argmax(-1)
                rows.append({**base, "runtime": runtime, "key": key,
                             "top1_agreement": float(np.mean(top1 == keras_top1)),
                             "runtime_accuracy": float(np.mean(top1 == yv))})
            if target == "litert" and weights in ("int4", "int2"):
                checks.setdefault(name, {})[weights] = {
                    "layers": {r.layer: {"storage": r.storage, "stored_bytes": r.stored_bytes, "min_bytes": r.min_bytes,
                                         "stored_over_min": round(r.stored_bytes / r.min_bytes, 4)}
                               for r in result.layers if r.storage in ("int4", "int2")},
                    "notes": result.notes}

    print(f"== latency: {len(runners)} runtimes, {args.rounds} rounds, interleaved", flush=True)
    latency = time_round_robin(runners, args.rounds, args.min_time)
    for row in rows:
        if "key" in row:
            row["latency_ms"] = round(1e3 * latency[row.pop("key")], 3)

    head = (f"{'model':<6}{'target':<13}{'runtime':<21}{'model B':>9}{'low-bit B':>11}{'min B':>9}"
            f"{'ratio':>7}{'arena B':>9}{'ms/img':>9}{'agree':>7}{'acc':>7}{'keras':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<6}{r['target']:<13}export failed: {r['error'][:90]}")
            continue
        ratio = "-" if r["stored_over_min"] is None else f"{r['stored_over_min']:.3f}"
        lines.append(f"{r['model']:<6}{r['target']:<13}{r['runtime']:<21}{r['model_bytes']:>9}"
                     f"{r['low_bit_stored_bytes']:>11}{r['low_bit_min_bytes']:>9}{ratio:>7}"
                     f"{r['arena_bytes'] or '-':>9}{r['latency_ms']:>9.2f}{r['top1_agreement']:>7.3f}"
                     f"{r['runtime_accuracy']:>7.3f}{r['keras_accuracy']:>7.3f}")
    print("\n".join(lines))
    elapsed = time.time() - started
    print(f"total {elapsed:.0f} s")
    out = {
        "what": __doc__.split("\n\n")[0],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0]},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "targets": list(TARGETS),
        "minimum": "sum over quantized layers of ceil(bits x weights / 8) + 4 bytes per float32 scale",
        "latency": "median CPU time of the calling thread per single-image invoke, runtimes interleaved, num_threads=1",
        "rows": rows,
        "packed": checks,
        "table": lines,
        "seconds": round(elapsed),
    }
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
