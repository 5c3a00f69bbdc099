"""Tests of the Keras 3 frontend. They run in their own pytest process (``make test`` runs
``tests/`` and then this folder): the two frontends never share a process."""

import os
import subprocess
import sys

import syq_tf.keras3  # noqa: F401  (first: selects Keras 3)

import keras
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


def run_python(code, env=None, args=()):
    """Run a Python snippet (or a script, with ``args``) in a fresh interpreter."""
    full_env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    full_env.pop("TF_USE_LEGACY_KERAS", None)
    full_env.update(env or {})
    command = [sys.executable, *args] if args else [sys.executable, "-c", code]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=600)


def separable_data(n, shape=(8, 8, 1), classes=4, seed=0, noise=0.15):
    """Synthetic images: one fixed random template per class plus noise, values in [0, 1]."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(99).uniform(0, 1, (classes, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = np.clip(templates[y] + rng.normal(0, noise, (n, *shape)), 0, 1).astype(np.float32)
    return x, y
