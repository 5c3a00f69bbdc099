"""The training recipe shared by the demo, the ``syq-tf`` command and the benchmarks.

One CNN family (:func:`build_cnn`: four 3x3 convs and a dense layer, widths configurable), the
quantizers of each method (:func:`quantizer_factories`) and the papers' recipe: train in float,
switch the quantizers on, initialise their scales from the float weights, fine-tune
(:func:`finetune_from_float`). The first conv and the last dense keep float weights (the papers do).
"""

from syq_tf import _bootstrap

_bootstrap.ensure_keras2()  # the recipes build larq layers: Keras 2 only

import larq as lq  # noqa: E402
import tensorflow as tf  # noqa: E402

from syq_tf import quantizers as Q
from syq_tf.calibration import calibrate, fit_dorefa_ranges
from syq_tf.models import reinitialize_scales
from syq_tf.optimizers import LossAwareAdam

METHODS = ("syq", "uniq", "ls", "la")
GRANULARITIES = ("layer", "row", "pixel", "channel")
LS_MODES = ("ls1", "ls2", "lsT", "gf2", "gf3", "gf4")
LS_ACT_MODES = ("ls1", "ls2", "lsT", "gf2", "gf3", "gf4")
LA_MODES = ("binary", "ternary", "ternary_exact", "ternary_two_scale", "linear", "log")
DEMO_WIDTHS = (32, 32, 64, 64, 128)  # conv1..conv4, fc1


def la_mode_for(bits, la_mode=None):
    """Loss-aware mode: LAB for 1 bit, LAT for 2, linear LAQ above, unless given."""
    return la_mode or {1: "binary", 2: "ternary"}.get(bits, "linear")


