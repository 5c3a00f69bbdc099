"""QuantizerLogger writes the scales, codebooks and loss-aware curvature to TensorBoard event files."""

import glob

import numpy as np
import tensorflow as tf

import syq_tf
from conftest import separable_data
from syq_tf.callbacks import QuantizerLogger
from syq_tf.quantizers import SYQ, LossAware


def _events(log_dir):
    found = {}
    for path in glob.glob(f"{log_dir}/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
                found.setdefault(value.tag, []).append((event.step, tensor))
    return found


def test_logger_writes_scales_codebooks_and_curvature(tmp_path):
    x, y = separable_data(64)
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        syq_tf.quantize(tf.keras.layers.Conv2D(4, 3, name="conv"), kernel_quantizer=SYQ(2, "channel")),
        tf.keras.layers.Flatten(),
        syq_tf.quantize(tf.keras.layers.Dense(4, name="fc"), kernel_quantizer=LossAware("ternary_exact")),
    ])
    optimizer = syq_tf.LossAwareAdam(1e-2)
    model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, verbose=0, callbacks=[QuantizerLogger(str(tmp_path))])
    events = _events(str(tmp_path))
    for tag in ("conv/kernel/alpha", "conv/kernel/alpha/mean", "conv/kernel/alpha/3", "conv/kernel/codebook",
                "conv/kernel/levels", "conv/kernel/weights", "fc/kernel/alpha/0", "fc/kernel/curvature",
                "fc/kernel/curvature/mean"):
        assert [step for step, _ in events[tag]] == [1, 2], tag
    # the logged values are the model's
    step, alpha3 = events["conv/kernel/alpha/3"][-1]
    assert np.isclose(float(alpha3), model.get_layer("conv").kernel_quantizer.alpha.numpy().ravel()[3])
    _, levels = events["conv/kernel/levels"][-1]
    assert float(levels) == np.unique(model.get_layer("conv").quantized_kernel().numpy()).size <= 9
    assert "conv/kernel/curvature" not in events  # SYQ has no curvature
    # d = sqrt(v_hat) + eps of the last update (t = iterations), from Adam's own second moments
    kernel = model.get_layer("fc").float_kernels()["kernel"][1]
    v = optimizer._velocities[optimizer._index_dict[optimizer._var_key(kernel)]].numpy()
    d = np.sqrt(v / (1 - 0.999 ** int(optimizer.iterations.numpy()))) + 1e-8
    np.testing.assert_allclose(float(events["fc/kernel/curvature/mean"][-1][1]), d.mean(), rtol=1e-5)
