"""Accuracy, training cost and size of every method against larq, tfmot and QKeras, side by side.

One architecture family (syq_tf.recipes.build_cnn: four 3x3 convs + dense, first conv and last dense
in float as in the papers), one data pipeline (Fashion-MNIST from the Debian package, a fixed
training subset, the full 10k test set), one optimizer budget for every row:

    float pre-training (shared by all rows of a seed)  ->  ``--epochs`` epochs of quantized
    fine-tuning, every learned scale initialised from the float weights (the float row trains the
    same number of extra epochs in float).

Rows: float; peers (larq ste_sign W1A1, magnitude_aware_sign W1, SteTern W2, DoReFa W2A2, tfmot
default 8-bit QAT, QKeras binary / ternary / quantized_bits(2, alpha="auto") weights with
quantized_relu(8) activations, in larq layers); ours (SYQ W1/W2 x layer/row/pixel/channel at A8 and
A2, UniQ W1A1/W2A2/W4A4, least-squares 1-bit weights with ls1/lsT/gf2/ls2 activations and ls2 weights
with DoReFa 8-bit activations (the demo's least squares), LAB/LAT/LAQ
weights only). "A32" means float activations (ReLU).

Each row: test accuracy (mean and std over seeds), training seconds per epoch (median step time
after the first steps, which trace the graph, x steps per epoch), bytes at the stored bit width (syq_tf.summary: kernel bits
x weights / 8 plus float32 for scales, BatchNorm and float layers) and, for the lowest seed run with
export on (seed 0 normally), the size of
the int8 TFLite file syq_tf.export.to_tflite writes (where the exporter supports the row).

Every finished (row, seed) is cached as JSON under ``--out/<profile>/`` and not recomputed; the float
pre-training of a seed is cached too, so an interrupted run resumes. ``--shard i/n`` splits the rows
between processes (``--threads`` sets TensorFlow's threads per process). ``--report`` only
rebuilds BENCHMARKS.md and the Pareto plot from the cache.

    .venv/bin/python benchmarks/accuracy.py --quick            # < 20 min on 2 cores, a subset
    .venv/bin/python benchmarks/accuracy.py                    # the full table, 3 seeds
"""

import argparse
import json
import os
import platform
import re
import sys
import time

import syq_tf  # first: selects Keras 2 before TensorFlow loads

import larq as lq
import numpy as np
import tensorflow as tf

from syq_tf import quantizers as Q
from syq_tf.data import load_fashion_mnist
from syq_tf.recipes import build_cnn, compile_model, prepare_finetune
from syq_tf.summary import summarize

from machine import cpu_name as _cpu, write_json as _write_json  # noqa: E402  (benchmarks/machine.py)

HERE = os.path.dirname(os.path.abspath(__file__))

