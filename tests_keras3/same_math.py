"""The same quantizer computations under either frontend, for tests_keras3/test_same_math.py.

``python tests_keras3/same_math.py 2 out.npz`` runs them under Keras 2 (``import syq_tf``) and saves
every forward output, learned scale and gradient; the test runs :func:`compute` under Keras 3 in its
own process and compares the two bit for bit.
"""

import sys

import numpy as np


def cases(Q):
    """(name, quantizer factory, role) for every quantizer family and mode."""
    out = []
    for bits in (1, 2):
        for granularity in ("layer", "row", "pixel", "channel"):
            out.append((f"syq{bits}_{granularity}", lambda b=bits, g=granularity: Q.SYQ(b, g), "weight"))
    out += [
        ("uniq4_channel", lambda: Q.UniQ(4, "channel"), "weight"),
        ("uniq2_layer", lambda: Q.UniQ(2), "weight"),
        ("uniq_act4", lambda: Q.UniQActivation(4, initial_step=0.3), "activation"),
        ("uniq_act2_official", lambda: Q.UniQActivation(2, initial_step=0.5, step_grad="official"), "activation"),
        ("dorefa4", lambda: Q.DoReFa(4), "activation"),
        ("ls_act_lsT", lambda: Q.LeastSquaresActivation("lsT"), "activation"),
        ("ls_act_ls2", lambda: Q.LeastSquaresActivation("ls2"), "activation"),
        ("lab", lambda: Q.LossAware("binary", curvature="constant"), "weight"),
        ("lat", lambda: Q.LossAware("ternary", curvature="constant"), "weight"),
        ("lat_exact", lambda: Q.LossAware("ternary_exact", curvature="constant"), "weight"),
        ("lat2", lambda: Q.LossAware("ternary_two_scale", curvature="constant"), "weight"),
        ("laq3", lambda: Q.LossAware("linear", bits=3, curvature="constant"), "weight"),
        ("laq3_log", lambda: Q.LossAware("log", bits=3, curvature="constant"), "weight"),
    ]
    for mode in ("ls1", "ls2", "lsT", "gf3"):
        for backward in ("ste", "official"):
            out.append((f"ls_{mode}_{backward}", lambda m=mode, b=backward: Q.LeastSquares(m, backward=b), "weight"))
    return out


def compute(Q, tf):
    """{key: array} of forward outputs, variables and gradients of every case on fixed tensors."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.1, (3, 3, 4, 5)).astype(np.float32)
    a = np.abs(rng.normal(0.4, 0.5, (6, 4, 4, 3))).astype(np.float32)
    g_w = rng.normal(size=w.shape).astype(np.float32)
    g_a = rng.normal(size=a.shape).astype(np.float32)
    results = {}
    for name, make, role in cases(Q):
        quantizer = make()
        x = tf.constant(w if role == "weight" else a)
        upstream = tf.constant(g_w if role == "weight" else g_a)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = quantizer(x, training=True) if role == "activation" else quantizer(x)
            loss = tf.reduce_sum(y * upstream)
        variables = [v for v in quantizer.trainable_weights]
        grads = tape.gradient(loss, [x, *variables])
        results[f"{name}/out"] = np.asarray(y)
        results[f"{name}/dx"] = np.asarray(grads[0])
        for variable, grad in zip(variables, grads[1:]):
            results[f"{name}/dvar{variables.index(variable)}"] = np.asarray(grad)
        for i, variable in enumerate(quantizer.weights):
            results[f"{name}/var{i}"] = np.asarray(variable.numpy())
    return results


if __name__ == "__main__":
    frontend, path = sys.argv[1], sys.argv[2]
    if frontend == "2":
        import syq_tf as syq
    else:
        import syq_tf.keras3 as syq
    import tensorflow as tf

    np.savez(path, **compute(syq.quantizers, tf))
