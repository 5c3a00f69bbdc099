"""Reduced reproductions of the loss-aware papers' settings, on data available offline.

The loss-aware papers (LAB / LAT / LAQ) train, from scratch and with every layer quantized (first
and last included):
  * an MLP 784-2048-2048-2048-10 with BatchNorm on MNIST, and
  * a VGG-like CNN (2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10) on CIFAR-10 / SVHN.
This script runs the same architectures -- the MLP as published, the CNN with every width divided
by 4 (32/64/128 channels, 256-unit FC) -- on Fashion-MNIST (the Debian package), for a few epochs
on a training subset. THESE ARE NOT THE PAPERS' DATASETS OR BUDGETS: the numbers compare methods
with each other under one recipe; they do not reproduce the papers' tables. (The papers'
character-level LSTM is reproduced at reduced scale by examples/char_lstm_laq.py.)

Rows per architecture: float; larq ste_sign weights (BinaryConnect, W1) and SteTern (TWN, W2), the
peers the papers compare against; LAB (W1), LAT (W2), LAQ linear 3-bit, all with
LossAwareAdam (LAT: the approximate projection, the papers' default). Activations stay float (the papers' weight-only setting). Cached per (arch, row) under
``--out``; prints a table and writes ``reproductions.json`` and ``REPRODUCTIONS.md``.

    .venv/bin/python benchmarks/reproductions.py [--epochs 3] [--train-limit 10000]
"""

import argparse
import json
import os
import re
import sys
import time

import syq_tf  # noqa: F401  (first: selects Keras 2 before TensorFlow loads)

import larq as lq
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import StepTimer, _cpu, _versions, _write_json, slug  # noqa: E402

from syq_tf import quantizers as Q  # noqa: E402
from syq_tf.data import load_fashion_mnist  # noqa: E402
from syq_tf.recipes import compile_model  # noqa: E402
from syq_tf.summary import summarize  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

ROWS = {
    "float": (None, None),
    "BinaryConnect (larq ste_sign) W1": (lambda: lq.quantizers.SteSign(), None),
    "TWN (larq SteTern) W2": (lambda: lq.quantizers.SteTern(ternary_weight_networks=True), None),
    # the authors' rule (up to 10 alternation steps a training step), also for LAQ, whose default is one
    "LAB W1": (lambda: Q.LossAware("binary", warm_iterations=None), "la"),
    "LAT (approximate) W2": (lambda: Q.LossAware("ternary", warm_iterations=None), "la"),
    "LAQ linear W3": (lambda: Q.LossAware("linear", bits=3, warm_iterations=None), "la"),
    # one warm-started alternation step per training step (the alternation continues across steps)
    "LAT (approximate) W2, warm 1": (lambda: Q.LossAware("ternary", warm_iterations=1), "la"),
    "LAT (approximate) W2, warm 3": (lambda: Q.LossAware("ternary", warm_iterations=3), "la"),
    "LAQ linear W3, warm 1": (lambda: Q.LossAware("linear", bits=3, warm_iterations=1), "la"),
}


def _dense(units, kq, name):
    if kq is None:
        return tf.keras.layers.Dense(units, use_bias=False, name=name)
    return lq.layers.QuantDense(units, use_bias=False, kernel_quantizer=kq(), name=name)


def _conv(filters, kq, name):
    if kq is None:
        return tf.keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)
    return lq.layers.QuantConv2D(filters, 3, padding="same", use_bias=False, kernel_quantizer=kq(), name=name)


def _bn(name):
    return tf.keras.layers.BatchNormalization(momentum=0.9, name=name)


def mlp(kq):
    """784-2048-2048-2048-10, BatchNorm + ReLU after each hidden layer, every layer quantized."""
    layers = [tf.keras.Input((28, 28, 1)), tf.keras.layers.Flatten()]
    for i in range(3):
        layers += [_dense(2048, kq, f"fc{i + 1}"), _bn(f"bn{i + 1}"), tf.keras.layers.ReLU()]
    layers += [_dense(10, kq, "logits"), _bn("bn_logits")]
    return tf.keras.Sequential(layers, name="laq_mlp")


def vgg_quarter(kq):
    """The papers' VGG-like CNN with widths / 4: 2x32C3-MP2-2x64C3-MP2-2x128C3-MP2-2x256FC-10."""
    layers = [tf.keras.Input((28, 28, 1))]
    n = 0
    for filters in (32, 64, 128):
        for _ in range(2):
            n += 1
            layers += [_conv(filters, kq, f"conv{n}"), _bn(f"bn{n}"), tf.keras.layers.ReLU()]
        layers.append(tf.keras.layers.MaxPool2D(padding="same"))
    layers.append(tf.keras.layers.Flatten())
    for i in range(2):
        layers += [_dense(256, kq, f"fc{i + 1}"), _bn(f"bn_fc{i + 1}"), tf.keras.layers.ReLU()]
    layers += [_dense(10, kq, "logits"), _bn("bn_logits")]
    return tf.keras.Sequential(layers, name="vgg_quarter")


ARCHS = {"mlp": mlp, "vgg": vgg_quarter}


def cached_path(args, seed, arch, row):
    """Where one (arch, row, seed) result of these settings is cached."""
    return os.path.join(args.out, f"e{args.epochs}_n{args.train_limit}_s{seed}", f"{arch}_{slug(row)}.json")


