"""The four MLPerf Tiny (inference v1.x) reference models, written here from their public
definitions (the benchmark's "training" READMEs and papers), as Keras 2 functional models
(``import syq_tf`` first: it selects tf_keras), and Fashion-MNIST shaped to each model's input.

* ``resnet8`` -- Image Classification (CIFAR-10): 32x32x3; Conv 16 3x3, BN, ReLU; three residual
  stacks of 16, 32, 64 filters (two 3x3 conv + BN each, the second and third with stride 2 and a
  1x1 stride-2 projection shortcut), Add, ReLU; AveragePooling 8x8, Flatten, Dense 10 softmax;
  L2 1e-4 on the kernels.
* ``mobilenet_vww`` -- Visual Wake Words: MobileNetV1 with alpha 0.25 at 96x96x3: Conv 3x3 s2
  (8 filters), BN, ReLU, then 13 depthwise separable blocks (DepthwiseConv 3x3, BN, ReLU, Conv
  1x1, BN, ReLU) of 16, 32 (s2), 32, 64 (s2), 64, 128 (s2), 5x 128, 256 (s2), 256 filters;
  AveragePooling, Flatten, Dense softmax. VWW has 2 classes; here 10 (Fashion-MNIST).
* ``ds_cnn`` -- Keyword Spotting: DS-CNN (small) on 49x10x1 MFCC frames: Conv 64 (10, 4) s2, BN,
  ReLU, Dropout 0.2; 4x (DepthwiseConv 3x3, BN, ReLU, Conv 64 1x1, BN, ReLU); Dropout 0.4;
  AveragePooling over the whole map, Flatten, Dense softmax. KWS has 12 classes; here 10.
* ``autoencoder`` -- Anomaly Detection (ToyADMOS): FC autoencoder on 640 features (5 frames of
  128 log-mel bins): 4x (Dense 128, BN, ReLU), Dense 8, BN, ReLU, 4x (Dense 128, BN, ReLU),
  Dense 640; trained on the mean squared reconstruction error.

Data (:func:`data`): Fashion-MNIST (Debian ``dataset-fashion-mnist``, :mod:`syq_tf.data`), images in
[0, 1] resized with ``tf.image.resize`` (bilinear) to 32x32 / 96x96 and tiled to 3 channels, to
49x10x1 for DS-CNN, and to 640 values (a 32x20 resize, flattened) for the autoencoder. For the
autoencoder, whose "prediction" is a reconstruction, the agreement between Keras and TFLite is
measured on the per-example anomaly score (mean squared reconstruction error) that the benchmark
thresholds: :func:`score_agreement` gives the Pearson correlation of the scores, their median
relative difference, and the agreement of the "anomalous" decision at the median Keras score.
"""

import numpy as np

import syq_tf  # noqa: F401  (first: Keras 2 / tf_keras)
import tensorflow as tf  # noqa: E402

from syq_tf.data import load_fashion_mnist  # noqa: E402

MODELS = ("resnet8", "mobilenet_vww", "ds_cnn", "autoencoder")
SHAPES = {"resnet8": (32, 32, 3), "mobilenet_vww": (96, 96, 3), "ds_cnn": (49, 10, 1), "autoencoder": (640,)}

L = tf.keras.layers


def resnet8(input_shape=(32, 32, 3), classes=10, l2=1e-4):
    reg = tf.keras.regularizers.l2(l2)

    def conv(x, filters, kernel=3, strides=1):
        return L.Conv2D(filters, kernel, strides=strides, padding="same", kernel_initializer="he_normal",
                        kernel_regularizer=reg)(x)

    inputs = tf.keras.Input(input_shape)
    x = L.ReLU()(L.BatchNormalization()(conv(inputs, 16)))
    for filters, strides in ((16, 1), (32, 2), (64, 2)):
        y = L.ReLU()(L.BatchNormalization()(conv(x, filters, strides=strides)))
        y = L.BatchNormalization()(conv(y, filters))
        if strides != 1:
            x = conv(x, filters, kernel=1, strides=strides)
        x = L.ReLU()(L.Add()([x, y]))
    x = L.AveragePooling2D(pool_size=x.shape[1:3])(x)
    outputs = L.Dense(classes, activation="softmax", kernel_initializer="he_normal")(L.Flatten()(x))
    return tf.keras.Model(inputs, outputs, name="resnet8")


