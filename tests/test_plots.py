"""syq_tf.plot_codebooks / plot_training: a decodable PNG of the expected size, a panel per quantized
kernel, the codebook numbers they draw, and clear errors."""

import json

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import syq_tf
from syq_tf import plots
from syq_tf.quantizers import SYQ, DoReFa, UniQ


def _imread(path):
    import matplotlib.image  # noqa: PLC0415

    return matplotlib.image.imread(path)


def quantized_model():
    """conv (SYQ ternary, one scale), depthwise conv (SYQ binary, per channel), dense (UniQ 3-bit
    per channel) and a float dense: three quantized kernels."""
    inp = tf.keras.Input((6, 6, 2))
    x = syq_tf.quantize(tf.keras.layers.Conv2D(3, 3, use_bias=False, name="conv"),
                        kernel_quantizer=SYQ(2, "layer"), input_quantizer=DoReFa(8))(inp)
    x = syq_tf.quantize(tf.keras.layers.DepthwiseConv2D(3, name="dw"), kernel_quantizer=SYQ(1, "channel"))(x)
    x = tf.keras.layers.Flatten()(x)
    x = lq.layers.QuantDense(5, kernel_quantizer=UniQ(3, "channel"), name="fc")(x)
    out = tf.keras.layers.Dense(2, name="head")(x)
    return tf.keras.Model(inp, out)


def test_codebook_png_has_a_panel_per_quantized_kernel(tmp_path):
    model = quantized_model()
    path = tmp_path / "sub" / "codebooks.png"
    fig = syq_tf.plot_codebooks(model, path)
    assert len(fig.axes) == 3
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("conv: SYQ W2 layer") and "1 subgroup(s), <= 3 levels each" in titles[0]
    assert titles[1].startswith("dw: SYQ W1 channel") and "3 subgroup(s), <= 2 levels each" in titles[1]
    assert titles[2].startswith("fc: UniQ W3 channel") and "5 subgroup(s)" in titles[2]
    image = _imread(path)
    # three panels in one row of PANEL_SIZE inches at DPI
    assert image.shape[:2] == (round(plots.PANEL_SIZE[1] * plots.DPI), round(3 * plots.PANEL_SIZE[0] * plots.DPI))
    assert image.shape[:2] == (325, 1350)
    assert image[..., :3].std() > 0.05  # something is drawn
    # the red level lines of the ternary layer sit at -alpha, 0, +alpha
    alpha = float(model.get_layer("conv").kernel_quantizer.alpha.numpy().ravel()[0])
    lines = fig.axes[0].collections[-1]
    xs = sorted({round(float(seg[0][0]), 6) for seg in lines.get_segments()})
    np.testing.assert_allclose(xs, [-alpha, 0.0, alpha], rtol=1e-5, atol=1e-7)


def test_codebook_grid_wraps_into_rows(tmp_path):
    fig = syq_tf.plot_codebooks(quantized_model(), tmp_path / "c.png", columns=2, dpi=50)
    assert len(fig.axes) == 3
    image = _imread(tmp_path / "c.png")
    assert image.shape[:2] == (round(2 * plots.PANEL_SIZE[1] * 50), round(2 * plots.PANEL_SIZE[0] * 50))


def test_kernel_codebook_numbers_by_hand():
    q = SYQ(2, "layer", eta=0.05)
    kernel = tf.constant([[0.5, -0.25, 0.01], [-1.0, 0.0, 0.75]])  # eta = 0.05: |w| <= 0.05 -> 0
    q.build(kernel.shape)
    q.alpha.assign([[0.4]])
    q.alpha_initialized.assign(True)
    book = plots.kernel_codebook(q, kernel)
    np.testing.assert_allclose(book["values"], [[0.4, -0.4, 0.0], [-0.4, 0.0, 0.4]], rtol=1e-6)
    np.testing.assert_allclose(book["levels"], [-0.4, 0.0, 0.4], rtol=1e-6)
    assert (book["subgroups"], book["levels_per_subgroup"], book["bits"]) == (1, 3, 2)

    b = SYQ(1, "channel")
    kernel = tf.constant([[0.5, -0.2, 0.3], [-1.0, 0.1, -0.3]])
    b.build(kernel.shape)
    b.alpha.assign([[0.1, 0.2, 0.3]])
    b.alpha_initialized.assign(True)
    book = plots.kernel_codebook(b, kernel)
    np.testing.assert_allclose(book["levels"], [-0.3, -0.2, -0.1, 0.1, 0.2, 0.3], rtol=1e-6)
    assert (book["subgroups"], book["levels_per_subgroup"], book["bits"]) == (3, 2, 1)


def test_codebook_errors(tmp_path):
    float_model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2, name="d")], name="plain")
    with pytest.raises(ValueError, match="model 'plain' has no quantized kernels"):
        syq_tf.plot_codebooks(float_model, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="columns=0"):
        syq_tf.plot_codebooks(quantized_model(), tmp_path / "x.png", columns=0)


METRICS = {
    "label": "SYQ W2A8 pixel",
    "history": {
        "float": {"loss": [1.2, 0.8], "accuracy": [0.6, 0.7], "test_loss": [1.0, 0.9],
                  "test_accuracy": [0.65, 0.68]},
        "quantized": {"loss": [0.9, 0.7, 0.6], "accuracy": [0.66, 0.72, 0.75]},
    },
}


def test_training_plot_from_dict_and_from_file(tmp_path):
    fig = syq_tf.plot_training(METRICS, tmp_path / "t.png")
    assert len(fig.axes) == 2
    loss_ax, acc_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"float train", "float test", "quantized train"}
    # epochs numbered across phases: float 1-2, quantized 3-5
    np.testing.assert_array_equal(lines["quantized train"].get_xdata(), [3, 4, 5])
    np.testing.assert_allclose(lines["quantized train"].get_ydata(), [0.9, 0.7, 0.6])
    acc = {line.get_label(): line for line in acc_ax.get_lines() if not line.get_label().startswith("_")}
    np.testing.assert_allclose(acc["float test"].get_ydata(), [0.65, 0.68])
    assert loss_ax.get_title() == "SYQ W2A8 pixel loss"
    image = _imread(tmp_path / "t.png")
    assert image.shape[:2] == (round(plots.TRAINING_SIZE[1] * plots.DPI), round(plots.TRAINING_SIZE[0] * plots.DPI))

    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(METRICS))
    syq_tf.plot_training(str(path), tmp_path / "t2.png", dpi=40)
    assert _imread(tmp_path / "t2.png").shape[:2] == (round(plots.TRAINING_SIZE[1] * 40),
                                                      round(plots.TRAINING_SIZE[0] * 40))


def test_training_plot_errors(tmp_path):
    with pytest.raises(ValueError, match="no 'history'"):
        syq_tf.plot_training({"history": {"float": {"loss": []}}}, tmp_path / "t.png")
    with pytest.raises(TypeError, match="metrics must be a dict or a path"):
        syq_tf.plot_training([1, 2], tmp_path / "t.png")
    with pytest.raises(FileNotFoundError):
        syq_tf.plot_training(str(tmp_path / "missing.json"), tmp_path / "t.png")
