"""MultiHeadAttention with ``attention_ranges``: the attention's inner tensors on the int8 values
TFLite stores -- moving-average ranges on the projected query, key and value, the scores before and
after the scale and the weighted sum, the softmax probabilities on SOFTMAX's grid k/256 -- against
a numpy reference; the ranges learned in training; saved and reloaded; exported as the int8 scales of
those tensors."""

import keras
import numpy as np
import pytest
from conftest import encoder, fake_quant, reloaded_in_a_fresh_process

import syq_tf.keras3 as syq
from syq_tf.export.runtime import litert_interpreter
from syq_tf.layers import ATTENTION_RANGES

Q = syq.quantizers
HEADS, KEY_DIM, LENGTH, DIM = 2, 4, 5, 6


def attention(**kwargs):
    mha = syq.quantize(keras.layers.MultiHeadAttention(HEADS, KEY_DIM, name="mha"), kernel_quantizer=Q.SYQ(2),
                       **kwargs)
    x = np.random.default_rng(0).normal(size=(3, LENGTH, DIM)).astype(np.float32)
    mha(x, x, training=True)  # builds; the ranges (if any) start from this batch
    return mha, x


def projection(mha, attr, x):
    dense = getattr(mha, attr)
    kernel = dense.quantized_kernel().numpy()
    return np.einsum(dense.equation, x, kernel) + dense.bias.numpy()


def test_ranged_attention_against_numpy():
    """Inference: every stored tensor through its range, the probabilities rounded to k/256."""
    mha, x = attention(attention_ranges=True)
    ranges = mha.range_quantizers()
    assert sorted(ranges) == sorted(ATTENTION_RANGES)
    assert {q.name for q in ranges.values()} == {f"mha_{n}_range" for n in ATTENTION_RANGES}
    rng = np.random.default_rng(1)
    for q in ranges.values():  # ranges as a trained layer has them
        q.low.assign(-float(rng.uniform(0.5, 3))), q.high.assign(float(rng.uniform(0.5, 3)))
        q.range_initialized.assign(True)

    def ranged(name, v):
        q = ranges[name]
        return fake_quant(v, float(q.low.numpy()), float(q.high.numpy()))

    query = ranged("query", projection(mha, "_query_dense", x))  # [B, T, N, H]
    key = ranged("key", projection(mha, "_key_dense", x))
    value = ranged("value", projection(mha, "_value_dense", x))
    scores = ranged("scores", np.einsum("bsnh,btnh->bnts", key, query))
    scores = ranged("scaled_scores", scores / np.sqrt(KEY_DIM))
    e = np.exp(scores - scores.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    p = np.minimum(np.floor(256 * p + 0.5), 255) / 256  # SOFTMAX's int8 grid
    context = ranged("context", np.einsum("bnts,bsnh->btnh", p, value))
    out = np.einsum(mha._output_dense.equation, context, mha._output_dense.quantized_kernel().numpy())
    expected = out + mha._output_dense.bias.numpy()
    got, probabilities = mha(x, x, return_attention_scores=True)
    np.testing.assert_allclose(probabilities.numpy(), p, atol=1e-6)
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-5)
    # without ranges the same layer computes in float: different values
    plain, _ = attention()
    for attr in mha.PROJECTIONS:
        getattr(plain, attr).set_weights(getattr(mha, attr).get_weights())
    assert np.abs(plain(x, x).numpy() - got.numpy()).max() > 1e-3


def test_ranges_start_from_the_first_training_batch():
    """Training: the first batch sets each range to [min(0, min), max(0, max)] of its tensor."""
    mha, x = attention(attention_ranges=True)
    for r in mha.range_quantizers().values():
        r.range_initialized.assign(False)
    x = 2 * x
    query = projection(mha, "_query_dense", x)
    mha(x, x, training=True)
    q = mha.range_quantizers()["query"]
    np.testing.assert_allclose([q.low.numpy(), q.high.numpy()], [min(0, query.min()), max(0, query.max())],
                               rtol=1e-5)
    assert all(bool(r.range_initialized.numpy()) for r in mha.range_quantizers().values())


def test_attention_ranges_errors():
    with pytest.raises(ValueError, match=r"layer 'mha' \(MultiHeadAttention\): attention_ranges=1; allowed: "
                                         r"True, False\."):
        syq.quantize(keras.layers.MultiHeadAttention(2, 4, name="mha"), kernel_quantizer=Q.SYQ(2), attention_ranges=1)
    with pytest.raises(ValueError, match=r"attention_ranges is for MultiHeadAttention layers \(an instance\); "
                                         r"Dense has no attention\."):
        syq.quantize(keras.layers.Dense(4), kernel_quantizer=Q.SYQ(2), attention_ranges=True)


