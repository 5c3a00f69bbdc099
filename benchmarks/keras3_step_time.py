"""Training step time of every quantizer under Keras 3 against the same model under Keras 2.

One model-building function (:func:`build_model`, given the ``keras`` module and the ``syq``
module of a frontend) builds the benchmark CNN of ``benchmarks/step_time.py`` (syq_tf.recipes'
demo CNN: four 3x3 convs and a dense layer, first conv and last dense with float weights) with
``syq.quantize`` layers, in either frontend: Keras 2 (``import syq_tf``, tf_keras) or Keras 3
(``import syq_tf.keras3``, the TensorFlow backend). The two never share a process, so each
measurement is a subprocess (``--worker 2`` / ``--worker 3``) that builds every model, warms each up
(3 ``train_on_batch`` steps: tracing and the optimizer's build excluded), then times them in
interleaved rounds and prints the per-model median step. The parent runs the two frontends in
alternation (K2, K3, K2, K3, ...: the shared machine's noise hits both alike) and reports, per
quantizer, the median over all of a frontend's runs and the ratio K3 / K2 (goal: at most 1.1).
Both sides: the same data (the first batch of Fashion-MNIST's training images), the same seed,
``jit_compile=False`` (Keras 3's "auto" is False on a CPU-only machine, tf_keras' default too),
``steps_per_execution=1``, Adam (LossAwareAdam for the loss-aware rows), sparse categorical
cross-entropy on logits and an accuracy metric.

    .venv/bin/python benchmarks/keras3_step_time.py [--pairs 3] [--rounds 2] [--steps 3] [--threads 1]
    .venv/bin/python benchmarks/keras3_step_time.py --quick      # a few quantizers, a tiny model

Writes ``benchmarks/results/keras3_step_time.json`` (``--quick``: ``keras3_step_time_quick.json``)
and prints a Markdown table (the README's).
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

from machine import cpu_name, write_json  # benchmarks/machine.py (this script's folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MARK = "KERAS3_STEP_TIME_RESULT "

# (row name, spec). Spec keys: conv / dense (weight quantizer of the quantized convs / of fc1: a
# (class name, args, kwargs) triple), act (input quantizer of every quantized layer), la (train with
# LossAwareAdam), calibrate (UniQ activation steps).
SYQ_ROWS = [(f"SYQ W{b}A8 {g}", dict(conv=("SYQ", (b, g), {}), dense=("SYQ", (b, "layer"), {}),
                                      act=("DoReFa", (8,), {})))
            for b in (2, 1) for g in ("layer", "row", "pixel", "channel")]
UNIQ_ROWS = [(f"UniQ W{b}A{a}", dict(conv=("UniQ", (b, "channel"), {}), dense=("UniQ", (b, "channel"), {}),
                                      act=("UniQActivation", (a,), {}), calibrate=True))
             for b, a in ((2, 2), (4, 4))]
LS_WEIGHT_ROWS = [(f"LS W {m}, A8 DoReFa", dict(conv=("LeastSquares", (m,), {}), dense=("LeastSquares", (m,), {}),
                                                act=("DoReFa", (8,), {})))
                  for m in ("ls1", "ls2", "lsT", "gf3")]
LS_ACT_ROWS = [(f"LS W ls1, A {m}", dict(conv=("LeastSquares", ("ls1",), {}), dense=("LeastSquares", ("ls1",), {}),
                                         act=("LeastSquaresActivation", (m,), {})))
               for m in ("ls1", "lsT", "gf2", "ls2")]
LA_ROWS = [(f"LA {label} A8", dict(conv=("LossAware", (m,), kw), dense=("LossAware", (m,), kw),
                                   act=("DoReFa", (8,), {}), la=True))
           for label, m, kw in (("LAB W1", "binary", {}), ("LAT W2", "ternary", {}),
                                ("LAT-exact W2", "ternary_exact", {}), ("LAT2 W2", "ternary_two_scale", {}),
                                ("LAQ W3", "linear", {"bits": 3}), ("LAQ-log W3", "log", {"bits": 3}))]
DOREFA_ROWS = [("DoReFa A8, float W", dict(act=("DoReFa", (8,), {})))]
CONFIGS = ([("float", {})] + SYQ_ROWS + UNIQ_ROWS + LS_WEIGHT_ROWS + LS_ACT_ROWS + LA_ROWS + DOREFA_ROWS)
QUICK = ("float", "SYQ W2A8 pixel", "LA LAT W2 A8")

DEMO_WIDTHS = (32, 32, 64, 64, 128)  # syq_tf.recipes.DEMO_WIDTHS (not imported: that module is Keras 2 only)
QUICK_WIDTHS = (4, 4, 8, 8, 16)


def build_model(keras, syq, spec, widths=DEMO_WIDTHS, input_shape=(28, 28, 1), classes=10, batchnorm=True):
    """The benchmark CNN (syq_tf.recipes.build_cnn's layers) for either frontend, with ``syq.quantize``
    layers: ``keras`` is tf_keras (under ``import syq_tf``) or Keras 3 (under ``import syq_tf.keras3``),
    ``syq`` the matching frontend module. Float weights in the first conv and the logits (the papers'),
    ReLU unless the next layer has an input quantizer (which clips). BatchNormalization: tf_keras'
    under Keras 2 (fused); under Keras 3 ``syq.FusedBatchNormalization`` (what ``quantize_model``
    puts in place of Keras's), ``batchnorm="stock"`` Keras 3's own (not fused on the TensorFlow
    backend); ``batchnorm=False``: a linear activation where each BatchNormalization was."""
    Q = syq.quantizers

    def make(role):
        entry = spec.get(role)
        if entry is None:
            return None
        name, args, kwargs = entry
        return getattr(Q, name)(*args, **kwargs)

    quantized = bool(spec)
    has_act = spec.get("act") is not None

    def act():
        return [] if has_act else [keras.layers.ReLU()]

    def quantize(layer, role=None):
        kernel = make(role) if role else None
        inputs = make("act")
        if kernel is None and inputs is None:
            return layer
        return syq.quantize(layer, **({"kernel_quantizer": kernel} if kernel is not None else {}),
                            **({"input_quantizer": inputs} if inputs is not None else {}))

    def conv(filters, name):
        return quantize(keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name), "conv")

    def bn(name):
        if not batchnorm:
            return keras.layers.Activation("linear", name=name)
        stock = batchnorm == "stock" or not hasattr(syq, "FusedBatchNormalization")
        return (keras.layers.BatchNormalization if stock else syq.FusedBatchNormalization)(momentum=0.9, name=name)

    c1, c2, c3, c4, d = (int(w) for w in widths)
    layers = [
        keras.Input(input_shape),
        keras.layers.Conv2D(c1, 3, padding="same", use_bias=False, name="conv1"),
        bn("bn1"), *act(),
        conv(c2, "conv2"), keras.layers.MaxPool2D(), bn("bn2"), *act(),
        conv(c3, "conv3"), bn("bn3"), *act(),
        conv(c4, "conv4"), keras.layers.MaxPool2D(), bn("bn4"), *act(),
        keras.layers.Flatten(),
        quantize(keras.layers.Dense(d, use_bias=False, name="fc1"), "dense"), bn("bn5"), *act(),
        quantize(keras.layers.Dense(classes, name="logits")),  # float weights, quantized input
    ]
    model = keras.Sequential(layers, name="quantized_cnn" if quantized else "float_cnn")
    optimizer = syq.LossAwareAdam(1e-3) if spec.get("la") else keras.optimizers.Adam(1e-3)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False, steps_per_execution=1)
    return model


def _data(batch_size, shape=(28, 28, 1)):
    """The first ``batch_size`` Fashion-MNIST training images (synthetic ones, seeded, if the local
    files are missing; the JSON says which)."""
    import numpy as np

    from syq_tf.data import load_fashion_mnist

    try:
        x, y = load_fashion_mnist("train")
        return x[:batch_size], y[:batch_size], "fashion-mnist train[:batch]"
    except (OSError, ValueError):
        rng = np.random.default_rng(0)
        return (rng.uniform(0, 1, (batch_size, *shape)).astype(np.float32), rng.integers(0, 10, batch_size),
                "synthetic uniform (Fashion-MNIST not found)")


def worker(args):
    """One frontend in this process: build every requested model, warm up, time in rounds."""
    if args.worker == 2:
        import syq_tf as syq  # first: selects Keras 2

        import tensorflow as tf

        import tf_keras

        keras, version = tf.keras, f"tf_keras {tf_keras.__version__}"
    else:
        import syq_tf.keras3 as syq  # first: selects Keras 3

        import keras
        import tensorflow as tf

        version = f"keras {keras.__version__}"
    import numpy as np

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    names = args.rows.split("\n")
    specs = dict(CONFIGS)
    widths = QUICK_WIDTHS if args.tiny else DEMO_WIDTHS
    x, y, data = _data(args.batch_size)
    x, y = tf.constant(x), tf.constant(y)
    models = {}
    build_start = time.perf_counter()
    for name in names:
        keras.utils.set_random_seed(0)
        model = build_model(keras, syq, specs[name], widths,
                            batchnorm=False if args.no_batchnorm else "stock" if args.stock_batchnorm else True)
        if specs[name].get("calibrate"):
            syq.calibrate(model, x.numpy(), batches=1)
        for _ in range(args.warmup):  # tracing, the optimizer's build, first-step costs
            model.train_on_batch(x, y)
        models[name] = model
    build_s = time.perf_counter() - build_start
    # One more untimed step of every model once all are built: a model's first step after the later
    # models were built is several times slower (seen in both frontends), whatever its own warm-up.
    for model in models.values():
        model.train_on_batch(x, y)
    samples = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                model.train_on_batch(x, y)
            samples[name].append((time.perf_counter() - start) / args.steps)
            cpu[name].append((time.process_time() - start_cpu) / args.steps)
    print(MARK + json.dumps({
        "frontend": args.worker, "keras": version, "tensorflow": tf.__version__,
        "build_and_warmup_s": build_s, "data": data,
        "median_step_s": {name: float(np.median(s)) for name, s in samples.items()}, "samples_s": samples,
        "cpu_samples_s": cpu,
    }), flush=True)


def run_worker(frontend, args, names):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_USE_LEGACY_KERAS", None)  # each frontend selects its Keras itself
    env.pop("KERAS_BACKEND", None)
    command = [sys.executable, os.path.abspath(__file__), "--worker", str(frontend), "--rows", "\n".join(names),
               "--rounds", str(args.rounds), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)] + (["--tiny"] if args.tiny else []) \
        + (["--no-batchnorm"] if args.no_batchnorm else []) + (["--stock-batchnorm"] if args.stock_batchnorm else [])
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"Keras {frontend} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def markdown_table(rows):
    lines = ["| quantizer | Keras 2 ms / step | Keras 3 ms / step | K3 / K2 | per pair | K3 / K2 CPU time "
             "| quantizer's own cost K3 / K2 |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        pairs = ", ".join(f"{r:.2f}" for r in row["pair_ratios"])
        own = row["own_cost_ratio"]
        lines.append(f"| {row['model']} | {1000 * row['keras2_step_s']:.1f} | {1000 * row['keras3_step_s']:.1f} | "
                     f"{row['ratio']:.2f} | {pairs} | {row['cpu_ratio']:.2f} | "
                     f"{'–' if own is None else f'{own:.2f}'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3, help="Keras 2 / Keras 3 subprocess pairs, run alternately")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds per subprocess (all models each round)")
    p.add_argument("--steps", type=int, default=3, help="training steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (tracing included)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1,
                   help="TensorFlow intra- and inter-op threads of each subprocess (0: TensorFlow's default). One "
                        "by default: on a shared machine, multi-threaded ops wait on preempted threads")
    p.add_argument("--only", default=None, help="regular expression: time only the matching rows (float always)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: rows {', '.join(QUICK)}; tiny model, batch 16, 1 pair, 2 warm-up steps, 3 rounds of 2 steps")
    p.add_argument("--tiny", action="store_true", help=f"widths {QUICK_WIDTHS} instead of {DEMO_WIDTHS}")
    p.add_argument("--no-batchnorm", action="store_true",
                   help="a linear activation instead of each BatchNormalization (JSON: *_no_bn.json)")
    p.add_argument("--stock-batchnorm", action="store_true",
                   help="Keras 3's own BatchNormalization instead of syq_tf.keras3.FusedBatchNormalization "
                        "(JSON: *_stock_bn.json)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--worker", type=int, choices=(2, 3), help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.tiny, args.pairs, args.rounds, args.steps, args.warmup, args.batch_size = True, 1, 3, 2, 2, 16
    names = [name for name, _ in CONFIGS
             if name == "float" or ((not args.quick or name in QUICK) and (not args.only or re.search(args.only, name)))]
    start = time.perf_counter()
    runs = {2: [], 3: []}
    for pair in range(args.pairs):
        for frontend in (2, 3):
            result = run_worker(frontend, args, names)
            runs[frontend].append(result)
            print(f"pair {pair + 1}/{args.pairs}: Keras {frontend} done ({time.perf_counter() - start:.0f} s; "
                  f"build + warm-up {result['build_and_warmup_s']:.0f} s)", flush=True)
    rows = []

    def pooled(frontend, name, key="samples_s"):
        return [v for run in runs[frontend] for v in run[key][name]]

    float_wall = {f: statistics.median(pooled(f, "float")) for f in (2, 3)}
    for name in names:
        k2, k3 = pooled(2, name), pooled(3, name)
        m2, m3 = statistics.median(k2), statistics.median(k3)
        c2, c3 = statistics.median(pooled(2, name, "cpu_samples_s")), statistics.median(pooled(3, name, "cpu_samples_s"))
        pair_ratios = [b["median_step_s"][name] / a["median_step_s"][name] for a, b in zip(runs[2], runs[3])]
        # what the quantizers add to the float model's step, in each frontend (None when too close to noise)
        own2, own3 = m2 - float_wall[2], m3 - float_wall[3]
        own = own3 / own2 if name != "float" and own2 > 0.05 * float_wall[2] else None
        rows.append({"model": name, "keras2_step_s": m2, "keras3_step_s": m3, "ratio": m3 / m2,
                     "pair_ratios": pair_ratios, "keras2_cpu_s": c2, "keras3_cpu_s": c3, "cpu_ratio": c3 / c2,
                     "keras2_own_s": own2, "keras3_own_s": own3, "own_cost_ratio": own,
                     "keras2_samples_s": k2, "keras3_samples_s": k3,
                     "keras2_cpu_samples_s": pooled(2, name, "cpu_samples_s"),
                     "keras3_cpu_samples_s": pooled(3, name, "cpu_samples_s")})
    table = markdown_table(rows)
    print(table)
    slow = [r["model"] for r in rows if r["ratio"] > 1.1]
    print("K3 / K2 above 1.1: " + (", ".join(slow) if slow else "none"))
    os.makedirs(args.out, exist_ok=True)
    stem = "keras3_step_time_quick" if args.quick else ("keras3_step_time_subset" if args.only else "keras3_step_time")
    path = os.path.join(args.out, stem + ("_no_bn" if args.no_batchnorm else "_stock_bn" if args.stock_batchnorm
                                          else "") + ".json")
    write_json(path, {"cpu": cpu_name(detail=True), "cpus": os.cpu_count(), "machine": platform.platform(),
               "python": platform.python_version(),
               "tensorflow": runs[3][0]["tensorflow"], "keras3": runs[3][0]["keras"], "keras2": runs[2][0]["keras"],
               "data": runs[2][0]["data"], "widths": QUICK_WIDTHS if args.tiny else DEMO_WIDTHS,
               "batch_size": args.batch_size, "pairs": args.pairs, "rounds": args.rounds, "steps": args.steps,
               "warmup": args.warmup, "threads": args.threads,
               "batchnorm": "none" if args.no_batchnorm else "Keras 3's own" if args.stock_batchnorm
               else "syq_tf.keras3.FusedBatchNormalization under Keras 3", "order": "K2, K3 alternating, one subprocess each",
               "wall_s": time.perf_counter() - start, "above_1.1": slow, "rows": rows})
    print(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()
