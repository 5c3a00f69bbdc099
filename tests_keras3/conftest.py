"""Tests of the Keras 3 frontend. They run in their own pytest process (``make test`` runs
``tests/`` and then this folder): the two frontends never share a process."""

import os
import sys

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