def quantizer_factories(method="syq", bits=2, granularity="pixel", act_bits=8, eta=0.05, ls_mode=None,
                        ls_act_mode=None, la_mode=None):
    """Zero-argument factories (conv kernel, dense kernel, layer input) for one method.

    syq:  SYQ weights (``granularity`` for convs, layer-wise for the dense), DoReFa activations.
    uniq: UniQ weights per channel, UniQ activations (need :func:`syq_tf.calibrate` before training).
    ls:   least-squares weights per channel (``ls_mode``, default ls1 for 1 bit, ls2 for 2), and
          least-squares activations of ``ls_act_mode`` (sign-like, per sample) or, if None, DoReFa.
    la:   loss-aware weights (``la_mode``, default LAB for 1 bit, LAT for 2, linear LAQ above; one
          scale per layer as in the papers; the model must be trained with LossAwareAdam), DoReFa
          activations.
    """
    if method not in METHODS:
        raise ValueError(f"quantizer_factories: method={method!r}; allowed: {METHODS}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"quantizer_factories: granularity={granularity!r}; allowed: {GRANULARITIES}")
    if method == "syq":
        if bits not in (1, 2):
            raise ValueError(f"quantizer_factories: SYQ has bits=1 (binary) or 2 (ternary), got {bits}")
        return (lambda: Q.SYQ(bits, granularity, eta), lambda: Q.SYQ(bits, "layer", eta),
                lambda: Q.DoReFa(act_bits))
    if method == "uniq":
        return (lambda: Q.UniQ(bits, "channel"), lambda: Q.UniQ(bits, "channel"),
                lambda: Q.UniQActivation(act_bits))
    if method == "ls":
        if ls_mode is None and bits not in (1, 2):
            raise ValueError(f"quantizer_factories: least squares has bits=1 (ls1) or 2 (ls2) unless "
                             f"ls_mode is given, got bits={bits}")
        mode = ls_mode or {1: "ls1", 2: "ls2"}[bits]
        act = (lambda: Q.LeastSquaresActivation(ls_act_mode)) if ls_act_mode else (lambda: Q.DoReFa(act_bits))
        return (lambda: Q.LeastSquares(mode), lambda: Q.LeastSquares(mode), act)
    mode = la_mode_for(bits, la_mode)
    extra = {"bits": bits} if mode in ("linear", "log") else {}
    return (lambda: Q.LossAware(mode, **extra), lambda: Q.LossAware(mode, **extra),
            lambda: Q.DoReFa(act_bits))


def build_cnn(bits=None, granularity="pixel", act_bits=8, eta=0.05, method="syq", widths=DEMO_WIDTHS,
              input_shape=(28, 28, 1), classes=10, quantizers=None, **method_options):
    """Four 3x3 convs (max-pool after the 2nd and 4th) + dense + logits, BatchNorm after each.

    ``bits=None`` builds the float model (ReLU activations). Otherwise the first conv and the last
    dense keep float weights (the papers' recipe) and the other layers get the method's weight and
    input quantizers (see :func:`quantizer_factories`), or ``quantizers=(conv, dense, input)``
    factories given by the caller (any larq-compatible quantizers, e.g. the benchmark's peers; an
    input factory of None keeps float activations with ReLU).
    ``widths`` = (conv1, conv2, conv3, conv4, dense) channels; the demo uses 32-32-64-64-128."""
    if len(widths) != 5 or any(int(w) < 1 for w in widths):
        raise ValueError(f"build_cnn: widths={widths!r} must be five positive channel counts")
    quantized = bits is not None or quantizers is not None
    input_q = None
    if quantizers is not None:
        conv_q, dense_q, input_q = quantizers
    elif quantized:
        conv_q, dense_q, input_q = quantizer_factories(method, bits, granularity, act_bits, eta, **method_options)

    def act():
        # Float model, or quantized weights with float activations (no input quantizer): ReLU.
        # Otherwise the next layer's input quantizer clips (DoReFa to [0, 1], UniQ to
        # [0, (2^b - 1) delta]; least-squares activations are sign-like).
        return [] if quantized and input_q is not None else [tf.keras.layers.ReLU()]

    def make(factory):
        return factory() if factory is not None else None

    def qconv(filters, name):
        if not quantized:
            return tf.keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)
        return lq.layers.QuantConv2D(filters, 3, padding="same", use_bias=False, name=name,
                                     kernel_quantizer=make(conv_q), input_quantizer=make(input_q))

    def qdense(units, name, kernel=True, **kw):
        if not quantized:
            return tf.keras.layers.Dense(units, name=name, **kw)
        return lq.layers.QuantDense(units, name=name, input_quantizer=make(input_q),
                                    kernel_quantizer=make(dense_q) if kernel else None, **kw)

    def bn(name):
        return tf.keras.layers.BatchNormalization(momentum=0.9, name=name)

    c1, c2, c3, c4, d = (int(w) for w in widths)
    layers = [
        tf.keras.Input(input_shape),
        tf.keras.layers.Conv2D(c1, 3, padding="same", use_bias=False, name="conv1"),  # float (paper)
        bn("bn1"), *act(),
        qconv(c2, "conv2"), tf.keras.layers.MaxPool2D(), bn("bn2"), *act(),
        qconv(c3, "conv3"), bn("bn3"), *act(),
        qconv(c4, "conv4"), tf.keras.layers.MaxPool2D(), bn("bn4"), *act(),
        tf.keras.layers.Flatten(),
        qdense(d, "fc1", use_bias=False), bn("bn5"), *act(),
        qdense(classes, "logits", kernel=False),  # last layer: float weights (paper)
    ]
    return tf.keras.Sequential(layers, name=f"{method}_cnn" if quantized else "float_cnn")


