"""Plots: the learned codebooks of a quantized model and the training curves of ``syq-tf train``.

``plot_codebooks(model, path)`` writes one PNG with a panel per quantized kernel: the histogram of
its float (latent) weights with the quantized values (the learned codebook levels) drawn on it as
vertical lines. ``plot_training(metrics, path)`` draws loss and accuracy per epoch of each phase
from ``metrics.json``. matplotlib is imported when a plot is made (``import syq_tf`` does not load
it), with the Agg canvas only: no window, no pyplot state.
"""

import json
import math
import os

import numpy as np
import tensorflow as tf

from syq_tf.export.codebook import bits_for_levels
from syq_tf.models import flat_layers, layer_kernels
from syq_tf.summary import method_name, quantizer_bits

PANEL_SIZE = (4.5, 3.25)  # inches per codebook panel
TRAINING_SIZE = (10.0, 3.75)  # inches, the two training-curve panels
DPI = 100


def _subgroup_axes(quantizer, shape):
    """Axes one scale is shared over: the quantizer's own subgroups when it says (syq_tf
    quantizers), else every axis but the last (one codebook per output channel)."""
    reduce_axes = getattr(quantizer, "reduce_axes", None)
    if callable(reduce_axes):
        try:
            return tuple(reduce_axes(shape))
        except (ValueError, TypeError, NotImplementedError):
            pass
    return tuple(range(len(shape) - 1))


def kernel_codebook(quantizer, kernel):
    """The codebook a quantizer gives one kernel, as a dict:

    ``values``: the quantized kernel (numpy, the kernel's shape); ``levels``: its distinct values
    (sorted); ``subgroups``: how many groups share one scale (1 for layer granularity);
    ``levels_per_subgroup``: the most distinct values inside any one subgroup (3 for ternary);
    ``bits``: ceil(log2(levels_per_subgroup)) (at least 1)."""
    w = tf.convert_to_tensor(getattr(kernel, "latent_variable", kernel))
    q = np.asarray(quantizer(w))
    reduce_axes = _subgroup_axes(quantizer, q.shape)
    keep = [a for a in range(q.ndim) if a not in reduce_axes]
    groups = q.transpose(keep + list(reduce_axes)).reshape(int(np.prod([q.shape[a] for a in keep] or [1])), -1)
    ordered = np.sort(groups, axis=1)
    per_group = 1 + np.count_nonzero(np.diff(ordered, axis=1), axis=1)
    per_subgroup = int(per_group.max()) if per_group.size else 0
    return {
        "values": q,
        "levels": np.unique(q),
        "subgroups": int(groups.shape[0]),
        "levels_per_subgroup": per_subgroup,
        "bits": bits_for_levels(per_subgroup),
    }


def quantized_kernel_list(model):
    """(layer, kernel attribute, quantizer, float kernel) of every quantized kernel."""
    out = []
    for layer in flat_layers(model):
        for attr, (quantizer, kernel) in layer_kernels(layer).items():
            if quantizer is not None:
                out.append((layer, attr, quantizer, kernel))
    return out


def _canvas(figsize, dpi):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (lazy: matplotlib)
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, format="png")  # no bbox_inches: the size is figsize x dpi
    return path


