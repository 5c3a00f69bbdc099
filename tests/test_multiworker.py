"""MultiWorkerMirroredStrategy with 2 local worker processes on loopback (TF_CONFIG) trains SYQ, UniQ
and loss-aware models to the same weights as one device with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import tensorflow as tf

import syq_tf
from conftest import REPO, separable_data

Q = syq_tf.quantizers
KINDS = ("syq", "la", "uniq")

WORKER = r'''
import json, os, sys
index, port0, port1, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{port0}", f"localhost:{port1}"]},
                                      "task": {"type": "worker", "index": index}})
import syq_tf, tensorflow as tf
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tests"))
from test_multiworker import build
from conftest import separable_data
strategy = tf.distribute.MultiWorkerMirroredStrategy()
x, y = separable_data(128)
results = {}
for kind in ("syq", "la", "uniq"):
    with strategy.scope():
        model = build(kind)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32).with_options(options), epochs=2, verbose=0)
    results[kind] = [w.numpy().tolist() for w in model.weights if w.dtype != tf.bool]
if index == 0:
    with open(out, "w") as f:
        json.dump(results, f)
'''


def build(kind):
    tf.keras.utils.set_random_seed(7)
    weight = {"syq": Q.SYQ(2, "channel"), "la": Q.LossAware("ternary"), "uniq": Q.UniQ(3, "channel")}[kind]
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        syq_tf.quantize(tf.keras.layers.Conv2D(4, 3, name="c"), kernel_quantizer=weight),
        tf.keras.layers.Flatten(), tf.keras.layers.Dense(4)])
    optimizer = syq_tf.LossAwareAdam(1e-2) if kind == "la" else tf.keras.optimizers.SGD(0.1)
    model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_local_workers_match_single_device(tmp_path):
    script, out = tmp_path / "worker.py", tmp_path / "weights.json"
    script.write_text(WORKER)
    ports = [str(_free_port()), str(_free_port())]
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_USE_LEGACY_KERAS", None)
    workers = [subprocess.Popen([sys.executable, str(script), str(i), *ports, str(out)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    try:
        logs = [w.communicate(timeout=300) for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert all(w.returncode == 0 for w in workers), logs[0][1][-2000:] + logs[1][1][-2000:]
    distributed = json.loads(out.read_text())
    x, y = separable_data(128)
    for kind in KINDS:
        model = build(kind)
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=2, verbose=0)
        single = [w.numpy() for w in model.weights if w.dtype != tf.bool]
        assert len(single) == len(distributed[kind])
        worst = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in zip(single, distributed[kind]))
        assert worst < 1e-5, (kind, worst)
