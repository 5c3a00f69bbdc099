import syq_tf  # noqa: F401  (first: selects Keras 2)

import pytest
import tensorflow as tf
from neutral import REPO, ignore_dependency_warnings, run_python, separable_data  # noqa: F401  (re-exported)


def pytest_configure(config):
    ignore_dependency_warnings(config)


@pytest.fixture(autouse=True)
def _seed():
    tf.keras.utils.set_random_seed(1234)
    yield
    tf.keras.backend.clear_session()


def compiled_classifier(model, learning_rate=1e-2):
    """``model`` compiled as the tests' small classifiers are: Adam, cross-entropy on logits, accuracy."""
    model.compile(tf.keras.optimizers.Adam(learning_rate),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def trained_classifier(model, seed, epochs, n=768, train=640):
    """``model`` trained on :func:`separable_data` (the first ``train`` of ``n`` examples) from scales
    set on its initial weights: (model, x, y, last training accuracy). BatchNormalization's moving
    statistics then settle on the final weights (three passes over the training data in training mode,
    no weight updates): a short training at a high learning rate leaves them behind the weights, and
    the model's inference accuracy varied from chance to 0.99 with the thread count (measured)."""
    x, y = separable_data(n, seed=seed)
    syq_tf.reinitialize_scales(model)
    history = model.fit(x[:train], y[:train], epochs=epochs, batch_size=32, verbose=0)
    if any(isinstance(layer, tf.keras.layers.BatchNormalization) for layer in model.layers):
        for _ in range(3):
            for start in range(0, train, 32):
                model(x[start:start + 32], training=True)
    return model, x, y, history.history["accuracy"][-1]