def plot_codebooks(model, path, columns=3, dpi=DPI, bins=80):
    """One PNG at ``path`` with a panel per quantized kernel of ``model``: the histogram of the float
    (latent) weights and, as vertical lines, the levels the quantizer maps them to. With one scale
    per layer the lines are the codebook; with one per channel / pixel / row every subgroup's
    levels are drawn, lighter the more there are. The title names the layer, the method, the bits
    and the granularity, and how many levels one subgroup uses.

    The image is ``columns`` (or fewer) panels wide, ``PANEL_SIZE`` inches per panel at ``dpi``.
    Returns the matplotlib Figure (``len(fig.axes)`` is the number of quantized kernels).
    Raises ValueError for a model without quantized kernels."""
    kernels = quantized_kernel_list(model)
    if not kernels:
        raise ValueError(f"plot_codebooks: model '{model.name}' has no quantized kernels (no layer has a "
                         "kernel quantizer); there is no codebook to draw.")
    if int(columns) < 1:
        raise ValueError(f"plot_codebooks: columns={columns!r} must be >= 1")
    cols = min(int(columns), len(kernels))
    rows = math.ceil(len(kernels) / cols)
    fig = _canvas((PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), dpi)
    for i, (layer, attr, quantizer, kernel) in enumerate(kernels):
        ax = fig.add_subplot(rows, cols, i + 1)
        latent = np.asarray(getattr(kernel, "latent_variable", kernel).numpy(), np.float64).ravel()
        book = kernel_codebook(quantizer, kernel)
        levels = book["levels"]
        ax.hist(latent, bins=int(bins), color="#9ab", edgecolor="none", label="float weights")
        alpha = 0.9 if book["subgroups"] == 1 else max(0.06, min(0.6, 6.0 / max(len(levels), 1)))
        ax.vlines(levels, 0, 1, transform=ax.get_xaxis_transform(), colors="#c22", linewidth=1.2,
                  alpha=alpha, label=f"levels ({len(levels)} distinct)")
        granularity = getattr(quantizer, "granularity", None) or "layer"
        name = layer.name if attr in ("kernel", "depthwise_kernel") else f"{layer.name}/{attr}"
        ax.set_title(f"{name}: {method_name(quantizer)} W{quantizer_bits(quantizer)} {granularity}\n"
                     f"{book['subgroups']} subgroup(s), <= {book['levels_per_subgroup']} levels each",
                     fontsize=9)
        ax.set_xlabel("weight value", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper right")
    _save(fig, path)
    return fig


def _load_metrics(metrics):
    if isinstance(metrics, (str, os.PathLike)):
        with open(metrics) as f:
            return json.load(f)
    if not isinstance(metrics, dict):
        raise TypeError(f"plot_training: metrics must be a dict or a path to metrics.json, got {type(metrics).__name__}")
    return metrics


def plot_training(metrics, path, dpi=DPI):
    """Loss and accuracy per epoch of each training phase, from ``metrics`` (the dict of
    ``metrics.json`` written by ``syq-tf train``, or its path): ``metrics["history"]`` maps a phase
    ("float", "quantized") to Keras history lists (``loss``, ``accuracy`` and, if recorded,
    ``test_loss``, ``test_accuracy``). Epochs are numbered across phases. Two panels in one PNG of
    ``TRAINING_SIZE`` inches at ``dpi``; returns the Figure."""
    metrics = _load_metrics(metrics)
    history = metrics.get("history")
    if not isinstance(history, dict) or not any(isinstance(h, dict) and h.get("loss") for h in history.values()):
        raise ValueError("plot_training: metrics has no 'history' with per-epoch 'loss' of any phase")
    fig = _canvas(TRAINING_SIZE, dpi)
    loss_ax, acc_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    start, boundaries = 0, []
    for k, (phase, h) in enumerate(history.items()):
        if not isinstance(h, dict) or not h.get("loss"):
            continue
        epochs = np.arange(start + 1, start + len(h["loss"]) + 1)
        color = colors[k % len(colors)]
        for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            if h.get(key):
                ax.plot(epochs, h[key], "-o", color=color, markersize=3, label=f"{phase} train")
            if h.get(f"test_{key}"):
                ax.plot(epochs, h[f"test_{key}"], "--s", color=color, markersize=3, label=f"{phase} test")
        if start:
            boundaries.append(start + 0.5)  # a new phase starts after this epoch
        start += len(h["loss"])
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    title = metrics.get("label") or metrics.get("config", {}).get("method", "")
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for boundary in boundaries:
            ax.axvline(boundary, color="#888", linestyle=":", linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(f"{title} {name}".strip(), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    return fig


__all__ = ["plot_codebooks", "plot_training", "kernel_codebook"]
