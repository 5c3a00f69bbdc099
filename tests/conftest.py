import os
import subprocess
import sys

import syq_tf  # noqa: F401  (first: selects Keras 2)

import numpy as np
import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    tf.keras.utils.set_random_seed(1234)
    yield
    tf.keras.backend.clear_session()


def run_python(code, env=None):
    """Run a Python snippet in a fresh interpreter (import-order and load-without-scope tests)."""
    full_env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    full_env.pop("TF_USE_LEGACY_KERAS", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=300)


def separable_data(n, shape=(8, 8, 1), classes=4, seed=0, noise=0.15):
    """Synthetic images: one fixed random template per class plus noise, values in [0, 1]."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(99).uniform(0, 1, (classes, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = np.clip(templates[y] + rng.normal(0, noise, (n, *shape)), 0, 1).astype(np.float32)
    return x, y


def compiled_classifier(model, learning_rate=1e-2):
    """``model`` compiled as the tests' small classifiers are: Adam, cross-entropy on logits, accuracy."""
    model.compile(tf.keras.optimizers.Adam(learning_rate),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def trained_classifier(model, seed, epochs, n=768, train=640):
    """``model`` trained on :func:`separable_data` (the first ``train`` of ``n`` examples) from scales
    set on its initial weights: (model, x, y, last training accuracy)."""
    import syq_tf  # noqa: PLC0415

    x, y = separable_data(n, seed=seed)
    syq_tf.reinitialize_scales(model)
    history = model.fit(x[:train], y[:train], epochs=epochs, batch_size=32, verbose=0)
    return model, x, y, history.history["accuracy"][-1]

