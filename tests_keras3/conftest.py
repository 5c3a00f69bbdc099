"""Tests of the Keras 3 frontend. They run in their own pytest process (``make test`` runs
``tests/`` and then this folder): the two frontends never share a process."""

import os
import sys

import numpy as np

import syq_tf.keras3  # noqa: F401  (first: selects Keras 3)

import keras
import pytest

# the helpers that import no frontend live beside the Keras 2 tests (tests/neutral.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from neutral import REPO, ignore_dependency_warnings, run_python, separable_data  # noqa: E402, F401  (re-exported to the tests)


def pytest_configure(config):
    ignore_dependency_warnings(config)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


def reloaded_in_a_fresh_process(model, x, tmp_path, report, save=None):
    """Save ``model`` as ``.keras`` (with ``save(model, path)``, default ``model.save``), load it in a
    new Python process with Keras's safe mode and nothing imported but ``syq_tf.keras3``, assert its
    outputs on ``x`` are identical there, and return the last line ``print(report)`` wrote (``report``:
    an expression of the loaded model ``m``)."""
    path = str(tmp_path / "m.keras")
    (save or (lambda m, p: m.save(p)))(model, path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    code = (f"import keras, numpy as np\nimport syq_tf.keras3\n"
            f"m = keras.saving.load_model({path!r})\n"
            f"x = np.load({str(tmp_path / 'x.npy')!r}); y = np.load({str(tmp_path / 'y.npy')!r})\n"
            "assert np.array_equal(m.predict(x, verbose=0), y)\n"
            f"print({report})")
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.rstrip("\n").split("\n")[-1]


def fake_quant(x, low, high):
    """numpy: TensorFlow's FakeQuant (8 bits, not narrow) written out: the range nudged so that 0 is a
    level, then round half up onto its 256 levels."""
    scale = (high - low) / 255.0
    zero = np.clip(np.round(-low / scale), 0, 255)  # low <= 0 <= high here
    low, high = -zero * scale, (255 - zero) * scale
    return np.floor((np.clip(x, low, high) - low) / scale + 0.5) * scale + low


def encoder(vocab=30, dim=16):
    """A tiny Transformer encoder on 12 token ids (Embedding, MultiHeadAttention, Add,
    LayerNormalization, pooling, Dense head), every layer named."""
    tokens = keras.Input((12,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab, dim, name="embed")(tokens)
    a = keras.layers.MultiHeadAttention(2, dim // 2, name="mha")(x, x)
    x = keras.layers.LayerNormalization(name="ln")(keras.layers.Add(name="res")([x, a]))
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling1D(name="pool")(x))
    return keras.Model(tokens, out)
