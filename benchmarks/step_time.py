"""Training step time of every quantizer relative to the same float CNN, measured side by side.

The demo CNN (syq_tf.recipes.build_cnn, as in examples/fashion_mnist_syq.py) with SYQ, UniQ, least-squares and loss-aware
quantizers; the least-squares activations (an exact per-sample search for ls2/lsT) and the
loss-aware projection (inside LossAwareAdam's step: the exact LAT search or the LAT / LAT2 / LAQ
alternation on every kernel) are the ones to watch. Where the compiled ops of
syq_tf.quantizers.native run, those searches use them; ``--without-native`` also times the same
models on the TensorFlow functions.

All models are built first; then rounds interleave them (each round times a few steps of every
model) so that the shared machine's noise hits all alike. Prints a table and writes JSON.

    .venv/bin/python benchmarks/step_time.py [--rounds 8] [--steps 10] [--out benchmarks/results]
    .venv/bin/python benchmarks/step_time.py --arch mlp     # the loss-aware papers' 2048-wide MLP

``--arch mlp`` times the MLP 784-2048-2048-2048-10 of benchmarks/reproductions.py (every layer
quantized, float activations) in float and with LAB / LAT / exact LAT / LAT2 / LAQ under
LossAwareAdam (the authors'
rule, up to 10 alternation steps until alpha moves by less than 1e-6: LAB's and LAT's default), with
one warm-started alternation step per training step ("warm 1": ``warm_iterations=1``, LAQ's default)
and with the rule
before the fidelity change ("fixed point": up to 10 steps until the assignment stops changing),
batch 100.
"""

import argparse
import contextlib
import os
import platform
import re
import sys
import time

import syq_tf  # first: Keras 2

import numpy as np
import tensorflow as tf

from syq_tf.data import load_fashion_mnist  # noqa: E402
from syq_tf.recipes import build_cnn, compile_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/machine.py, also when imported by path
from machine import write_json  # noqa: E402

CONFIGS = (
    [("float", None)]
    + [(f"SYQ W{b}A8 {g}", dict(bits=b, granularity=g)) for b in (2, 1) for g in ("layer", "row", "pixel", "channel")]
    + [(f"UniQ W{b}A{a}", dict(method="uniq", bits=b, act_bits=a)) for b, a in ((1, 1), (2, 2), (4, 4), (2, 8))]
    + [(f"LS W1 ls1, A {m}", dict(method="ls", bits=1, ls_act_mode=m)) for m in ("ls1", "lsT", "gf2", "ls2")]
    + [("LS W2 ls2, A8 DoReFa", dict(method="ls", bits=2))]
    + [(f"LA {label} A8", dict(method="la", bits=b, la_mode=m))
       for label, m, b in (("LAB W1", "binary", 1), ("LAT W2", "ternary", 2), ("LAT-exact W2", "ternary_exact", 2),
                           ("LAT2 W2", "ternary_two_scale", 2), ("LAQ W3", "linear", 3), ("LAQ-log W3", "log", 3))]
)


MLP_CONFIGS = (
    [("float", None)]
    + [(f"MLP {label}", (mode, bits, kw)) for label, mode, bits, kw in (
        ("LAB W1", "binary", None, {}),
        ("LAT W2", "ternary", None, {}),
        ("LAT W2 warm 1", "ternary", None, dict(warm_iterations=1)),
        ("LAT W2 warm 3", "ternary", None, dict(warm_iterations=3)),
        ("LAT W2 fixed point", "ternary", None, dict(tol=0.0)),
        ("LAT-exact W2", "ternary_exact", None, {}),
        ("LAT2 W2", "ternary_two_scale", None, {}),
        ("LAQ W3", "linear", 3, dict(warm_iterations=None)),  # the authors' rule (LAQ's default: warm 1)
        ("LAQ W3 warm 1", "linear", 3, dict(warm_iterations=1)),
        ("LAQ W3 fixed point", "linear", 3, dict(tol=0.0, warm_iterations=None)))]
)


@contextlib.contextmanager
def _native_off():
    """Models traced inside run without syq_tf's compiled ops (syq_tf.quantizers.native)."""
    from syq_tf.quantizers import native  # noqa: PLC0415

    available, native.available = native.available, lambda: False
    try:
        yield
    finally:
        native.available = available


def _mlp_models(args, only=None):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from reproductions import mlp  # noqa: E402

    from syq_tf import quantizers as Q

    models = {}
    for name, options in MLP_CONFIGS:
        if args.only and options is not None and not re.search(args.only, name):
            continue
        if only is not None and name != only:
            continue
        if options is None:
            model = mlp(None)
        else:
            mode, bits, kw = options
            model = mlp(lambda: Q.LossAware(mode, bits=bits, **kw))
        compile_model(model, 1e-3, None if options is None else "la")
        models[name] = model
    return models


