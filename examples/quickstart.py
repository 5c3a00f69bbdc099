"""The README's quickstart: a small SYQ CNN on Fashion-MNIST, trained, summarised, exported, verified."""
import syq_tf  # first: selects Keras 2 before TensorFlow loads
import larq as lq
import tensorflow as tf
from syq_tf.data import load_fashion_mnist

Q = syq_tf.quantizers
(x, y), (xt, yt) = load_fashion_mnist("train"), load_fashion_mnist("test")
model = tf.keras.Sequential([
    tf.keras.Input((28, 28, 1)),
    tf.keras.layers.Conv2D(32, 3, padding="same", use_bias=False), tf.keras.layers.BatchNormalization(),
    lq.layers.QuantConv2D(64, 3, strides=2, padding="same", use_bias=False,  # ternary, alpha per pixel
                          kernel_quantizer=Q.SYQ(2, "pixel"), input_quantizer=Q.DoReFa(8)),
    tf.keras.layers.BatchNormalization(), tf.keras.layers.Flatten(),
    lq.layers.QuantDense(10, kernel_quantizer=Q.SYQ(1, "channel"), input_quantizer=Q.DoReFa(8)),
])
model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
model.fit(x, y, epochs=1, batch_size=128)
syq_tf.summary(model)                                   # bits, scales, bytes, MACs per layer
result = syq_tf.export.to_tflite(model, representative_data=x[:500], verify_data=xt, verify_labels=yt)
result.save("model.tflite")                             # + model.tflite.json, the report
print(result.table())                                   # codebooks exact? bytes vs minimum, agreement
syq_tf.export.to_tflite(model, x[:500], target="tflm").save("model_tflm.tflite")  # + .h/.cc for MCUs
