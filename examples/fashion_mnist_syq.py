"""Main job: SYQ on Fashion-MNIST, train -> evaluate -> export -> verify with LiteRT.

``--method uniq`` / ``--method ls`` / ``--method la`` run the same recipe with UniQ, least-squares
or loss-aware (LAB / LAT / LAQ, ``--la-mode``; trained with ``syq_tf.LossAwareAdam``) quantizers.

Recipe of the SYQ paper, scaled to a small budget: train the CNN in float, switch SYQ weights and
DoReFa activations on (first conv and last dense stay float), re-initialise every alpha from the
float weights, fine-tune, then export a full-integer int8 TFLite model and run it with LiteRT.
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

Q = syq_tf.quantizers


METHODS = ("syq", "uniq", "ls", "la")
LA_MODES = ("binary", "ternary", "ternary_exact", "ternary_two_scale", "linear", "log")


def quantizer_factories(method="syq", bits=2, granularity="pixel", act_bits=8, eta=0.05, ls_mode=None,
                        ls_act_mode=None, la_mode=None):
    """Zero-argument factories (conv kernel, dense kernel, layer input) for one method.

    syq:  SYQ weights (``granularity`` for convs, layer-wise for the dense), DoReFa activations.
    uniq: UniQ weights per channel, UniQ activations (need ``syq_tf.calibrate`` before training).
    ls:   least-squares weights per channel (``ls_mode``, default ls1 for 1 bit, ls2 for 2), and
          least-squares activations of ``ls_act_mode`` (sign-like, per sample) or, if None, DoReFa.
    la:   loss-aware weights (``la_mode``, default LAB for 1 bit, LAT for 2, linear LAQ above; one
          scale per layer as in the papers; the model must be trained with LossAwareAdam), DoReFa
          activations.
    """
    if method == "syq":
        return (lambda: Q.SYQ(bits, granularity, eta), lambda: Q.SYQ(bits, "layer", eta),
                lambda: Q.DoReFa(act_bits))
    if method == "uniq":
        return (lambda: Q.UniQ(bits, "channel"), lambda: Q.UniQ(bits, "channel"),
                lambda: Q.UniQActivation(act_bits))
    if method == "ls":
        mode = ls_mode or {1: "ls1", 2: "ls2"}[bits]
        act = (lambda: Q.LeastSquaresActivation(ls_act_mode)) if ls_act_mode else (lambda: Q.DoReFa(act_bits))
        return (lambda: Q.LeastSquares(mode), lambda: Q.LeastSquares(mode), act)
    if method == "la":
        mode = la_mode or {1: "binary", 2: "ternary"}.get(bits, "linear")
        extra = {"bits": bits} if mode in ("linear", "log") else {}
        return (lambda: Q.LossAware(mode, **extra), lambda: Q.LossAware(mode, **extra),
                lambda: Q.DoReFa(act_bits))
    raise ValueError(f"unknown method {method!r}; allowed: {METHODS}")


def build_cnn(bits=None, granularity="pixel", act_bits=8, eta=0.05, method="syq", **method_options):
    """32-32-64-64 conv + 128 dense CNN. bits=None builds the float model (ReLU activations).

    Quantized: first conv and last dense keep float weights (the papers' recipe); the other layers
    get the method's weight quantizer and input quantizer (see :func:`quantizer_factories`)."""
    quantized = bits is not None
    if quantized:
        conv_q, dense_q, input_q = quantizer_factories(method, bits, granularity, act_bits, eta, **method_options)

    def act():
        # Float model: ReLU. Quantized model: the next layer's input quantizer clips (DoReFa to
        # [0, 1], UniQ to [0, (2^b - 1) delta]; least-squares activations are sign-like).
        return [] if quantized else [tf.keras.layers.ReLU()]

    def qconv(filters, name):
        if not quantized:
            return tf.keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)
        return lq.layers.QuantConv2D(
            filters, 3, padding="same", use_bias=False, name=name,
            kernel_quantizer=conv_q(), input_quantizer=input_q(),
        )

    def qdense(units, name, kernel=True, **kw):
        if not quantized:
            return tf.keras.layers.Dense(units, name=name, **kw)
        return lq.layers.QuantDense(
            units, name=name, input_quantizer=input_q(), kernel_quantizer=dense_q() if kernel else None, **kw,
        )

    def bn(name):
        return tf.keras.layers.BatchNormalization(momentum=0.9, name=name)

    layers = [
        tf.keras.Input((28, 28, 1)),
        tf.keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv1"),  # float (paper)
        bn("bn1"), *act(),
        qconv(32, "conv2"), tf.keras.layers.MaxPool2D(), bn("bn2"), *act(),
        qconv(64, "conv3"), bn("bn3"), *act(),
        qconv(64, "conv4"), tf.keras.layers.MaxPool2D(), bn("bn4"), *act(),
        tf.keras.layers.Flatten(),
        qdense(128, "fc1", use_bias=False), bn("bn5"), *act(),
        qdense(10, "logits", kernel=False),  # last layer: float weights (paper)
    ]
    return tf.keras.Sequential(layers, name=f"{method}_cnn" if quantized else "float_cnn")


