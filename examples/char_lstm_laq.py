"""Character-level LSTM language model with loss-aware quantized weights (LAQ / LAT / LAB).

The loss-aware papers' headline experiment, scaled to this machine: a character-level LSTM language
model on C source code in which every weight matrix -- the LSTM input and recurrent kernels and the
softmax layer -- is quantized, trained with LossAwareAdam (curvature from Adam's second moments),
and compared with the same model in float by test cross-entropy per character.

Corpus: the Linux kernel's user-space API headers (``/usr/include/linux``, Debian package
``linux-libc-dev``), about 4 MB of real kernel C -- not the papers' full Linux-kernel corpus, but the
same kind of text, available offline. The text is split 90 / 5 / 5 (train / validation / test) in
file order, as char-rnn did.

    python examples/char_lstm_laq.py                          # float, LAQ 3-bit, LAQ 2-bit
    python examples/char_lstm_laq.py --runs float,lab,lat,laq3,laq3log --steps 3000
"""

import argparse
import json
import math
import os
import sys
import time

import syq_tf  # first: selects Keras 2 before TensorFlow loads

import numpy as np
import tensorflow as tf

from syq_tf.data import load_text_corpus

Q = syq_tf.quantizers

# run name -> (LossAware mode, bits) ; "float" trains the same network unquantized with Adam.
RUNS = {
    "float": None,
    "lab": ("binary", None),
    "lat": ("ternary", None),
    "lat_exact": ("ternary_exact", None),
    "lat2": ("ternary_two_scale", None),
    **{f"laq{b}": ("linear", b) for b in range(2, 9)},
    **{f"laq{b}log": ("log", b) for b in range(2, 9)},
}


def build_lm(vocab, seq_len, units, layers, run="float"):
    """one-hot [B, T, V] -> LSTM x layers -> Dense(V) logits; all weight matrices quantized unless
    run == "float" (biases stay float, as in the papers)."""
    spec = RUNS[run]
    inputs = tf.keras.Input((seq_len, vocab), name="chars")
    x = inputs
    for i in range(layers):
        lstm = tf.keras.layers.LSTM(units, return_sequences=True, name=f"lstm{i + 1}")
        if spec is not None:
            mode, bits = spec
            lstm = syq_tf.quantize(lstm, kernel_quantizer=Q.LossAware(mode, bits=bits))
        x = lstm(x)
    head = tf.keras.layers.Dense(vocab, name="softmax")
    if spec is not None:
        head = syq_tf.quantize(head, kernel_quantizer=Q.LossAware(spec[0], bits=spec[1]))
    return tf.keras.Model(inputs, head(x), name=f"char_lstm_{run}")