PROFILES = {
    # widths: conv1..conv4, dense. The demo CNN is 32-32-64-64-128; the benchmark halves it so that
    # ~40 rows x 3 seeds fit in a few hours on 2 cores.
    # fit_ranges: syq_tf.fit_dorefa_ranges before fine-tuning (the recipe of syq_tf.recipes)
    "full": dict(seeds=(0, 1, 2), train_limit=8000, float_epochs=2, epochs=2, batch_size=128,
                 widths=(16, 16, 32, 32, 64), lr_float=1e-3, lr=5e-4, fit_ranges=True),
    "quick": dict(seeds=(0,), train_limit=5000, float_epochs=1, epochs=1, batch_size=128,
                  widths=(16, 16, 32, 32, 64), lr_float=1e-3, lr=5e-4, fit_ranges=True),
}
# The same budget at a 4x larger fine-tuning learning rate: with so few steps the learning rate can
# decide how far the quantized models get; this profile shows which conclusions hold.
PROFILES["lr2e-3"] = dict(PROFILES["full"], lr=2e-3, fit_ranges=False)
# The goal rows at 4x the fine-tuning steps (8 epochs): does a longer schedule close SYQ's gap to
# float and to the best peer at its bits? Run with --rows (see GAP_ROWS) to keep it short.
PROFILES["long"] = dict(PROFILES["full"], epochs=8, fit_ranges=False)
GAP_ROWS = r"^(SYQ W[12]A8 pixel|QKeras binary W1A8|QKeras quantized_bits.*W2A8)$"
# The same 8 epochs with the learning rate stepped down at the end (x0.2 for the 7th epoch, x0.04 for
# the 8th), the shape of the SYQ / DoReFa training scripts' schedules (constant, then two drops near
# the end): does the scale-learning noise of a constant rate explain SYQ's remaining gap?
PROFILES["long-decay"] = dict(PROFILES["long"], decay=((6, 0.2), (7, 0.04)))
# The SYQ paper fine-tunes a converged float model; 'long' starts its 8 quantized epochs from 2 float
# epochs, so the quantized rows also pay for an unfinished float training. Here: 8 float epochs first
# (the float row then continues for the same 8 epochs as every other row).
PROFILES["pretrained"] = dict(PROFILES["long"], float_epochs=8)
# DoReFa clips at 1 the ReLU outputs of the float model it starts from (after BatchNorm, ranges up to
# ~6 here): syq_tf.fit_dorefa_ranges moves each BatchNorm's range into the next kernel first. The
# main table uses it (as syq_tf.recipes does); 'no-ranges' is the main table's recipe without it
# (the studies above were measured without it, as the main table was then).
PROFILES["no-ranges"] = dict(PROFILES["full"], fit_ranges=False)
PROFILES["long-ranges"] = dict(PROFILES["long"], fit_ranges=True)
# The authors' published forms of the three training-relevant fidelity differences (README,
# Fidelity items 1, 3 and 7): UniQ's activation step gradient over the whole batch
# (UniQActivation(step_grad="official")), the least-squares backward of the authors' code
# (backward="official", weights and activations) and LossAwareAdam's raw second moment as the
# curvature (curvature="raw"). Everything else as the main table, the same float starts.
PROFILES["official"] = dict(PROFILES["full"], official=True)
# Other profiles shown in BENCHMARKS.md next to the main table: (what changes, how to run it).
STUDIES = {
    "lr2e-3": ("Adam {lr} for the {epochs} fine-tuning epochs", "--profile lr2e-3"),
    "long": ("{epochs} fine-tuning epochs (4x the steps) at Adam {lr}",
             f"--profile long --rows '{GAP_ROWS}'"),
    "long-decay": ("{epochs} fine-tuning epochs at Adam {lr}, x0.2 from epoch 7, x0.04 for epoch 8",
                   "--profile long-decay --rows '^SYQ W[12]A8 pixel$' --no-export"),
    "no-ranges": ("no `syq_tf.fit_dorefa_ranges` before fine-tuning (DoReFa clips the float activations "
                  "at 1), {epochs} epochs at Adam {lr}", "--profile no-ranges --rows '^(SYQ|LS ls2 W2A8$)' --no-export"),
    "long-ranges": ("`syq_tf.fit_dorefa_ranges` before {epochs} fine-tuning epochs at Adam {lr}",
                    "--profile long-ranges --rows '^SYQ W[12]A[82] pixel$' --no-export"),
    "pretrained": ("{float_epochs} float pre-training epochs (the paper's converged float start), then "
                   "{epochs} fine-tuning epochs at Adam {lr}",
                   "--profile pretrained --rows '^SYQ W[12]A8 pixel$' --no-export"),
    "official": ("the authors' code's forms of README Fidelity items 1, 3 and 7 (UniQ activation step "
                 "gradient over the whole batch, the least-squares backward of the authors' code, "
                 "LossAwareAdam's raw second moment), {epochs} epochs at Adam {lr}",
                 "--profile official --rows '^(UniQ|LS|LA[BTQ]) ' --no-export"),
}
QUICK_ROWS = ("float", "larq ste_sign W1A1", "larq SteTern W2A32", "tfmot 8-bit QAT W8A8", "SYQ W2A8 pixel",
              "SYQ W1A8 channel", "UniQ W2A2", "LS ls1 W1 A-ls1", "LAB W1A32")


# ------------------------------------------------------------------------------------------------
# Rows: name -> (family, weight bits, activation bits, builder). A builder returns
# (quantizer factories for build_cnn or "tfmot", compile method).

def _ours():
    """Our rows. Every builder takes ``official`` (profile ``official``): the authors' code's forms of
    the fidelity options where the row has one."""
    rows = {}
    for abits in (8, 2):
        for wbits in (2, 1):
            for g in ("layer", "row", "pixel", "channel"):
                rows[f"SYQ W{wbits}A{abits} {g}"] = (
                    "ours", wbits, abits,
                    lambda official=False, w=wbits, a=abits, g=g: (
                        (lambda: Q.SYQ(w, g), lambda: Q.SYQ(w, "layer"), lambda: Q.DoReFa(a)), None))
    for wbits, abits in ((1, 1), (2, 2), (4, 4)):
        rows[f"UniQ W{wbits}A{abits}"] = (
            "ours", wbits, abits,
            lambda official=False, w=wbits, a=abits: (
                (lambda: Q.UniQ(w, "channel"), lambda: Q.UniQ(w, "channel"),
                 lambda: Q.UniQActivation(a, step_grad="official" if official else "per_example")), None))
    for act in ("ls1", "lsT", "gf2", "ls2"):
        abits = {"ls1": 1, "lsT": 2, "gf2": 2, "ls2": 2}[act]
        rows[f"LS ls1 W1 A-{act}"] = (
            "ours", 1, abits,
            lambda official=False, act=act: (
                (lambda: Q.LeastSquares("ls1", backward=_ls_backward(official)),
                 lambda: Q.LeastSquares("ls1", backward=_ls_backward(official)),
                 lambda: Q.LeastSquaresActivation(act, backward=_ls_backward(official))), None))
    # the demo's least-squares configuration (syq_tf.recipes, method "ls", 2 bits): ls2 weights,
    # DoReFa 8-bit activations
    rows["LS ls2 W2A8"] = ("ours", 2, 8, lambda official=False: (
        (lambda: Q.LeastSquares("ls2", backward=_ls_backward(official)),
         lambda: Q.LeastSquares("ls2", backward=_ls_backward(official)), lambda: Q.DoReFa(8)), None))
    for name, mode, bits in (("LAB W1A32", "binary", 1), ("LAT W2A32", "ternary", 2), ("LAQ W3A32", "linear", 3)):
        extra = {"bits": bits} if mode == "linear" else {}
        rows[name] = ("ours", bits, 32,
                      lambda official=False, mode=mode, extra=extra: (
                          (lambda: Q.LossAware(mode, **extra), lambda: Q.LossAware(mode, **extra), None), "la"))
    return rows