def mobilenet_vww(input_shape=(96, 96, 3), classes=10, alpha=0.25):
    def bn_relu(x):
        return L.ReLU()(L.BatchNormalization()(x))

    inputs = tf.keras.Input(input_shape)
    x = bn_relu(L.Conv2D(int(32 * alpha), 3, strides=2, padding="same", use_bias=False)(inputs))
    blocks = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    for filters, strides in blocks:
        x = bn_relu(L.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False)(x))
        x = bn_relu(L.Conv2D(int(filters * alpha), 1, padding="same", use_bias=False)(x))
    x = L.AveragePooling2D(pool_size=x.shape[1:3])(x)
    outputs = L.Dense(classes, activation="softmax")(L.Flatten()(x))
    return tf.keras.Model(inputs, outputs, name="mobilenet_vww")


def ds_cnn(input_shape=(49, 10, 1), classes=10, filters=64):
    def bn_relu(x):
        return L.ReLU()(L.BatchNormalization()(x))

    inputs = tf.keras.Input(input_shape)
    x = bn_relu(L.Conv2D(filters, (10, 4), strides=2, padding="same")(inputs))
    x = L.Dropout(0.2)(x)
    for _ in range(4):
        x = bn_relu(L.DepthwiseConv2D(3, padding="same")(x))
        x = bn_relu(L.Conv2D(filters, 1, padding="same")(x))
    x = L.Dropout(0.4)(x)
    x = L.AveragePooling2D(pool_size=x.shape[1:3])(x)
    outputs = L.Dense(classes, activation="softmax")(L.Flatten()(x))
    return tf.keras.Model(inputs, outputs, name="ds_cnn")


def autoencoder(input_shape=(640,), hidden=128, code=8):
    inputs = tf.keras.Input(input_shape)
    x = inputs
    for units in (hidden,) * 4 + (code,) + (hidden,) * 4:
        x = L.ReLU()(L.BatchNormalization()(L.Dense(units)(x)))
    outputs = L.Dense(input_shape[0])(x)
    return tf.keras.Model(inputs, outputs, name="autoencoder")


BUILDERS = {"resnet8": resnet8, "mobilenet_vww": mobilenet_vww, "ds_cnn": ds_cnn, "autoencoder": autoencoder}


def build(name):
    return BUILDERS[name]()


def is_classifier(name):
    return name != "autoencoder"


def shape_images(images, shape, batch=1024):
    """Fashion-MNIST images [N, 28, 28, 1] in [0, 1] in ``shape`` (see the module docstring)."""
    out = []
    for i in range(0, len(images), batch):
        x = tf.convert_to_tensor(images[i:i + batch])
        if len(shape) == 1:  # the autoencoder: 32x20 = 640 values
            x = tf.reshape(tf.image.resize(x, (32, 20)), (-1, shape[0]))
        else:
            x = tf.image.resize(x, shape[:2])
            if shape[2] == 3:
                x = tf.tile(x, (1, 1, 1, 3))
        out.append(np.clip(x.numpy(), 0.0, 1.0).astype(np.float32))
    return np.concatenate(out)


def data(name, n_train, n_test):
    """((x, y) train, (x, y) test) for model ``name``; y is x itself for the autoencoder."""
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    shape = SHAPES[name]
    x, xt = shape_images(x[:n_train], shape), shape_images(xt[:n_test], shape)
    if not is_classifier(name):
        return (x, x), (xt, xt)
    return (x, y[:n_train]), (xt, yt[:n_test])


def describe(name):
    shape = "x".join(str(s) for s in SHAPES[name])
    if name == "autoencoder":
        return "Fashion-MNIST resized to 32x20 and flattened (640 values), reconstruction (MSE)"
    tiled = ", tiled to 3 channels" if SHAPES[name][-1] == 3 else ""
    return f"Fashion-MNIST resized to {shape}{tiled}, 10 classes"


def compile_model(model, name, lr):
    if is_classifier(name):
        model.compile(tf.keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
    else:
        model.compile(tf.keras.optimizers.Adam(lr), "mse")


def anomaly_scores(x, reconstruction):
    """The per-example mean squared reconstruction error (the AD benchmark's anomaly score)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    r = np.asarray(reconstruction, np.float64).reshape(len(x), -1)
    return np.mean((x - r) ** 2, axis=1)


def score_agreement(x, keras_out, runtime_out):
    """Keras vs runtime on the autoencoder: Pearson correlation of the anomaly scores, median
    relative difference of the scores, and the agreement of score > median(Keras score)."""
    a, b = anomaly_scores(x, keras_out), anomaly_scores(x, runtime_out)
    threshold = np.median(a)
    return {
        "score_correlation": float(np.corrcoef(a, b)[0, 1]),
        "score_median_rel_diff": float(np.median(np.abs(a - b) / np.maximum(a, 1e-12))),
        "decision_agreement": float(np.mean((a > threshold) == (b > threshold))),
    }