def compile_model(model, lr, method=None):
    # Loss-aware quantizers take their curvature from (and are projected by) LossAwareAdam.
    optimizer = syq_tf.LossAwareAdam(lr) if method == "la" else tf.keras.optimizers.Adam(lr)
    model.compile(
        optimizer=optimizer,
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
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
    label = {"syq": "SYQ", "uniq": "UniQ", "ls": "LS"}.get(args.method)
    if args.method == "la":
        la_mode = args.la_mode or {1: "binary", 2: "ternary"}.get(args.bits, "linear")
        label = {"binary": "LAB", "ternary": "LAT", "ternary_exact": "LAT-exact",
                 "ternary_two_scale": "LAT2", "linear": "LAQ", "log": "LAQ-log"}[la_mode]
        args.bits = 1 if la_mode == "binary" else (2 if la_mode.startswith("ternary") else args.bits)
    label = f"{label} W{args.bits}A{args.act_bits}" + (f" {args.granularity}" if args.method == "syq" else "")
    print(f"== 2/4 {label} fine-tuning ({args.quant_epochs} epoch(s)), scales initialised from the "
          "float weights")
    model = build_cnn(args.bits, args.granularity, args.act_bits, method=args.method, **options)
    model.set_weights(_float_weights_for(model, float_model))
    syq_tf.reinitialize_scales(model)
    if args.method == "uniq":  # activation steps from data, BatchNorm statistics untouched
        steps = syq_tf.calibrate(model, train, batches=20)
        print("   calibrated activation steps: " + ", ".join(f"{k}={v:.4f}" for k, v in steps.items()))
    compile_model(model, 5e-4, args.method)
    t0 = time.time()
    model.fit(train, epochs=args.quant_epochs, verbose=1)
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


def _float_weights_for(model, float_model):
    """The float model's weights in the quantized model's order; quantizer scales keep theirs
    (they are set from these weights by reinitialize_scales)."""
    by_name = {}
    for layer in float_model.layers:
        for w in layer.weights:
            by_name[f"{layer.name}/{w.name.split('/')[-1]}"] = w.numpy()
    quantizers = [m for m in model.submodules if isinstance(m, (Q.WeightQuantizer, Q.ActivationQuantizer))]
    scales = {id(w) for q in quantizers for w in q.weights}
    values = []
    for layer in model.layers:
        for w in layer.weights:
            key = f"{layer.name}/{w.name.split('/')[-1]}"
            if id(w) in scales:
                values.append(w.numpy())
            elif key in by_name:
                values.append(by_name[key])
            else:
                raise KeyError(f"no float weight for {key} in the float model")
    return values


if __name__ == "__main__":
    sys.exit(main())