def compile_model(model, lr, method=None, optimizer_options=None):
    """Adam (LossAwareAdam for the loss-aware method, which takes its curvature from Adam's second
    moments; ``optimizer_options``, e.g. ``{"curvature": "raw"}``, go to it), sparse categorical
    cross-entropy on logits, accuracy."""
    if optimizer_options and method != "la":
        raise ValueError(f"compile_model: optimizer_options={optimizer_options!r} are LossAwareAdam's; "
                         f"they need method='la' (got method={method!r})")
    optimizer = LossAwareAdam(lr, **(optimizer_options or {})) if method == "la" else tf.keras.optimizers.Adam(lr)
    model.compile(
        optimizer=optimizer,
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def method_label(method, bits, act_bits, granularity=None, la_mode=None, ls_mode=None, ls_act_mode=None):
    """Short human label, e.g. 'SYQ W2A8 pixel', 'LAB W1A8', 'LS ls1 W1 A-lsT'."""
    if method is None or bits is None:
        return "float"
    if method == "la":
        mode = la_mode_for(bits, la_mode)
        name = {"binary": "LAB", "ternary": "LAT", "ternary_exact": "LAT-exact",
                "ternary_two_scale": "LAT2", "linear": "LAQ", "log": "LAQ-log"}[mode]
        return f"{name} W{effective_bits(method, bits, la_mode)}A{act_bits}"
    if method == "ls":
        mode = ls_mode or {1: "ls1", 2: "ls2"}.get(bits, "?")
        return f"LS {mode} W{bits}" + (f" A-{ls_act_mode}" if ls_act_mode else f"A{act_bits}")
    label = {"syq": "SYQ", "uniq": "UniQ"}[method]
    return f"{label} W{bits}A{act_bits}" + (f" {granularity}" if method == "syq" and granularity else "")


def effective_bits(method, bits, la_mode=None):
    """Weight bits actually used: LAB is 1 bit and LAT 2 whatever ``bits`` says."""
    if method == "la":
        mode = la_mode_for(bits, la_mode)
        return 1 if mode == "binary" else (2 if mode.startswith("ternary") else bits)
    return bits


def transfer_float_weights(model, float_model):
    """The float model's weights in the quantized model's order (matched by layer and variable
    name); quantizer scales keep theirs (set from these weights by :func:`reinitialize_scales`)."""
    by_name = {}
    for layer in float_model.layers:
        for w in layer.weights:
            by_name[f"{layer.name}/{w.name.split('/')[-1]}"] = w.numpy()
    quantizer_modules = [m for m in model.submodules if isinstance(m, tf.Module) and _is_quantizer(m)]
    scales = {id(w) for q in quantizer_modules for w in q.weights}
    values = []
    for layer in model.layers:
        for w in layer.weights:
            key = f"{layer.name}/{w.name.split('/')[-1]}"
            if id(w) in scales:
                values.append(w.numpy())
            elif key in by_name:
                values.append(by_name[key])
            else:
                raise KeyError(f"transfer_float_weights: no float weight for {key} in {float_model.name}")
    return values


def _is_quantizer(module):
    if isinstance(module, (Q.WeightQuantizer, Q.ActivationQuantizer)):
        return True
    # other quantizers (larq's, QKeras's) with variables of their own; not their *layers*
    # (larq.layers.QuantConv2D): those hold the kernels that must come from the float model
    return isinstance(module, tf.keras.layers.Layer) and type(module).__module__.startswith(
        ("larq.quantizers", "qkeras.quantizers"))


def finetune_from_float(model, float_model, train, epochs, lr=5e-4, method=None, callbacks=(), verbose=1,
                        calibration_batches=20, fit_ranges=True):
    """The papers' recipe, second half: copy the float weights into ``model``, initialise every
    learned scale from them (SYQ alpha = mean|W| per subgroup, UniQ delta = k_b std(W), ...), fit
    DoReFa's fixed [0, 1] range to the float activations (:func:`syq_tf.fit_dorefa_ranges`; not with
    ``fit_ranges=False``), calibrate activation steps from ``train`` (UniQ), then fit ``epochs`` epochs.
    Returns the Keras History."""
    prepare_finetune(model, float_model, train, lr, method, calibration_batches, fit_ranges)
    return model.fit(train, epochs=epochs, verbose=verbose, callbacks=list(callbacks))


def prepare_finetune(model, float_model, calibration_data, lr=5e-4, method=None, calibration_batches=20,
                     fit_ranges=True, optimizer_options=None):
    """:func:`finetune_from_float` without the fit: float weights copied, scales initialised, DoReFa
    ranges fitted and activation steps calibrated from ``calibration_data``, compiled (``syq-tf
    train`` fits itself, epoch by epoch, to checkpoint and resume)."""
    model.set_weights(transfer_float_weights(model, float_model))
    reinitialize_scales(model)
    if fit_ranges:  # a no-op without DoReFa activations
        fit_dorefa_ranges(model, calibration_data)
    calibrate(model, calibration_data, batches=calibration_batches)  # a no-op without calibrated quantizers
    compile_model(model, lr, method, optimizer_options)
