"""A checkpoint taken mid-training and restored into a fresh model continues bit-identically: scales,
steps, moving averages, loss-aware scales and optimizer slots all come back."""

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import separable_data

Q = syq_tf.quantizers


def build(kind):
    tf.keras.utils.set_random_seed(7)
    weight = {"syq": Q.SYQ(2, "channel"), "uniq": Q.UniQ(3, "channel"), "la": Q.LossAware("ternary"),
              "ls": Q.LeastSquares("ls2")}[kind]
    act = {"syq": Q.DoReFa(4), "uniq": Q.UniQActivation(4, initial_step=0.2), "la": None,
           "ls": Q.LeastSquaresActivation("lsT", momentum=0.9)}[kind]
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        syq_tf.quantize(tf.keras.layers.Conv2D(4, 3, name="c"), kernel_quantizer=weight, input_quantizer=act),
        tf.keras.layers.BatchNormalization(), tf.keras.layers.Flatten(), tf.keras.layers.Dense(4),
    ])
    optimizer = syq_tf.LossAwareAdam(1e-2) if kind == "la" else tf.keras.optimizers.Adam(1e-2)
    model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("kind", ["syq", "uniq", "la", "ls"])
def test_restored_checkpoint_continues_bit_identically(tmp_path, kind):
    x, y = separable_data(128)
    fit = dict(epochs=1, batch_size=32, shuffle=False, verbose=0)
    model = build(kind)
    model.fit(x, y, **fit)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    model.fit(x, y, **fit)

    resumed = build(kind)
    resumed(x[:1])
    resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(path).assert_existing_objects_matched()
    resumed.fit(x, y, **fit)
    assert int(resumed.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) == 8
    for a, b in zip(model.weights, resumed.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    scales = [v for v in resumed.get_layer("c").kernel_quantizer.weights if v.dtype.is_floating]
    assert scales or kind == "ls"
