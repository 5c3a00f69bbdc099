"""Test helpers that import neither frontend, shared by tests/ (Keras 2) and tests_keras3/ (Keras 3)."""

import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Deprecation warnings of dependencies, not of this project, that no test can act on. On Python 3.13
# TensorFlow's autograph builds gast nodes with an annotation keyword Python deprecates: hundreds of
# warnings a test that traces a function, about 31,700 in a run, which buried any warning of ours.
# With numpy 2 (Python 3.13), Keras's TensorFlow backend converts a tf.Tensor with np.array(x), whose
# __array__ (TensorFlow's EagerTensor) takes no copy keyword: numpy warns, from keras's core.py.
DEPENDENCY_WARNINGS = (
    r"ignore:.* got an unexpected keyword argument '___pyct_anno':DeprecationWarning",
    r"ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning:keras\.src\.",
)


def ignore_dependency_warnings(config):
    """pytest_configure of both conftests: :data:`DEPENDENCY_WARNINGS` filtered out."""
    for spec in DEPENDENCY_WARNINGS:
        config.addinivalue_line("filterwarnings", spec)


def run_python(code, env=None, args=(), timeout=600):
    """Run a Python snippet (or a script, with ``args``) in a fresh interpreter with this checkout
    on the path and no Keras selected by the environment (each snippet selects its own)."""
    full_env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    full_env.pop("TF_USE_LEGACY_KERAS", None)
    full_env.update(env or {})
    command = [sys.executable, *args] if args else [sys.executable, "-c", code]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout)


def separable_data(n, shape=(8, 8, 1), classes=4, seed=0, noise=0.15):
    """Synthetic images: one fixed random template per class plus noise, values in [0, 1]."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(99).uniform(0, 1, (classes, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = np.clip(templates[y] + rng.normal(0, noise, (n, *shape)), 0, 1).astype(np.float32)
    return x, y
