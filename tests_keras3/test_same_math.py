"""One copy of the math: every quantizer gives bit-identical outputs, scales and gradients under
Keras 2 (a separate process) and Keras 3 (this one) on the same tensors."""

import os

import numpy as np
import tensorflow as tf
from conftest import REPO, run_python

import syq_tf.keras3 as syq

SCRIPT = os.path.join(REPO, "tests_keras3", "same_math.py")


def test_quantizers_are_bit_identical_across_frontends(tmp_path):
    import same_math  # noqa: PLC0415  (tests_keras3 is on sys.path under pytest)

    keras2 = tmp_path / "keras2.npz"
    r = run_python(None, args=(SCRIPT, "2", str(keras2)))
    assert r.returncode == 0, r.stderr[-2000:]
    reference = np.load(keras2)
    ours = same_math.compute(syq.quantizers, tf)
    assert sorted(reference.files) == sorted(ours)
    names = {key.split("/")[0] for key in ours}
    assert len(names) == len(same_math.cases(syq.quantizers)) == 29
    assert any(key.endswith("/dvar0") for key in ours)  # scale gradients are compared too
    differing = [key for key in ours if not np.array_equal(reference[key], ours[key])]
    assert differing == []
    # and they are not trivially equal: SYQ ternary per channel has three levels per channel
    levels = np.unique(np.round(ours["syq2_channel/out"][..., 0], 7))
    assert len(levels) == 3 and levels[1] == 0.0
