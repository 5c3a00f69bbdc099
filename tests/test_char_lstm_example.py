"""The character-LSTM example end to end on a tiny synthetic corpus: float and LAQ runs train,
report cross-entropy, save/reload exactly and export to a fused TFLite LSTM that LiteRT runs."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import char_lstm_laq  # noqa: E402


def test_example_runs_end_to_end(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"#define REG_{i} 0x{i * 37 % 256:02x}\n" for i in range(400)]
    (corpus / "regs.h").write_text("".join(lines))
    out = tmp_path / "out"
    code = char_lstm_laq.main([
        "--corpus", str(corpus), "--runs", "float,laq2", "--units", "16", "--seq-len", "20",
        "--batch-size", "8", "--steps", "10", "--eval-chars", "400", "--verify-sequences", "4",
        "--out", str(out),
    ])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    results = metrics["results"]
    assert set(results) == {"float", "laq2"}
    for row in results.values():
        assert 0 < row["test_cross_entropy_nats"] < 5 and len(row["valid_loss_per_epoch"]) == 5
    laq = results["laq2"]
    assert laq["reload_max_abs_diff"] == 0.0
    assert laq["tflite"]["all_codebooks_exact"] and laq["tflite"]["verification"]["examples"] == 4
    assert all(c["distinct_values"] <= 3 for c in laq["codebooks"].values())  # 2-bit LAQ: {0, +-alpha}
    assert os.path.getsize(out / "laq2.tflite") == laq["tflite"]["model_bytes"]