def _ls_backward(official):
    return "official" if official else "ste"


def optimizer_options(method, profile):
    """LossAwareAdam's options for a row: the authors' raw-second-moment curvature in profile
    ``official``."""
    return {"curvature": "raw"} if method == "la" and profile.get("official") else {}


def _peers():
    rows = {
        "larq ste_sign W1A1": ("peer", 1, 1, lambda **_: ((lq.quantizers.SteSign, lq.quantizers.SteSign,
                                                       lq.quantizers.SteSign), None)),
        "larq magnitude_aware_sign W1A32": ("peer", 1, 32, lambda **_: ((lq.quantizers.MagnitudeAwareSign,
                                                                    lq.quantizers.MagnitudeAwareSign, None), None)),
        "larq SteTern W2A32": ("peer", 2, 32, lambda **_: ((lq.quantizers.SteTern, lq.quantizers.SteTern, None), None)),
        "larq DoReFa W2A2": ("peer", 2, 2, lambda **_: ((lambda: lq.quantizers.DoReFa(2, mode="weights"),
                                                     lambda: lq.quantizers.DoReFa(2, mode="weights"),
                                                     lambda: lq.quantizers.DoReFa(2, mode="activations")), None)),
        "tfmot 8-bit QAT W8A8": ("peer", 8, 8, lambda **_: ("tfmot", None)),
    }

    def qkeras(kernel):
        def build(**_):
            import qkeras  # noqa: PLC0415  (optional benchmark dependency)

            return ((lambda: kernel(qkeras)), (lambda: kernel(qkeras)),
                    (lambda: qkeras.quantized_relu(8))), None
        return build

    rows["QKeras binary W1A8"] = ("peer", 1, 8, qkeras(lambda qk: qk.binary(alpha=1)))
    rows["QKeras ternary W2A8"] = ("peer", 2, 8, qkeras(lambda qk: qk.ternary(alpha="auto")))
    rows["QKeras quantized_bits(2, auto) W2A8"] = ("peer", 2, 8, qkeras(lambda qk: qk.quantized_bits(2, 0, 1, alpha="auto")))
    return rows


def all_rows():
    rows = {"float": ("float", 32, 32, None)}
    rows.update(_peers())
    rows.update(_ours())
    return rows


def qkeras_available():
    try:
        import qkeras  # noqa: F401,PLC0415
    except ImportError:
        return False
    return True


def _tfmot_default_8bit(float_model):
    """tfmot's default 8-bit QAT of the float model (weights copied). tfmot's default scheme folds
    BatchNorm only after a conv; the BatchNorms that follow a max-pool here get tfmot's own
    output-only 8-bit config instead of being refused."""
    import tensorflow_model_optimization as tfmot  # noqa: PLC0415
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (  # noqa: PLC0415
        default_8bit_quantize_configs as registry,
    )

    qk = tfmot.quantization.keras
    previous = {}
    for a, b in zip(float_model.layers, float_model.layers[1:]):
        previous[b.name] = a

    def annotate(layer):
        clone = layer.__class__.from_config(layer.get_config())
        if isinstance(layer, tf.keras.layers.BatchNormalization) and not isinstance(
                previous.get(layer.name), tf.keras.layers.Conv2D):
            return qk.quantize_annotate_layer(clone, registry.Default8BitOutputQuantizeConfig())
        return qk.quantize_annotate_layer(clone)

    annotated = tf.keras.models.clone_model(float_model, clone_function=annotate)
    annotated.set_weights(float_model.get_weights())
    with qk.quantize_scope({"Default8BitOutputQuantizeConfig": registry.Default8BitOutputQuantizeConfig}):
        return qk.quantize_apply(annotated)


# ------------------------------------------------------------------------------------------------

def slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()



def build_row(row, float_model, profile, calibration_data, calibration_batches):
    """A quantized row's model from the float model, compiled: its quantizers (or tfmot's 8-bit
    QAT), then ``syq_tf.recipes.prepare_finetune`` (the float weights copied, every scale initialised
    from them, DoReFa ranges fitted when the profile says ``fit_ranges``, activation steps calibrated)."""
    _, _, _, builder = row
    factories, method = builder(official=profile.get("official", False))
    if factories == "tfmot":
        model = _tfmot_default_8bit(float_model)
    else:
        model = build_cnn(widths=profile["widths"], quantizers=factories)
        prepare_finetune(model, float_model, calibration_data, profile["lr"], method, calibration_batches,
                         fit_ranges=profile.get("fit_ranges", False),
                         optimizer_options=optimizer_options(method, profile))
        return model
    compile_model(model, profile["lr"], method)
    return model


