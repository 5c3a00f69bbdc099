"""MirroredStrategy on two logical CPU devices trains SYQ, UniQ, least-squares and loss-aware models
to the same weights
as one device with the same global batch (scales created under the strategy scope; LossAwareAdam's
projection runs on every replica with the aggregated gradient)."""

from conftest import run_python

SCRIPT = r'''
import sys
import syq_tf, tensorflow as tf, numpy as np
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, "tests")
from conftest import separable_data
Q = syq_tf.quantizers
x, y = separable_data(128)

def build(kind):
    tf.keras.utils.set_random_seed(7)
    weight = {"syq": Q.SYQ(2, "channel"), "la": Q.LossAware("ternary"), "laq": Q.LossAware("linear", bits=3),
              "uniq": Q.UniQ(3, "channel"), "ls": Q.LeastSquares("ls2")}[kind]
    act = {"syq": Q.DoReFa(4), "uniq": Q.UniQActivation(4, initial_step=0.2),
           "ls": Q.LeastSquaresActivation("lsT", momentum=0.9)}.get(kind)
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        syq_tf.quantize(tf.keras.layers.Conv2D(4, 3, name="c"), kernel_quantizer=weight, input_quantizer=act),
        tf.keras.layers.Flatten(), tf.keras.layers.Dense(4)])
    optimizer = syq_tf.LossAwareAdam(1e-2) if kind.startswith("la") else tf.keras.optimizers.SGD(0.1)
    model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model

# one strategy for all models: separate MirroredStrategy objects in one process reuse collective
# instance keys (TF aborts with a shape mismatch between the two models' gradient all-reduces)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
for kind in ("syq", "la", "laq", "uniq", "ls"):
    single = build(kind)
    single.fit(x, y, epochs=2, batch_size=32, shuffle=False, verbose=0)
    with strategy.scope():
        mirrored = build(kind)
    mirrored.fit(x, y, epochs=2, batch_size=32, shuffle=False, verbose=0)
    # trained weights and scales; (moving averages of least-squares activations, like Keras
    # BatchNorm's, are per-replica batch statistics and differ slightly: not compared)
    worst = max(float(np.max(np.abs(a.numpy().astype(np.float64) - b.numpy().astype(np.float64))))
                for a, b in zip(single.weights, mirrored.weights)
                if a.dtype != tf.bool and "moving_scalars" not in a.name)
    q = mirrored.get_layer("c").kernel_quantizer
    print(kind, worst, type(q.weights[0]).__name__ if q.weights else "None")
'''


def test_mirrored_strategy_matches_single_device():
    result = run_python(SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert set(lines) == {"syq", "la", "laq", "uniq", "ls"}
    for kind, rest in lines.items():
        worst, var_type = rest.split()
        assert float(worst) < 1e-5, (kind, worst)
        assert var_type in ("MirroredVariable", "None")  # the scales live on both replicas
