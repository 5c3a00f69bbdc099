"""Readers of untrusted files fail cleanly: truncated, corrupted and oversized .tflite flatbuffers
give a ValueError (never another exception, never a hang); quantizer configs cannot smuggle in
code (a Lambda or an unknown class is refused, not deserialized)."""

import time

import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from conftest import separable_data
from syq_tf.export import flatbuffer
from syq_tf.layers import deserialize_quantizer
from syq_tf.quantizers import SYQ

READERS = (flatbuffer.weight_tensors, flatbuffer.op_names, flatbuffer.bias_tensors)


def _kernel_readers():
    from syq_tf import kernels

    if not kernels.available():
        return ()
    return (kernels.packed_layers, kernels.TFLiteRunner)


@pytest.fixture(scope="module")
def model_bytes():
    x, _ = separable_data(32)
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        syq_tf.quantize(tf.keras.layers.Conv2D(4, 3, name="c"), kernel_quantizer=SYQ(2, "channel")),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(4),
    ])
    return bytes(syq_tf.export.to_tflite(model, representative_data=x).flatbuffer)


def _variants(buffer, seed=0, flips=300):
    rng = np.random.default_rng(seed)
    yield from (buffer[:n] for n in range(0, len(buffer), max(1, len(buffer) // 60)))
    for _ in range(flips):
        corrupted = bytearray(buffer)
        for i in rng.integers(0, len(buffer), rng.integers(1, 24)):
            corrupted[i] = int(rng.integers(0, 256))
        yield bytes(corrupted)
    yield buffer + rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    yield b"\x00" * 8 + b"TFL3"
    yield b""


def test_flatbuffer_readers_reject_malformed_files_with_value_errors(model_bytes):
    assert flatbuffer.op_names(model_bytes) == ["CONV_2D", "RESHAPE", "FULLY_CONNECTED"]
    start, outcomes = time.monotonic(), {"ok": 0, "ValueError": 0}
    from syq_tf.kernels import UnsupportedOp

    for variant in _variants(model_bytes):
        for read in READERS + _kernel_readers():
            try:
                read(variant)
                outcomes["ok"] += 1
            except UnsupportedOp:  # a corrupted op code that names an op the runner lacks: clear too
                outcomes["ok"] += 1
            except ValueError as err:
                assert str(err)  # a message, not a bare error
                outcomes["ValueError"] += 1
    assert outcomes["ValueError"] > 500 and time.monotonic() - start < 60
    for bad in (None, "model.tflite", 123):
        with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
            flatbuffer.op_names(bad)


def test_quantizer_configs_cannot_deserialize_code():
    lambda_config = {"class_name": "Lambda", "config": {"function": ("print('pwned')", None, None),
                                                         "function_type": "lambda", "name": "x"}}
    with pytest.raises(ValueError):
        deserialize_quantizer(lambda_config)
    with pytest.raises(ValueError):
        deserialize_quantizer({"class_name": "NoSuchQuantizer", "config": {}})
    layer_config = {**tf.keras.layers.Dense(2, name="d").get_config(), "kernel_quantizer": lambda_config}
    with pytest.raises(ValueError):
        syq_tf.layers.QuantizedDense.from_config(layer_config)