def test_quantize_model_trains_saves_and_exports_the_ranges(tmp_path):
    """quantize_model gives MultiHeadAttention its inner ranges; fit learns them, .keras keeps them
    (a fresh process, safe mode), and the int8 model stores each of those tensors at its range's scale
    and zero point, the probabilities at SOFTMAX's 1/256, -128."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, (96, 12)).astype(np.int32)
    y = (x[:, :4].sum(1) % 3).astype(np.int64)
    q = syq.quantize_model(encoder(), scheme="syq-w2a8")
    mha = q.get_layer("mha")
    assert mha.attention_ranges and mha.get_config()["attention_ranges"] is True
    q.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, epochs=2, batch_size=16, verbose=0)
    learned = {n: (float(r.low.numpy()), float(r.high.numpy())) for n, r in mha.range_quantizers().items()}
    assert all(low < 0 < high for low, high in learned.values()), learned

    ranges = reloaded_in_a_fresh_process(q, x[:8], tmp_path, "sorted((n, float(r.low.numpy()), float(r.high.numpy())) "
                                         "for n, r in m.get_layer('mha').range_quantizers().items())")
    assert ranges == str(sorted((n, lo, hi) for n, (lo, hi) in learned.items()))

    result = syq.export.to_tflite(q, x[:64], target="litert", verify_data=x)
    assert result.verification["top1_agreement"] >= 0.95
    interpreter = litert_interpreter(bytes(result))
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    outputs, producer = {}, {}  # op -> the int8 (scale, zero point) of its outputs, in graph order
    ops = interpreter._get_ops_details()  # noqa: SLF001
    for op in ops:
        outputs.setdefault(op["op_name"], []).append(details[op["outputs"][0]]["quantization"])
        producer[op["outputs"][0]] = op["op_name"]

    def int8_params(name):
        low, high = learned[name]
        scale = (high - low) / 255.0
        return scale, int(-128 + np.clip(np.round(-low / scale), 0, 255))

    matmuls = outputs["BATCH_MATMUL"]
    assert len(matmuls) == 2 and outputs["SOFTMAX"][0] == (1 / 256, -128)
    for (scale, zero), name in zip(matmuls, ("scores", "context")):
        np.testing.assert_allclose(scale, int8_params(name)[0], rtol=1e-5)
        assert zero == int8_params(name)[1]
    scaled = [p for p in outputs["MUL"] if np.isclose(p[0], int8_params("scaled_scores")[0], rtol=1e-5)]
    assert scaled and scaled[0][1] == int8_params("scaled_scores")[1]
    projections = outputs["FULLY_CONNECTED"]
    for name in ("query", "key", "value"):
        scale, zero = int8_params(name)
        assert any(np.isclose(s, scale, rtol=1e-5) and z == zero for s, z in projections), (name, projections)
    # no requantization inside the attention (the one QUANTIZE: the LayerNormalization's float NEG)
    assert [producer[op["inputs"][0]] for op in ops if op["op_name"] == "QUANTIZE"] == ["NEG"]
    # traced: the attention's output is LiteRT's up to rounding ties
    rows = {row.layer: row for row in syq.export.trace_divergence(q, bytes(result), x, max_examples=16)}
    assert rows["mha"].max_steps <= 1 and rows["mha"].off_by_1 <= 0.1, rows["mha"]


def test_masks_keep_their_meaning():
    """A causal mask: no position reads a later one; a padding mask: masked keys get probability 0."""
    mha, x = attention(attention_ranges=True)
    later = x.copy()
    later[:, -1] += 5.0  # change only the last position
    causal = mha(x, x, use_causal_mask=True).numpy()
    np.testing.assert_array_equal(causal[:, :-1], mha(later, later, use_causal_mask=True).numpy()[:, :-1])
    assert np.abs(causal[:, -1] - mha(later, later, use_causal_mask=True).numpy()[:, -1]).max() > 0
    mask = np.ones((3, LENGTH, LENGTH), bool)
    mask[:, :, -2:] = False  # the last two keys masked out
    _, probabilities = mha(x, x, attention_mask=mask, return_attention_scores=True)
    p = probabilities.numpy()
    assert (p[..., -2:] == 0).all() and (p[..., :-2].sum(-1) > 0.9).all()