def step_decay(lr, drops):
    """Epoch -> learning rate: ``lr`` times the factor of the last (first epoch, factor) reached."""
    def schedule(epoch, _current=None):
        factor = 1.0
        for start, f in drops:
            if epoch >= start:
                factor = f
        return lr * factor
    return schedule


class StepTimer(tf.keras.callbacks.Callback):
    """Wall time of every training step after the first ``warmup`` (which trace the graph); the
    steady epoch time is the median step x steps per epoch (robust to the shared machine's spikes)."""

    def __init__(self, warmup=3):
        super().__init__()
        self.warmup = warmup

    def on_train_begin(self, logs=None):
        self.steps, self.all_steps, self.seen, self.per_epoch = [], [], 0, 0

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        self.all_steps.append(time.perf_counter() - self._t)
        if self.seen > self.warmup:
            self.steps.append(self.all_steps[-1])

    def on_epoch_end(self, epoch, logs=None):
        self.per_epoch = max(self.per_epoch, self.seen // (epoch + 1))

    def seconds_per_epoch(self):
        steps = self.steps or self.all_steps  # a run shorter than the warm-up: all steps
        return float(np.median(steps)) * self.per_epoch if steps else float("nan")


class Runner:
    def __init__(self, profile, out, export=True):
        self.name = profile
        self.p = PROFILES[profile]
        self.dir = os.path.join(out, profile)
        os.makedirs(self.dir, exist_ok=True)
        x, y = load_fashion_mnist("train")
        self.x_train, self.y_train = x[: self.p["train_limit"]], y[: self.p["train_limit"]]
        self.x_test, self.y_test = load_fashion_mnist("test")
        self.export = export

    def dataset(self, seed):
        ds = tf.data.Dataset.from_tensor_slices((self.x_train, self.y_train))
        ds = ds.shuffle(len(self.x_train), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(self.p["batch_size"]).prefetch(tf.data.AUTOTUNE)

    FLOAT_KEYS = ("train_limit", "float_epochs", "batch_size", "widths", "lr_float")

    def _float_dir(self):
        """Where this profile's float starts are cached: the main table's when the float pre-training
        is the same (a study then starts every row from the main table's very float models, a paired
        comparison), else the profile's own."""
        full = PROFILES["full"]
        if self.name != "full" and all(self.p[k] == full[k] for k in self.FLOAT_KEYS):
            shared = os.path.join(os.path.dirname(self.dir), "full")
            os.makedirs(shared, exist_ok=True)
            return shared
        return self.dir

    # float pre-training, shared by every row of a seed (cached; a lock file keeps two shards from
    # training the same one)
    def pretrained(self, seed):
        path = os.path.join(self._float_dir(), f"float_pretrain_s{seed}.weights.h5")
        lock = path + ".lock"
        while not os.path.exists(path):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                time.sleep(5)
                continue
            try:
                os.close(fd)
                tf.keras.backend.clear_session()
                tf.keras.utils.set_random_seed(seed)
                model = build_cnn(None, widths=self.p["widths"])
                compile_model(model, self.p["lr_float"])
                print(f"[accuracy] float pre-training, seed {seed}: {self.p['float_epochs']} epoch(s)", flush=True)
                model.fit(self.dataset(seed), epochs=self.p["float_epochs"], verbose=0)
                tmp = path + f".tmp-{os.getpid()}.weights.h5"
                model.save_weights(tmp)
                os.replace(tmp, path)
            finally:
                os.remove(lock)
        tf.keras.backend.clear_session()
        tf.keras.utils.set_random_seed(seed)
        model = build_cnn(None, widths=self.p["widths"])
        model.load_weights(path)
        return model

    def run(self, row_name, row, seed):
        path = os.path.join(self.dir, f"{slug(row_name)}_s{seed}.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        family, wbits, abits, builder = row
        float_model = self.pretrained(seed)
        tf.keras.utils.set_random_seed(seed + 1000)
        train = self.dataset(seed)
        if family == "float":
            model = float_model
            compile_model(model, self.p["lr"])
        else:
            model = build_row(row, float_model, self.p, train, calibration_batches=20)
        timer = StepTimer()
        t0 = time.perf_counter()
        callbacks = [timer]
        if self.p.get("decay"):
            callbacks.append(tf.keras.callbacks.LearningRateScheduler(step_decay(self.p["lr"], self.p["decay"])))
        history = model.fit(train, epochs=self.p["epochs"], verbose=0, callbacks=callbacks)
        train_seconds = time.perf_counter() - t0
        loss, accuracy = model.evaluate(self.x_test, self.y_test, batch_size=500, verbose=0)
        summary = summarize(model)
        result = {
            "row": row_name, "family": family, "weight_bits": wbits, "activation_bits": abits, "seed": seed,
            "test_accuracy": float(accuracy), "test_loss": float(loss),
            "train_seconds": train_seconds, "median_step_seconds": float(np.median(timer.steps or timer.all_steps)),
            "seconds_per_epoch": timer.seconds_per_epoch(),
            "final_train_loss": float(history.history["loss"][-1]),
            "bytes_at_bit_width": float(sum(r.bytes for r in summary)),
            "params": int(sum(r.params for r in summary)),
            "profile": self.name, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.p.items()},
            "machine": _machine_line(),
        }
        if self.export and seed == min(self.p["seeds"]):
            result.update(self._export(model))
        _write_json(path, result)
        tf.keras.backend.clear_session()
        return result

    def _export(self, model):
        try:
            exported = syq_tf.export.to_tflite(model, representative_data=self.x_train[:200],
                                               verify_data=self.x_test[:1000], verify_labels=self.y_test[:1000])
        except Exception as e:  # a row the exporter does not support: record why
            return {"tflite_bytes": None, "export_error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        v = exported.verification or {}
        return {"tflite_bytes": exported.model_bytes, "tflite_agreement": v.get("top1_agreement"),
                "tflite_accuracy_1k": v.get("runtime_accuracy")}


# ------------------------------------------------------------------------------------------------
# Side-by-side step time: the per-row epoch times above come from runs at different moments of a
# shared machine; this builds every row's model and interleaves timed training steps of all of them
# in rounds, so load changes hit every row alike (as benchmarks/step_time.py does for the demo CNN).

def step_times(runner, rows, rounds=6, steps=8):
    import tensorflow_model_optimization  # noqa: F401,PLC0415  (loaded before timing starts)

    x, y = runner.x_train[: runner.p["batch_size"]], runner.y_train[: runner.p["batch_size"]]
    float_model = runner.pretrained(min(runner.p["seeds"]))
    models = {}
    for name, row in rows.items():
        if row[0] == "float":
            model = build_cnn(None, widths=runner.p["widths"])
            model.set_weights(float_model.get_weights())
            compile_model(model, runner.p["lr"])
        else:
            model = build_row(row, float_model, runner.p, x, calibration_batches=1)
        for _ in range(3):  # trace and warm up
            model.train_on_batch(x, y)
        models[name] = model
    samples = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(x, y)
            samples[name].append((time.perf_counter() - t0) / steps)
    base = float(np.median(samples["float"]))
    result = {"machine": _machine_line(), "batch_size": runner.p["batch_size"], "rounds": rounds, "steps": steps,
              "load_average": list(os.getloadavg()),
              "rows": {name: {"median_step_s": float(np.median(s)), "ratio_to_float": float(np.median(s)) / base,
                              "samples_s": s} for name, s in samples.items()}}
    _write_json(os.path.join(runner.dir, "step_time.json"), result)
    for name, r in result["rows"].items():
        print(f"[accuracy] step time {name:<36} {1000 * r['median_step_s']:7.1f} ms  {r['ratio_to_float']:.2f}x")
    return result


# ------------------------------------------------------------------------------------------------
# Report: BENCHMARKS.md and the Pareto plot

def _versions():
    import importlib.metadata as md  # noqa: PLC0415

    out = {}
    for pkg in ("tensorflow", "tf-keras", "larq", "tensorflow-model-optimization", "QKeras", "ai-edge-litert", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _machine_line():
    return (f"{_cpu()}, {os.cpu_count()} CPUs, {platform.platform()}. Versions: "
            + ", ".join(f"{k} {v}" for k, v in _versions().items()))


def _machines(pdir, table):
    """The machine of the profile's runs: ``pdir/machine.json`` (written when absent: the machine
    of the first report, for the runs that recorded none), and, per other machine recorded in a
    run (the table's "machines"), the rows and run count measured there."""
    path = os.path.join(pdir, "machine.json")
    if os.path.exists(path):
        with open(path) as f:
            base = json.load(f)["machine"]
    else:
        base = _machine_line()
        _write_json(path, {"machine": base})
    others = {}
    for r in table:
        for machine, runs in r["machines"].items():
            if machine != base:
                others.setdefault(machine, {})[r["row"]] = runs
    return base, others


def aggregate(profile_dir, rows):
    table = []
    for name, (family, wbits, abits, _) in rows.items():
        results = []
        for f in sorted(os.listdir(profile_dir)):
            if f.startswith(slug(name) + "_s") and f.endswith(".json") and re.fullmatch(
                    re.escape(slug(name)) + r"_s\d+\.json", f):
                with open(os.path.join(profile_dir, f)) as fh:
                    results.append(json.load(fh))
        if not results:
            continue
        acc = np.array([r["test_accuracy"] for r in results])
        first = min(results, key=lambda r: r["seed"])
        # the export ran for the lowest seed of the run that had it on (seed 0 normally; a resumed
        # table may have exported a later seed)
        exported = [r for r in results if "tflite_bytes" in r]
        exp = min(exported, key=lambda r: r["seed"]) if exported else {}
        table.append({
            "row": name, "family": family, "weight_bits": wbits, "activation_bits": abits, "seeds": len(results),
            "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in results])),
            "bytes_at_bit_width": first["bytes_at_bit_width"], "tflite_bytes": exp.get("tflite_bytes"),
            "tflite_agreement": exp.get("tflite_agreement"), "export_error": exp.get("export_error"),
            "export_seed": exp.get("seed"),
            "machines": {m: sum(r.get("machine") == m for r in results)
                         for m in sorted({r["machine"] for r in results if "machine" in r})},
        })
    return table


def _export_seeds(table):
    seeds = sorted({r["export_seed"] for r in table if r.get("export_seed") is not None})
    return ("seed " + ", ".join(map(str, seeds))) if seeds else "not exported in this run"


def _bits_label(row):
    return f"W{row['weight_bits']}A{row['activation_bits']}"


def goals(table, float_ref=None):
    """The issue's goals checked against the table: SYQ near float, ours >= best peer at the same
    bits, epoch time within 1.5x of float. ``float_ref``: the float row to compare with (default:
    the table's own)."""
    by = {r["row"]: r for r in table}
    lines = []
    flt = float_ref or by.get("float")
    if flt:
        for name, margin in (("SYQ W2A8", 0.5), ("SYQ W1A8", 1.5)):
            cands = [r for r in table if r["row"].startswith(name + " ")]
            if cands:
                best = max(cands, key=lambda r: r["accuracy_mean"])
                gap = 100 * (flt["accuracy_mean"] - best["accuracy_mean"])
                where = f"{gap:.2f} points below" if gap >= 0 else f"{-gap:.2f} points above"
                lines.append(f"- {name} (best granularity: {best['row']}, {100 * best['accuracy_mean']:.2f}%) is "
                             f"{where} float ({100 * flt['accuracy_mean']:.2f}%; goal: within {margin}): "
                             f"**{'met' if gap <= margin else 'missed'}**")
        timed = [r for r in table if r["family"] != "float" and r.get("step_ratio_to_float")]
        slow = [r for r in timed if r["step_ratio_to_float"] > 1.5]
        if timed:
            lines.append("- Training time within 1.5x of float (side-by-side step time): " + (
                f"**met by every row** (max {max(r['step_ratio_to_float'] for r in timed):.2f}x)" if not slow
                else "**missed** by " + ", ".join(f"{r['row']} ({r['step_ratio_to_float']:.2f}x)" for r in slow)
                + f"; met by the other {len(timed) - len(slow)}"))
    peers = [r for r in table if r["family"] == "peer"]
    for r in [r for r in table if r["family"] == "ours"]:
        same = [p for p in peers if p["weight_bits"] == r["weight_bits"] and p["activation_bits"] == r["activation_bits"]]
        if not same:
            continue
        best = max(same, key=lambda p: p["accuracy_mean"])
        diff = 100 * (r["accuracy_mean"] - best["accuracy_mean"])
        lines.append(f"- {r['row']} vs best peer at {_bits_label(r)} ({best['row']}): {diff:+.2f} points: "
                     f"**{'at or above' if diff >= 0 else 'below'}**")
    return lines


def pareto_front(table):
    """Rows no other row beats on both size (smaller) and accuracy (higher), by size."""
    front, best = [], -1.0
    for r in sorted(table, key=lambda r: (r["bytes_at_bit_width"], -r["accuracy_mean"])):
        if r["accuracy_mean"] > best:
            front.append(r)
            best = r["accuracy_mean"]
    return front


def plot(table, path):
    """Left: accuracy vs KiB at the stored bit widths (log x), the Pareto front labelled. Right:
    every row's accuracy (mean ± std over seeds), sorted, coloured by family."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    colors = {"float": "black", "peer": "tab:orange", "ours": "tab:blue"}
    names = {"float": "float", "peer": "larq / tfmot / QKeras", "ours": "syq_tf"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 0.24 * len(table) + 3), dpi=100,
                                 gridspec_kw={"width_ratios": [1, 1.1]})
    for r in table:
        ax.errorbar(r["bytes_at_bit_width"] / 1024, 100 * r["accuracy_mean"], yerr=100 * r["accuracy_std"],
                    fmt="o", color=colors[r["family"]], ms=4, capsize=2, alpha=0.8)
    front = pareto_front(table)
    ax.step([r["bytes_at_bit_width"] / 1024 for r in front], [100 * r["accuracy_mean"] for r in front],
            where="post", color="gray", lw=0.8, ls="--", label="Pareto front")
    for i, r in enumerate(front):
        ax.annotate(r["row"], (r["bytes_at_bit_width"] / 1024, 100 * r["accuracy_mean"]), fontsize=7,
                    xytext=(4, -10 if i % 2 else 4), textcoords="offset points")
    for fam, c in colors.items():
        ax.plot([], [], "o", color=c, label=names[fam])
    ax.set_xscale("log")
    ax.set_xlabel("model KiB at stored bit widths (syq_tf.summary)")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_title("Accuracy vs size (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    rows = sorted(table, key=lambda r: r["accuracy_mean"])
    y = np.arange(len(rows))
    bx.barh(y, [100 * r["accuracy_mean"] for r in rows], xerr=[100 * r["accuracy_std"] for r in rows],
            color=[colors[r["family"]] for r in rows], alpha=0.85, capsize=2)
    bx.set_yticks(y, [f"{r['row']}" for r in rows], fontsize=7)
    low = min(100 * r["accuracy_mean"] for r in rows)
    bx.set_xlim(max(0.0, low - 5), 100 * max(r["accuracy_mean"] for r in rows) + 2)
    bx.set_xlabel("test accuracy (%)")
    bx.set_title("Every row")
    bx.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out, profile, rows, command):
    pdir = os.path.join(out, profile)
    table = aggregate(pdir, rows)
    step_path = os.path.join(pdir, "step_time.json")
    steps = {}
    if os.path.exists(step_path):
        with open(step_path) as f:
            steps = json.load(f)["rows"]
    for r in table:
        r["step_ratio_to_float"] = steps.get(r["row"], {}).get("ratio_to_float")
    _write_json(os.path.join(pdir, "table.json"), table)
    png = os.path.join(HERE, f"accuracy_{profile}.png")
    if table:
        plot(table, png)
    p = PROFILES[profile]
    machine, other_machines = _machines(pdir, table)
    lines = [
        "# Benchmarks: accuracy, training cost and size (generated by benchmarks/accuracy.py; do not edit)",
        "",
        f"Profile `{profile}`: Fashion-MNIST (Debian `dataset-fashion-mnist`), first {p['train_limit']} training "
        f"images, full 10,000-image test set; CNN widths {'-'.join(map(str, p['widths']))} "
        f"(syq_tf.recipes.build_cnn, first conv and last dense float); float pre-training "
        f"{p['float_epochs']} epoch(s) (Adam {p['lr_float']}), then {p['epochs']} epoch(s) for every row "
        f"(Adam {p['lr']}; LossAwareAdam for LAB/LAT/LAQ; the float row continues in float); batch {p['batch_size']}; "
        f"seeds {', '.join(map(str, p['seeds']))}.",
        "",
        f"Command: `{command}` (run here as two processes, `--shard 0/2` and `--shard 1/2` with "
        "`--threads 1`, then `--step-time`; the cache makes any split or interruption resumable).",
        "",
        f"Machine: {machine}.",
        *[f"Re-run on {other}: " + ", ".join(f"{row} ({n} runs)" for row, n in runs.items()) + "."
          for other, runs in other_machines.items()],
        "",
        "Bytes: `syq_tf.summary` at the stored bit widths (kernel bits x weights / 8, float32 for scales, "
        "BatchNorm and float layers). TFLite: the int8 file of `syq_tf.export.to_tflite` (" + _export_seeds(table) + ") and its "
        "top-1 agreement with Keras on 1,000 test images; '-' where the exporter does not take the row.",
        "Seconds per epoch: median training step (after 3 tracing steps) x steps per epoch of the row's own run; "
        "the rows ran at different moments of a shared machine (other jobs at the same time), so these are "
        "only indicative. 'step vs float' is the side-by-side measurement (`--step-time`: every row's model "
        "built, training steps of all rows interleaved in rounds, median step time / float's).",
        "",
        "| row | bits | accuracy % (mean ± std) | seeds | s / epoch | step vs float | KiB at bit width | TFLite bytes | TFLite agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        ratio = f"{r['step_ratio_to_float']:.2f}x" if r.get("step_ratio_to_float") else "-"
        tfl = str(r["tflite_bytes"]) if r["tflite_bytes"] else "-"
        agr = f"{r['tflite_agreement']:.3f}" if r.get("tflite_agreement") is not None else "-"
        lines.append(f"| {r['row']} | {_bits_label(r)} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} "
                     f"| {r['seeds']} | {r['seconds_per_epoch']:.1f} | {ratio} | {r['bytes_at_bit_width'] / 1024:.1f} "
                     f"| {tfl} | {agr} |")
    missing = [name for name in rows if name not in {r["row"] for r in table}]
    if missing:
        lines += ["", "Not run in this profile: " + ", ".join(missing) + "."]
    errors = [r for r in table if r.get("export_error")]
    if errors:
        lines += ["", "Export not supported: " + "; ".join(f"{r['row']}: {r['export_error']}" for r in errors)]
    lines += ["", "## Goals", ""] + (goals(table) or ["(no rows yet)"])
    lines += ["", f"![accuracy vs size](accuracy_{profile}.png)", ""]
    for study, (change, flags) in STUDIES.items():
        other = os.path.join(out, study)
        alt = {r["row"]: r for r in aggregate(other, rows)} if profile == "full" and os.path.isdir(other) else {}
        if not alt:
            continue
        q = PROFILES[study]
        what = change.format(**q)
        if not q.get("fit_ranges") and study != "no-ranges":
            what += " (no `syq_tf.fit_dorefa_ranges`: measured before it joined the recipe)"
        lines += [
            f"## Study `{study}`: {what}", "",
            f"Everything as above except {what} (the float row: as many extra float epochs). "
            f"Command: `python benchmarks/accuracy.py {flags}`.", "",
            f"| row | bits | accuracy % (main table) | accuracy % ({study}) | seeds ({study}) |",
            "|---|---|---|---|---|",
        ]
        for r in table:
            a = alt.get(r["row"])
            if a:
                lines.append(f"| {r['row']} | {_bits_label(r)} | {100 * r['accuracy_mean']:.2f} ± "
                             f"{100 * r['accuracy_std']:.2f} | {100 * a['accuracy_mean']:.2f} ± "
                             f"{100 * a['accuracy_std']:.2f} | {a['seeds']} |")
        own_float = "float" in alt
        lines += ["", f"Goals in study `{study}` (against " + ("its own float row" if own_float else
                  "the main table's float row") + "):", ""]
        lines += goals(list(alt.values()), float_ref=None if own_float else
                       next((r for r in table if r["row"] == "float"), None)) + [""]
    md = os.path.join(HERE, "BENCHMARKS.md" if profile == "full" else f"BENCHMARKS_{profile}.md")
    tail = generated_sections(md)  # read before the file is opened for writing (which empties it)
    with open(md, "w") as f:
        f.write("\n".join(lines) + tail)
    print("\n".join(lines[12:]))
    print(f"[accuracy] wrote {md} and {png}")
    return md


# Sections other benchmarks generate at the end of BENCHMARKS.md (models.py, keras3_models.py): kept.
GENERATED = ("<!-- models.py:", "<!-- keras3_models.py:")


def generated_sections(md):
    """The tail of ``md`` from the first section another benchmark generated ("" if none)."""
    text = open(md).read() if os.path.exists(md) else ""
    starts = [text.index(m) for m in GENERATED if m in text]
    return "\n\n" + text[min(starts):] if starts else ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, fewer images and epochs, a subset of rows")
    ap.add_argument("--profile", default="full", choices=sorted(PROFILES),
                    help="full (default: 3 seeds, every row), lr2e-3 (the same at a 4x fine-tuning learning "
                         "rate), long (8 fine-tuning epochs; meant for --rows GAP_ROWS), quick (= --quick)")
    ap.add_argument("--rows", default=None, help="regular expression: run only the matching rows")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's)")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th row starting at i (parallel processes)")
    ap.add_argument("--threads", type=int, default=0, help="TensorFlow intra/inter-op threads (0: default)")
    ap.add_argument("--no-export", action="store_true", help="skip the TFLite export (done for the lowest seed of the run)")
    ap.add_argument("--report", action="store_true", help="only rebuild BENCHMARKS.md and the plot from the cache")
    ap.add_argument("--step-time", action="store_true",
                    help="measure every row's training step time side by side (interleaved rounds) instead "
                         "of training; the report's 'step vs float' column")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "accuracy"))
    args = ap.parse_args(argv)
    profile = "quick" if args.quick else args.profile
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    rows = all_rows()
    if args.quick:
        rows = {k: v for k, v in rows.items() if k in QUICK_ROWS}
    if not qkeras_available():
        skipped = [k for k in rows if k.startswith("QKeras")]
        if skipped:
            print("[accuracy] QKeras is not installed: skipping " + ", ".join(skipped)
                  + " (pip install --no-deps -c constraints.txt QKeras networkx)", flush=True)
        rows = {k: v for k, v in rows.items() if not k.startswith("QKeras")}
    if args.rows:
        rows = {k: v for k, v in rows.items() if re.search(args.rows, k) or k == "float"}
    flags = {"full": "", "quick": "--quick", **{k: v[1] for k, v in STUDIES.items()}}[profile]
    command = f"python benchmarks/accuracy.py {flags}".strip()
    if args.step_time:
        step_times(Runner(profile, args.out, export=False), rows)
    elif not args.report:
        runner = Runner(profile, args.out, export=not args.no_export)
        if args.seeds:
            runner.p = dict(runner.p, seeds=tuple(int(s) for s in args.seeds.split(",")))
        i, n = (int(v) for v in args.shard.split("/"))
        names = list(rows)[i::n]
        for seed in runner.p["seeds"]:
            for name in names:
                t0 = time.time()
                r = runner.run(name, rows[name], seed)
                print(f"[accuracy] {name:<36} seed {seed}: accuracy {r['test_accuracy']:.4f}, "
                      f"{r['seconds_per_epoch']:.1f} s/epoch, {r['bytes_at_bit_width'] / 1024:.1f} KiB "
                      f"({time.time() - t0:.0f} s)", flush=True)
    write_report(args.out, profile, all_rows() if not args.quick else rows, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