def sequences(ids, seq_len, batch, vocab, shuffle_seed=None):
    """(one-hot inputs, next-character targets) batches of non-overlapping windows."""
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle_seed is not None:
        ds = ds.shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch, drop_remainder=shuffle_seed is not None)
    return ds.map(lambda a, b: (tf.one_hot(a, vocab), b), num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def cross_entropy(model, ds):
    """Mean cross-entropy per character (nats) over a finite dataset."""
    total, count = 0.0, 0
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    for x, y in ds:
        total += float(loss(y, model(x, training=False)))
        count += int(tf.size(y))
    return total / count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="float,laq3,laq2",
                   help=f"comma-separated runs among: {', '.join(RUNS)}")
    p.add_argument("--corpus", default="/usr/include/linux", help="directory of text files")
    p.add_argument("--pattern", default="*.h", help="file glob inside --corpus (recursive)")
    p.add_argument("--units", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1500, help="training steps per run")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-chars", type=int, default=200_000,
                   help="characters of the validation / test split used (0: all)")
    p.add_argument("--verify-sequences", type=int, default=32,
                   help="test sequences run through LiteRT to compare with Keras")
    p.add_argument("--out", default="out/char_lstm")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {unknown}; allowed: {', '.join(RUNS)}")
    os.makedirs(args.out, exist_ok=True)

    corpus = load_text_corpus(args.corpus, args.pattern)
    vocab = len(corpus.alphabet)
    limit = args.eval_chars or None
    valid_ids, test_ids = corpus.valid[:limit], corpus.test[:limit]
    print(f"corpus: {corpus.files} files, {corpus.size:,} characters, alphabet {vocab}; "
          f"train {len(corpus.train):,} / valid {len(valid_ids):,} / test {len(test_ids):,} characters used")

    valid = sequences(valid_ids, args.seq_len, 256, vocab)
    test = sequences(test_ids, args.seq_len, 256, vocab)
    results = {}
    for run in runs:
        tf.keras.utils.set_random_seed(args.seed)
        model = build_lm(vocab, args.seq_len, args.units, args.layers, run)
        optimizer = tf.keras.optimizers.Adam(args.lr) if run == "float" else syq_tf.LossAwareAdam(args.lr)
        model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        train = sequences(corpus.train, args.seq_len, args.batch_size, vocab, shuffle_seed=args.seed)
        print(f"== {run}: {args.steps} steps, {model.count_params():,} parameters")
        t0 = time.time()
        epochs = 5
        history = model.fit(train, steps_per_epoch=max(1, args.steps // epochs), epochs=epochs,
                            validation_data=valid, verbose=2)
        seconds = time.time() - t0
        test_ce = cross_entropy(model, test)
        row = {
            "test_cross_entropy_nats": test_ce,
            "test_bits_per_char": test_ce / math.log(2),
            "valid_loss_per_epoch": [float(v) for v in history.history["val_loss"]],
            "train_seconds": seconds,
        }
        if run != "float":
            row["codebooks"] = {}
            for layer, quantizer, kernel in syq_tf.quantized_kernels(model):
                values = np.unique(np.asarray(quantizer(kernel)))
                row["codebooks"][f"{layer.name}/{kernel.name.split('/')[-1].split(':')[0]}"] = {
                    "alpha": float(np.ravel(quantizer.alpha.numpy())[0]),
                    "distinct_values": int(values.size),
                }
            path = os.path.join(args.out, f"{run}.h5")
            model.save(path)
            reloaded = tf.keras.models.load_model(path, compile=False)
            x, y = next(iter(test))
            x, y = x.numpy()[: args.verify_sequences], y.numpy()[: args.verify_sequences]
            row["reload_max_abs_diff"] = float(np.abs(reloaded(x) - model(x)).max())
            # TFLite: a fused LSTM with int8 weights (codebooks checked), run with LiteRT
            result = syq_tf.export.to_tflite(model, representative_data=x, verify_data=x, verify_labels=y)
            result.save(os.path.join(args.out, f"{run}.tflite"))
            print(result.table())
            row["tflite"] = {"model_bytes": result.model_bytes, "verification": result.verification,
                             "all_codebooks_exact": all(r.exact for r in result.layers)}
        results[run] = row
        print(f"   test cross-entropy {test_ce:.4f} nats/char = {test_ce / math.log(2):.4f} bits/char "
              f"({seconds:.0f} s)")

    print(f"\n  test cross-entropy per character ({len(test_ids):,} test characters; {args.layers} x LSTM"
          f"({args.units}), {args.steps} steps of {args.batch_size} x {args.seq_len} characters)")
    print("  run         test nats/char  bits/char  vs float  train s")
    base = results.get("float", {}).get("test_cross_entropy_nats")
    for run, row in results.items():
        delta = "" if base is None else f"{row['test_cross_entropy_nats'] - base:+.4f}"
        print(f"  {run:<11} {row['test_cross_entropy_nats']:>14.4f}  {row['test_bits_per_char']:>9.4f}  "
              f"{delta:>8}  {row['train_seconds']:>7.0f}")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"args": vars(args), "corpus": corpus.describe(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
