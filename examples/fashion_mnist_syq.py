"""Main job: SYQ on Fashion-MNIST, train -> evaluate -> export -> verify with LiteRT.

``--method uniq`` / ``--method ls`` / ``--method la`` run the same recipe with UniQ, least-squares
or loss-aware (LAB / LAT / LAQ, ``--la-mode``; trained with ``syq_tf.LossAwareAdam``) quantizers.

Recipe of the SYQ paper, scaled to a small budget: train the CNN in float, switch SYQ weights and
DoReFa activations on (first conv and last dense stay float), re-initialise every alpha from the
float weights, fit DoReFa's [0, 1] range to the float activations (``syq_tf.fit_dorefa_ranges``),
fine-tune, then export a full-integer int8 TFLite model and run it with LiteRT.
"""

import argparse
import json
import os
import sys
import time

import syq_tf  # first: selects Keras 2 before TensorFlow loads

import larq as lq
import tensorflow as tf

from syq_tf.data import fashion_mnist_dataset, load_fashion_mnist

from syq_tf.recipes import (  # noqa: E402,F401  (re-exported: benchmarks import them from here)
    LA_MODES,
    METHODS,
    build_cnn,
    compile_model,
    effective_bits,
    finetune_from_float,
    method_label,
    quantizer_factories,
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", default="syq", choices=METHODS,
                   help="syq (default), uniq (UniQ weights and activations, calibrated), ls "
                        "(least-squares weights, DoReFa activations) or la (loss-aware weights, "
                        "DoReFa activations, LossAwareAdam)")
    p.add_argument("--bits", type=int, default=2,
                   help="weight bits: SYQ 1 binary / 2 ternary, UniQ 1-8, ls 1 (ls1) or 2 (ls2)")
    p.add_argument("--ls-mode", default=None, choices=["ls1", "ls2", "lsT", "gf2", "gf3", "gf4"],
                   help="least-squares weight mode (method ls)")
    p.add_argument("--la-mode", default=None, choices=LA_MODES,
                   help="loss-aware weight mode (method la): binary = LAB, ternary* = LAT, "
                        "linear / log = LAQ with --bits bits")
    p.add_argument("--granularity", default="pixel", choices=["layer", "row", "pixel", "channel"])
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--no-fit-ranges", dest="fit_ranges", action="store_false",
                   help="skip syq_tf.fit_dorefa_ranges before fine-tuning (DoReFa then clips activations at 1)")
    p.add_argument("--float-epochs", type=int, default=1, help="float pre-training epochs")
    p.add_argument("--quant-epochs", type=int, default=2,
                   help="SYQ fine-tuning epochs (the float baseline trains as many more epochs)")
    p.add_argument("--train-limit", type=int, default=20000, help="training images used (of 60000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="out/fashion_mnist_syq")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tf.keras.utils.set_random_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()

    train = fashion_mnist_dataset("train", args.batch_size, limit=args.train_limit, shuffle_seed=args.seed)
    test = fashion_mnist_dataset("test", 512)
    x_test, y_test = load_fashion_mnist("test")

    print(f"== 1/4 float pre-training ({args.float_epochs} epoch(s) on {args.train_limit} images)")
    float_model = build_cnn(None)
    compile_model(float_model, 1e-3)
    float_model.fit(train, epochs=args.float_epochs, verbose=1)
    pretrained = float_model.get_weights()
    print(f"   float baseline: {args.quant_epochs} more epoch(s), the same budget as SYQ fine-tuning")
    float_model.fit(train, epochs=args.float_epochs + args.quant_epochs, initial_epoch=args.float_epochs,
                    verbose=1)
    _, float_acc = float_model.evaluate(test, verbose=0)
    float_model.set_weights(pretrained)

    options = {"ls": {"ls_mode": args.ls_mode}, "la": {"la_mode": args.la_mode}}.get(args.method, {})
    label = method_label(args.method, args.bits, args.act_bits, args.granularity, **options)
    args.bits = effective_bits(args.method, args.bits, args.la_mode)
    print(f"== 2/4 {label} fine-tuning ({args.quant_epochs} epoch(s)), scales initialised from the "
          "float weights")
    model = build_cnn(args.bits, args.granularity, args.act_bits, method=args.method, **options)
    t0 = time.time()
    finetune_from_float(model, float_model, train, args.quant_epochs, lr=5e-4, method=args.method,
                        fit_ranges=args.fit_ranges)
    quant_seconds = time.time() - t0
    _, quant_acc = model.evaluate(test, verbose=0)
    lq.models.summary(model)

    print("== 3/4 export: full-integer int8 TFLite")
    x_train, _ = load_fashion_mnist("train")
    result = syq_tf.export.to_tflite(
        model, representative_data=x_train[:500], verify_data=x_test, verify_labels=y_test
    )
    path = result.save(os.path.join(args.out, "model.tflite"))
    print(result.table())

    print("== 4/4 summary")
    v = result.verification
    rows = [
        (f"float accuracy (Keras, {args.float_epochs + args.quant_epochs} epochs)", f"{float_acc:.4f}"),
        (f"{label} accuracy (Keras, {args.float_epochs} float + {args.quant_epochs} quantized epochs)",
         f"{quant_acc:.4f}"),
        (f"{label} accuracy (LiteRT int8)", f"{v['runtime_accuracy']:.4f}"),
        ("Keras vs LiteRT top-1 agreement", f"{v['top1_agreement']:.4f} on {v['examples']} test images"),
        ("TFLite model bytes", f"{result.model_bytes}"),
        ("float32 Keras weights bytes", f"{4 * float_model.count_params()}"),
        ("quantized fine-tune seconds", f"{quant_seconds:.0f}"),
        ("total seconds", f"{time.time() - started:.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, val in rows:
        print(f"  {k:<{width}}  {val}")
    metrics = {k: val for k, val in rows}
    metrics.update(method=args.method, bits=args.bits, act_bits=args.act_bits, float_accuracy=float_acc, quant_accuracy=quant_acc, verification=v,
                   model_bytes=result.model_bytes, tflite=path)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if v["top1_agreement"] < 0.99:
        print("FAILED: LiteRT agrees with Keras on fewer than 99% of test images", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