def _cnn_model(options, widths, x, y):
    """The CNN of ``options`` (None: float), compiled, calibrated, traced and warmed up."""
    model = build_cnn(None, **widths) if options is None else build_cnn(**options, **widths)
    compile_model(model, 1e-3, (options or {}).get("method"))
    syq_tf.calibrate(model, x, batches=1)  # UniQ activation steps (a no-op for the others)
    for _ in range(3):  # trace and warm up
        model.train_on_batch(x, y)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--only", default=None,
                   help="regular expression: time only the matching models (float is always timed)")
    p.add_argument("--arch", default="cnn", choices=("cnn", "mlp"),
                   help="cnn: the benchmark CNN (every quantizer); mlp: the loss-aware papers' 2048-wide MLP")
    p.add_argument("--widths", default=None,
                   help="cnn: conv1..conv4,dense channels (default: the demo's 32,32,64,64,128; the accuracy "
                        "benchmark's half-width CNN is 16,16,32,32,64)")
    p.add_argument("--hist-min-before", type=int, default=None, metavar="N",
                   help="cnn: also time every least-squares model traced with the histogram search from rows of "
                        "N values (syq_tf.quantizers.least_squares.HIST_MIN_N; shorter rows sort), labelled "
                        "'[hist >= N]': a before/after of that threshold in one run")
    p.add_argument("--without-native", action="store_true",
                   help="also time every least-squares and loss-aware model traced without syq_tf's compiled ops "
                        "(syq_tf.quantizers.native; the XLA / TensorFlow functions instead), labelled "
                        "'[no native]': a before/after of the ops in one run")
    p.add_argument("--tag", default=None, help="suffix of the JSON file name (step_time_<tag>.json)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    widths = {"widths": tuple(int(w) for w in args.widths.split(","))} if args.widths else {}
    x, y = load_fashion_mnist("train")
    if args.arch == "mlp" and args.batch_size == 128:
        args.batch_size = 100  # the papers' (and reproductions.py's) batch
    x, y = x[: args.batch_size], y[: args.batch_size]
    models = {}
    for name, options in (CONFIGS if args.arch == "cnn" else ()):
        if args.only and options is not None and not re.search(args.only, name):
            continue
        models[name] = _cnn_model(options, widths, x, y)
        if args.hist_min_before and (options or {}).get("method") == "ls":
            from syq_tf.quantizers import least_squares  # noqa: PLC0415

            current, least_squares.HIST_MIN_N = least_squares.HIST_MIN_N, args.hist_min_before
            try:  # read while tracing: the model keeps the search it was traced with
                models[f"{name} [hist >= {args.hist_min_before}]"] = _cnn_model(options, widths, x, y)
            finally:
                least_squares.HIST_MIN_N = current
        if args.without_native and (options or {}).get("method") in ("ls", "la"):
            with _native_off():  # read while tracing, as above
                models[f"{name} [no native]"] = _cnn_model(options, widths, x, y)
    if args.arch == "mlp":
        models = {}
        for name, model in _mlp_models(args).items():
            models[name] = model
            for _ in range(3):  # trace and warm up
                model.train_on_batch(x, y)
            if args.without_native and name != "float":
                with _native_off():
                    (model,) = _mlp_models(args, only=name).values()
                    for _ in range(3):  # traced without the op: it keeps the functions it was traced with
                        model.train_on_batch(x, y)
                models[f"{name} [no native]"] = model
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                model.train_on_batch(x, y)
            times[name].append((time.perf_counter() - start) / args.steps)
    base = float(np.median(times["float"]))
    rows = []
    print(f"{'model':<36}{'median step ms':>16}{'vs float':>10}")
    for name, samples in times.items():
        median = float(np.median(samples))
        rows.append({"model": name, "median_step_s": median, "ratio_to_float": median / base,
                     "samples_s": samples})
        print(f"{name:<36}{1000 * median:>16.1f}{median / base:>10.2f}")
    stem = "step_time" if args.arch == "cnn" else "step_time_mlp"
    suffix = f"_{args.tag}" if args.tag else "_subset" if args.only else ""
    path = os.path.join(args.out, f"{stem}{suffix}.json")
    write_json(path, {"arch": args.arch, "batch_size": args.batch_size, "rounds": args.rounds, "steps": args.steps,
                      "command": "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                      "widths": list(widths.get("widths", ())) or "demo",
                      "machine": platform.platform(), "cpus": os.cpu_count(),
                      "tensorflow": tf.__version__, "rows": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
