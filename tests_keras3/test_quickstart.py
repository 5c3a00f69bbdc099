"""The Keras 3 quickstart example (examples/keras3_quickstart.py, the README's) end to end on a
few hundred images: float training, quantize_model, fit, .keras round trip, LiteRT and TFLM export."""

import json
import os
import sys

from syq_tf.export import flatbuffer

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "examples"))

import keras3_quickstart  # noqa: E402


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    code = keras3_quickstart.main(["--train", "512", "--test", "256", "--float-epochs", "1", "--q-epochs", "1",
                                   "--out", str(out)])
    assert code == 0  # the reloaded .keras model computes what the trained one did
    for name, storage in (("model", "int4"), ("model_tflm", "lut")):
        buffer = (out / f"{name}.tflite").read_bytes()
        report = json.loads((out / f"{name}.tflite.json").read_text())
        assert report["model_bytes"] == len(buffer)
        layers = {r["layer"]: r for r in report["layers"]}
        assert set(layers) == {"conv1", "dw2", "conv3", "conv4", "classifier"}
        assert all(r["exact"] for r in layers.values()), layers
        for ternary in ("dw2", "conv3", "conv4"):  # the scheme's low-bit layers; first and last 8-bit
            assert layers[ternary]["stored_levels"] <= 3 and layers[ternary]["storage"] == storage
        assert layers["conv1"]["bits"] == layers["classifier"]["bits"] == 8
        v = report["verification"]
        assert v["examples"] == 256
        assert v["top1_agreement"] >= 0.95, v
        # 8-bit pixel values (0..255) are on the exported int8 input's grid: LiteRT reads them exactly
        assert flatbuffer.io_quantization(buffer, "input") == (1.0, -128)
    assert (out / "model_tflm.h").exists() and (out / "model.keras").exists()