def run(arch, row, args, seed, data):
    path = cached_path(args, seed, arch, row)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    (x, y), (xt, yt) = data
    kq, method = ROWS[row]
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    model = ARCHS[arch](kq)
    compile_model(model, args.lr, method)
    ds = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
          .batch(args.batch_size).prefetch(tf.data.AUTOTUNE))
    timer = StepTimer()
    t0 = time.perf_counter()
    history = model.fit(ds, epochs=args.epochs, verbose=0, callbacks=[timer])
    seconds = time.perf_counter() - t0
    loss, acc = model.evaluate(xt, yt, batch_size=500, verbose=0)
    result = {"arch": arch, "row": row, "test_accuracy": float(acc), "test_loss": float(loss),
              "train_accuracy_last_epoch": float(history.history["accuracy"][-1]),
              "train_seconds": seconds, "seconds_per_epoch": timer.seconds_per_epoch(),
              "bytes_at_bit_width": float(sum(r.bytes for r in summarize(model))),
              "config": {"epochs": args.epochs, "train_limit": args.train_limit, "lr": args.lr,
                         "batch_size": args.batch_size, "seed": seed}}
    _write_json(path, result)
    return result


def summary_rows(results):
    """One line per (arch, row): accuracy mean and sample std over the seeds, median s / epoch."""
    groups = {}
    for r in results:
        groups.setdefault((r["arch"], r["row"]), []).append(r)
    out = []
    for (arch, row), rs in groups.items():
        acc = np.array([100 * r["test_accuracy"] for r in rs])
        std = f" ± {acc.std(ddof=1):.2f}" if len(acc) > 1 else ""
        out.append(f"| {arch} | {row} | {acc.mean():.2f}{std} | {len(acc)} "
                   f"| {np.median([r['seconds_per_epoch'] for r in rs]):.1f} | {rs[0]['bytes_at_bit_width'] / 1024:.1f} |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="mlp,vgg", help="comma list of: " + ", ".join(ARCHS))
    ap.add_argument("--rows", default=None, help="regular expression: only the rows it matches (default: all)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-limit", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "reproductions"))
    args = ap.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        ap.error(f"--archs: unknown {unknown}; allowed: {sorted(ARCHS)}")
    rows = [r for r in ROWS if args.rows is None or re.search(args.rows, r)]
    if not rows:
        ap.error(f"--rows {args.rows!r} matches none of: {list(ROWS)}")
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    x, y = load_fashion_mnist("train")
    data = ((x[: args.train_limit], y[: args.train_limit]), load_fashion_mnist("test"))
    for seed in args.seeds:  # every (arch, row, seed) is cached as soon as it is done
        for arch in archs:
            for row in rows:
                r = run(arch, row, args, seed, data)
                print(f"[reproductions] seed {seed} {arch:<4} {row:<34} accuracy {r['test_accuracy']:.4f} "
                      f"({r['seconds_per_epoch']:.1f} s/epoch)", flush=True)
    # the table: every cached (arch, row, seed) of these settings, trained now or by an earlier run
    results = []
    for seed in args.seeds:
        for arch in archs:
            for row in ROWS:
                path = cached_path(args, seed, arch, row)
                if os.path.exists(path):
                    with open(path) as f:
                        results.append(json.load(f))
    seeds = " ".join(str(s) for s in args.seeds)
    lines = [
        "# Reduced reproductions of the loss-aware papers' settings (generated by benchmarks/reproductions.py)",
        "",
        "**Not the papers' datasets or budgets**: Fashion-MNIST (Debian package) instead of MNIST / CIFAR-10 / "
        f"SVHN, first {args.train_limit} training images, {args.epochs} epoch(s) from scratch, Adam "
        f"{args.lr} (LossAwareAdam for LAB/LAT/LAQ), batch {args.batch_size}, seeds {seeds}; every layer "
        "quantized, float activations, as in the papers. The VGG-like CNN has a quarter of the papers' widths. "
        "'warm 1': `LossAware(warm_iterations=1)`, one warm-started alternation step of the projection per "
        "training step (LAQ's default since these runs); the other loss-aware rows run the authors' rule "
        "(`warm_iterations=None`: up to 10 steps). s / epoch: median step x steps per epoch, rows run one after another on a shared "
        "machine (the side-by-side step ratios are in `step_time.py`'s results).",
        "",
        f"Command: `python benchmarks/reproductions.py --archs {','.join(archs)} --epochs {args.epochs} "
        f"--train-limit {args.train_limit} --seeds {seeds}"
        + (f" --rows '{args.rows}'" if args.rows else "") + "` (rows already cached under --out are read, not retrained; "
        "`--rows REGEX` trains only some rows).",
        "",
        f"Machine: {_cpu()}, {os.cpu_count()} CPUs. Versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()) + ".",
        "",
        "| architecture | row | test accuracy % (mean ± std) | seeds | s / epoch | KiB at bit width |",
        "|---|---|---|---|---|---|",
    ] + summary_rows(results)
    _write_json(os.path.join(args.out, f"e{args.epochs}_n{args.train_limit}_seeds_{'_'.join(map(str, args.seeds))}.json"), results)
    with open(os.path.join(HERE, "REPRODUCTIONS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[8:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
