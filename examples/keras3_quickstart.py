"""The README's Keras 3 quickstart: a Keras 3 CNN on Fashion-MNIST trained in float, quantized
whole (``quantize_model``, scheme syq-w2a8: ternary SYQ kernels, the first and last layers 8-bit,
8-bit activations), fine-tuned with plain ``model.fit``, saved and reloaded in safe mode, exported
for LiteRT (2-bit weights) and TFLite Micro and verified against Keras.

    python examples/keras3_quickstart.py                 # about 5 minutes on 2 cores
    python examples/keras3_quickstart.py --train 2000    # a quick look

The images go in as 8-bit pixel values (0..255, a ``Rescaling`` layer inside the model), as a
camera delivers them: the exported model's int8 input then holds them exactly. Writes to ``--out``:
``model.keras``, ``model.tflite`` (+ ``.json`` report), ``model_tflm.tflite`` (+ report and the
C array for firmware)."""

import argparse
import os
import sys

import syq_tf.keras3 as syq  # first: selects Keras 3 (nothing is switched to Keras 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from syq_tf.data import load_fashion_mnist  # noqa: E402


def pixels(split, n):
    """The first ``n`` Fashion-MNIST images of ``split`` as 8-bit pixel values (float32 0..255)."""
    x, y = load_fashion_mnist(split)
    return np.round(x[:n] * 255.0).astype(np.float32), y[:n]


def float_model():
    """A small functional CNN: Rescaling (weightless: passed through by quantize_model), three
    convolutions with BatchNormalization (folded at export), a Dense classifier."""
    inputs = keras.Input((28, 28, 1), name="image")
    h = keras.layers.Rescaling(1 / 255, name="rescale")(inputs)
    for layer in (keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv1"),
                  keras.layers.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False, name="dw2"),
                  keras.layers.Conv2D(64, 1, use_bias=False, name="conv3"),
                  keras.layers.Conv2D(64, 3, strides=2, padding="same", use_bias=False, name="conv4")):
        name = layer.name
        h = layer(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(h)  # short runs: 0.99 lags
        h = keras.layers.ReLU(name=f"{name}_relu")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="classifier")(h), name="quickstart")


def compiled(model, lr):
    model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=60000, help="training images (of 60000)")
    ap.add_argument("--test", type=int, default=10000, help="test images (of 10000), also the verification set")
    ap.add_argument("--float-epochs", type=int, default=2)
    ap.add_argument("--q-epochs", type=int, default=2)
    ap.add_argument("--out", default="out/keras3_quickstart")
    args = ap.parse_args(argv)
    (x, y), (xt, yt) = pixels("train", args.train), pixels("test", args.test)
    os.makedirs(args.out, exist_ok=True)
    keras.utils.set_random_seed(0)

    model = compiled(float_model(), 2e-3)
    model.fit(x, y, epochs=args.float_epochs, batch_size=128, verbose=2)
    print(f"float test accuracy {model.evaluate(xt, yt, verbose=0)[1]:.4f}")

    q = syq.quantize_model(model, scheme="syq-w2a8")  # a new model; the float one is left as it is
    syq.fit_dorefa_ranges(q, x[:1000])                 # a<8 schemes: DoReFa's [0, 1] fitted to the ReLU
                                                       # outputs (a8: nothing to fit, 8-bit ranges only)
    syq.calibrate(q, x[:1000])                         # the 8-bit activation ranges, from data
    compiled(q, 5e-4).fit(x, y, epochs=args.q_epochs, batch_size=128, verbose=2,
                          callbacks=[syq.CheckFinite()])
    print(f"syq-w2a8 test accuracy {q.evaluate(xt, yt, verbose=0)[1]:.4f}")
    syq.summary(q)                                     # bits, scales, bytes, MACs per layer

    path = os.path.join(args.out, "model.keras")
    q.save(path)
    again = keras.saving.load_model(path)              # safe mode, no custom objects
    same = np.array_equal(q.predict(xt[:256], verbose=0), again.predict(xt[:256], verbose=0))
    print(f".keras round trip identical: {same}")

    result = syq.export.to_tflite(again, x[:500], target="litert", weights="int2", verify_data=xt,
                                  verify_labels=yt)
    result.save(os.path.join(args.out, "model.tflite"))  # + model.tflite.json, the report
    print(result.table())                                # codebooks exact? bytes vs minimum, agreement
    tflm = syq.export.to_tflite(again, x[:500], target="tflm", verify_data=xt[:500], verify_labels=yt[:500])
    tflm.save(os.path.join(args.out, "model_tflm.tflite"))  # + report, model_tflm.h / .cc for firmware
    print(tflm.table())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
