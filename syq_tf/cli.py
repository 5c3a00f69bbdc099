"""``syq-tf``: the command line (absl flags; installed by ``pip install -e .``).

    syq-tf train   --dataset synthetic --method syq --bits 2 --out runs/syq
    syq-tf export  --model runs/syq/model.keras --target tflm --dataset synthetic
    syq-tf inspect --model runs/syq/model.keras       (or a .tflite)
    syq-tf bench   [--rows REGEX] [-- extra benchmark arguments]

Each command has its own flags (``syq-tf <command> --help``). Errors print one line,
``syq-tf <command>: error: ...``, on stderr and exit with 2 (bad command line) or 1 (the command
failed); ``--debug`` shows the traceback instead.
"""

import collections
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from absl import app, flags

PROG = "syq-tf"
DATASETS = ("fashion_mnist", "synthetic")  # built in; any other name: tensorflow-datasets (syq_tf.datasets)
DATASET_HELP = ("fashion_mnist: the local Debian Fashion-MNIST files; synthetic: syq_tf.data.synthetic_images "
                "(generated, for tests and quick tries); any other name: a tensorflow-datasets image "
                "classification dataset prepared in --data_dir (never downloaded; fashion_mnist_debian: the "
                "Debian files as a local tfds builder)")
SYNTHETIC_TRAIN = 4000  # default images of --dataset synthetic (train split)
SYNTHETIC_TEST = 2000  # default images of its test split
SYNTHETIC_TEST_SEED = 1_000_003  # test split seed offset: never the training examples' seed
USAGE_ERROR, RUNTIME_ERROR = 2, 1
DECODE_OP = "TFLM_DECODE"  # syq_tf.export.tflm: LUT-compressed weights
MODEL_FILE = "model.keras"  # what `train` writes (older versions wrote model.h5: still read)
CHECKPOINT = "checkpoint.npz"  # `train`'s end-of-epoch checkpoint (removed when the run ends)
TRAIN_OUTPUTS = (MODEL_FILE, "model.h5", "metrics.json", "training.png", "codebooks.png")  # stale-file candidates
LOG_PHASES = ("float", "quantized", "quantizers")  # logs/<phase>: TensorBoard event files of `train`
RESUME_FREE = ("out", "resume", "verbose", "debug")  # flags that may differ on --resume
UNSAFE_HELP = ("load a Keras model even if loading runs code stored in it (a Lambda layer, Python bytecode, "
               "classes outside Keras, syq_tf, larq and tfmot); only for files you trust")


class CliError(Exception):
    """A one-line error; ``code`` 2 for a bad command line, 1 for a failed command."""

    def __init__(self, message, code=RUNTIME_ERROR):
        super().__init__(message)
        self.code = code


# ---- commands and their flags -------------------------------------------------------------------


class Command:
    name = ""
    summary = ""
    description = ""
    passthrough = False  # arguments after `--` go to the command untouched

    def __init__(self):
        self.order = []

    def define(self, fv):
        raise NotImplementedError

    def flag_values(self):
        fv = flags.FlagValues()
        self.order = []
        self.define(_Definer(fv, self.order))
        _Definer(fv, self.order).boolean("debug", False, "on an error, show the Python traceback instead of "
                                                         "the one-line message")
        return fv

    def validate(self, fv):
        """Checks of the parsed flags that absl cannot express (raise CliError, code 2)."""

    def run(self, fv, extra):
        raise NotImplementedError

    def help(self):
        fv = self.flag_values()
        lines = [f"usage: {PROG} {self.name} [--flag=value ...]" + (" [-- arguments]" if self.passthrough else ""),
                 "", *_wrap(self.summary[0].upper() + self.summary[1:] + "."),
                 *(["", *textwrap.dedent(self.description).strip().splitlines()] if self.description else []),
                 "", "flags:"]
        for name in self.order:
            flag = fv[name]
            head = f"  --[no]{name}" if flag.boolean else f"  --{name}"
            lines.append(head)
            text = flag.help
            if flag.default is not None or "default" not in flag.help:
                text += f" (default: {_default_text(flag)})"
            lines.extend(_wrap(text, indent="      "))
        return "\n".join(lines)


class _Definer:
    """absl DEFINE_* into one FlagValues, remembering the definition order (for --help)."""

    def __init__(self, fv, order):
        self.fv, self.order = fv, order

    def __getattr__(self, kind):
        define = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer, "float": flags.DEFINE_float,
                  "boolean": flags.DEFINE_boolean, "enum": flags.DEFINE_enum, "list": flags.DEFINE_list}[kind]

        def go(name, default, *args, **kwargs):
            define(name, default, *args, flag_values=self.fv, **kwargs)
            self.order.append(name)

        return go


def _default_text(flag):
    value = flag.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _wrap(text, indent="", width=100):
    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent) or [indent]


class Train(Command):
    name = "train"
    summary = ("train the demo CNN: float pre-training, then quantized fine-tuning with the scales "
               "initialised from the float weights (syq_tf.recipes)")
    description = """
        Writes to --out: model.keras (weights and quantizer state; loads with
        syq_tf.load_model or tf.keras.models.load_model after `import syq_tf`), metrics.json
        (per-epoch loss and accuracy of both phases, test accuracy, seconds, the configuration),
        logs/ (TensorBoard: Keras scalars per phase and syq_tf.QuantizerLogger's scales and
        codebooks), codebooks.png (syq_tf.plot_codebooks) and training.png (syq_tf.plot_training).
        --method float trains the float model for --float_epochs + --epochs epochs.
        Every file appears atomically (a temporary file, then a rename: an interrupted run leaves
        the previous files whole). checkpoint.npz is written at the end of every epoch of both
        phases and removed when the run ends; --resume continues an interrupted run from it, to
        the same weights as an uninterrupted run. One run at a time per --out (a lock file,
        .syq-tf.lock): a second run into it fails at once. Files of an earlier run that this run
        does not rewrite (codebooks.png after --method float, an old model.h5, old TensorBoard
        event files) are removed at the end and listed in metrics.json ("removed")."""

    def define(self, d):
        from syq_tf import recipes  # noqa: PLC0415

        d.string("dataset", "fashion_mnist", DATASET_HELP)
        d.string("data_dir", None, "tensorflow-datasets data folder of --dataset (default: TFDS_DATA_DIR or "
                 "~/tensorflow_datasets)")
        d.integer("train_limit", None, "training images used (default: 20000 of Fashion-MNIST, "
                  f"{SYNTHETIC_TRAIN} synthetic)", lower_bound=1)
        d.integer("test_limit", None, f"test images used (default: all 10000 of Fashion-MNIST, {SYNTHETIC_TEST} "
                  "synthetic)", lower_bound=1)
        d.enum("method", "syq", ["float", *recipes.METHODS],
               "float (no quantizers), syq (SYQ weights, DoReFa activations), uniq (UniQ weights and "
               "activations, calibrated), ls (least-squares weights), la (loss-aware weights, LossAwareAdam)")
        d.integer("bits", 2, "weight bits: syq 1 (binary) or 2 (ternary); uniq 1-8; ls 1 (ls1) or 2 (ls2) "
                  "unless --ls_mode; la 1 (LAB), 2 (LAT), more: LAQ", lower_bound=1, upper_bound=8)
        d.integer("act_bits", 8, "activation bits (DoReFa / UniQ activations)", lower_bound=1, upper_bound=8)
        d.enum("granularity", "pixel", list(recipes.GRANULARITIES),
               "SYQ subgroups of the conv kernels: one scale per layer, kernel row, pixel or output channel")
        d.enum("ls_mode", None, list(recipes.LS_MODES), "least-squares weight mode (--method ls)")
        d.enum("la_mode", None, list(recipes.LA_MODES), "loss-aware weight mode (--method la): binary = LAB, "
               "ternary* = LAT, linear / log = LAQ with --bits bits")
        d.list("widths", [str(w) for w in recipes.DEMO_WIDTHS],
               "channels of conv1,conv2,conv3,conv4,fc1 (five positive integers)")
        d.boolean("fit_ranges", True, "before fine-tuning, fit DoReFa's fixed [0, 1] activation range to the float "
                  "model's activations (syq_tf.fit_dorefa_ranges; methods with DoReFa activations: syq, ls, la)")
        d.integer("float_epochs", 1, "float pre-training epochs", lower_bound=0)
        d.integer("epochs", 2, "quantized fine-tuning epochs", lower_bound=0)
        d.integer("batch_size", 128, "training batch size", lower_bound=1)
        d.float("float_lr", 1e-3, "Adam learning rate of the float pre-training (a finite number > 0)")
        d.float("lr", 5e-4, "learning rate of the quantized fine-tuning (Adam; LossAwareAdam for la; a finite "
                "number > 0)")
        d.integer("seed", 0, "random seed (weights, shuffling, synthetic examples)")
        d.string("out", "out/syq-tf-train", "output directory (created if needed)")
        d.integer("verbose", 2, "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch",
                  lower_bound=0, upper_bound=2)
        d.boolean("resume", False, f"continue the interrupted run in --out from its {CHECKPOINT} (flags not "
                  "given are taken from the checkpoint; flags given must match it)")

    def validate(self, fv):
        widths = _widths(fv.widths)
        for name in ("float_lr", "lr"):
            value = fv[name].value
            if not (math.isfinite(value) and value > 0):
                raise CliError(f"--{name}={value}: the learning rate must be a finite number > 0", USAGE_ERROR)
        if fv.method != "float" and not fv.resume:  # --resume: the checkpoint's (validated) flags apply
            from syq_tf import recipes  # noqa: PLC0415

            try:
                recipes.quantizer_factories(fv.method, fv.bits, fv.granularity, fv.act_bits, **_options(fv))
            except ValueError as err:
                raise CliError(str(err).replace("quantizer_factories: ", ""), USAGE_ERROR) from None
        if not fv.out:
            raise CliError("--out must name an output directory", USAGE_ERROR)
        return widths

    def run(self, fv, extra):
        return _train(fv)


class Export(Command):
    name = "export"
    summary = "export a saved Keras model to TFLite and print the per-layer report"
    description = """
        Writes the .tflite and its report (.tflite.json); target tflm also writes the model as a C
        array (.h / .cc next to it). --dataset gives the representative examples (int8
        calibration of the tensors without a quantizer) and the verification examples (Keras vs
        the runtime, accuracy on their labels)."""

    def define(self, d):
        from syq_tf.export import REGISTRY, TARGETS, WEIGHTS  # noqa: PLC0415  (known at run time)
        from syq_tf.export.targets import REQUANTIZATIONS  # noqa: PLC0415

        d.string("model", None, "the saved Keras model (model.keras of `syq-tf train`, a .h5 file or a SavedModel "
                 "directory)")
        d.enum("target", TARGETS[0], list(TARGETS), "export target (syq_tf.export.TARGETS): "
               + "; ".join(f"{t.name}: {t.summary}" for t in REGISTRY.values()))
        d.string("dataset", "fashion_mnist", "data for calibration and verification: " + DATASET_HELP
                 + " (synthetic: the rule of `train --dataset synthetic`, at the model's input shape)")
        d.string("data_dir", None, "tensorflow-datasets data folder of --dataset")
        d.integer("representative", 500, "representative (calibration) examples", lower_bound=1)
        d.integer("verify_limit", 1000, "test examples to verify on (0: no verification)", lower_bound=0)
        d.float("min_agreement", 0.0, "fail (exit 1) when the runtime agrees with Keras on fewer than this "
                "fraction of the verification examples", lower_bound=0, upper_bound=1)
        d.boolean("require_exact", False, "fail when a quantized layer's codebook cannot be stored exactly")
        d.enum("weights", "int8", list(WEIGHTS),
               "weight storage: int8; int4 / int2 (target litert: packed INT4 / INT2 where exact); float32 "
               "(target lce: layers LCE cannot bit-pack keep float32 kernels)")
        d.enum("requantization", "auto", list(REQUANTIZATIONS),
               "how the runtime rounds onto int8 outputs: auto (single for litert: XNNPACK; double for tflm); "
               "single (one rounding); double (TFLite Micro, LiteRT's builtin kernels: biases lowered to match)")
        d.integer("seed", 0, "seed of the synthetic examples")
        d.string("out", None, "the .tflite to write (default: <model without extension>_<target>.tflite; "
                 "a directory: <dir>/model_<target>.tflite)")
        d.boolean("unsafe", False, UNSAFE_HELP)

    def validate(self, fv):
        if not fv.model:
            raise CliError("--model is required (the saved model to export, e.g. out/syq-tf-train/model.keras)",
                           USAGE_ERROR)
        from syq_tf.export import WEIGHTS  # noqa: PLC0415

        from syq_tf.export.targets import REQUANTIZATION_TARGETS  # noqa: PLC0415

        if fv.requantization != "auto" and fv.target not in REQUANTIZATION_TARGETS:
            raise CliError(f"--requantization={fv.requantization} is for --target="
                           + " and ".join(REQUANTIZATION_TARGETS) + f" (got --target={fv.target})", USAGE_ERROR)
        allowed = WEIGHTS[fv.weights]
        if allowed is not None and fv.target != allowed:  # the table of syq_tf.export.targets
            raise CliError(f"--weights={fv.weights} is for --target={allowed} (got --target={fv.target})",
                           USAGE_ERROR)

    def run(self, fv, extra):
        return _export(fv)


class Inspect(Command):
    name = "inspect"
    summary = ("print per-layer bits, codebook levels, bytes and compression of a saved Keras model "
               "or a .tflite file")
    description = """
        Keras model: syq_tf.summary's table, then per quantized kernel its subgroups, the most
        levels one subgroup uses and the levels themselves. .tflite: per weight tensor the op,
        shape, type, distinct levels per channel (max), bits = ceil(log2(levels)), the bytes stored
        and the bytes at those bits (bits x weights / 8); TFLM LUT-compressed tensors included."""

    def define(self, d):
        d.string("model", None, "a saved Keras model (.keras / .h5 / SavedModel directory) or a .tflite file")
        d.boolean("unsafe", False, UNSAFE_HELP)

    def validate(self, fv):
        if not fv.model:
            raise CliError("--model is required (a .keras / .h5 / SavedModel directory or a .tflite file)",
                           USAGE_ERROR)

    def run(self, fv, extra):
        return _inspect(fv.model, unsafe=fv.unsafe)


class Bench(Command):
    name = "bench"
    summary = "run the accuracy benchmark suite (benchmarks/accuracy.py of the source tree), quick profile"
    description = """
        Runs `python benchmarks/accuracy.py --quick` with --out / --rows, and any arguments after
        `--` passed through, e.g. `syq-tf bench --rows 'SYQ' -- --seed 1`. Needs the source tree
        (a git checkout installed with `pip install -e .`); exits with the benchmark's status."""
    passthrough = True

    def define(self, d):
        d.boolean("quick", True, "the quick profile (--noquick: the full one)")
        d.string("out", None, "results directory (benchmarks/accuracy.py --out; default: its own)")
        d.string("rows", None, "regular expression selecting benchmark rows (benchmarks/accuracy.py --rows)")
        d.string("script", None, "the benchmark script (default: benchmarks/accuracy.py next to the syq_tf "
                 "package's source tree)")

    def run(self, fv, extra):
        return _bench(fv, extra)


COMMANDS = {c.name: c for c in (Train(), Export(), Inspect(), Bench())}


def top_help():
    width = max(len(n) for n in COMMANDS) + 4
    lines = [f"usage: {PROG} <command> [--flag=value ...]", "",
             "Low-bit quantization with syq_tf: train, export, inspect, benchmark.", "", "commands:"]
    for name, command in COMMANDS.items():
        wrapped = _wrap(command.summary, width=100 - width - 2)
        lines.append(f"  {name:<{width}}{wrapped[0]}")
        lines.extend(" " * (width + 2) + w for w in wrapped[1:])
    lines += ["", f"`{PROG} <command> --help` lists the command's flags."]
    return "\n".join(lines)


# ---- the entry points ---------------------------------------------------------------------------

_HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def _one_line(message):
    return " ".join(str(message).split()) or "failed"


def _fail(command, message, code):
    where = f"{PROG} {command}" if command else PROG
    print(f"{where}: error: {_one_line(message)}", file=sys.stderr, flush=True)
    return code


def prepare(argv):
    """Parse the command line ``argv`` (without the program name): an exit status when there is
    nothing more to do (help, a bad command line), else ``(command, flag values, extra arguments)``."""
    argv = list(argv)
    if not argv:
        return _fail(None, f"no command given; commands: {', '.join(COMMANDS)} (see {PROG} --help)", USAGE_ERROR)
    first = argv[0]
    if first in _HELP or first == "help":
        if first == "help" and len(argv) > 1 and argv[1] in COMMANDS:
            print(COMMANDS[argv[1]].help())
        else:
            print(top_help())
        return 0
    if first == "--version":
        from syq_tf import __version__  # noqa: PLC0415

        print(f"{PROG} {__version__}")
        return 0
    if first not in COMMANDS:
        what = f"unknown flag {first!r} before the command" if first.startswith("-") else f"unknown command {first!r}"
        return _fail(None, f"{what}; commands: {', '.join(COMMANDS)} (see {PROG} --help)", USAGE_ERROR)
    command = COMMANDS[first]
    rest, extra = argv[1:], []
    if command.passthrough and "--" in rest:
        cut = rest.index("--")
        rest, extra = rest[:cut], rest[cut + 1:]
    if any(a in _HELP for a in rest):
        print(command.help())
        return 0
    try:
        fv = command.flag_values()
        try:
            unparsed = fv([f"{PROG} {command.name}", *rest])[1:]
        except flags.Error as err:
            raise CliError(f"{err} (see {PROG} {command.name} --help)", USAGE_ERROR) from None
        if unparsed:
            raise CliError(f"unexpected argument(s) {' '.join(unparsed)!s}; flags are --name=value "
                           f"(see {PROG} {command.name} --help)", USAGE_ERROR)
        command.validate(fv)
    except CliError as err:
        if "--debug" in rest:
            raise
        return _fail(command.name, err, err.code)
    return command, fv, extra


def execute(command, fv, extra):
    """Run a parsed command; returns the exit status (failures: one line on stderr)."""
    from syq_tf import files  # noqa: PLC0415

    try:
        with files.sigterm_raises():  # SIGTERM unwinds like Ctrl-C: temporary files removed, locks released
            return int(command.run(fv, extra) or 0)
    except CliError as err:
        if fv.debug:
            raise
        return _fail(command.name, err, err.code)
    except files.Terminated:
        return _fail(command.name, "terminated (SIGTERM)", 128 + 15)
    except KeyboardInterrupt:
        return _fail(command.name, "interrupted", 130)
    except Exception as err:  # noqa: BLE001  (the one-line report of any failure; --debug: traceback)
        if fv.debug:
            raise
        known = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
        return _fail(command.name, err if isinstance(err, known) else f"{type(err).__name__}: {err}", RUNTIME_ERROR)


def main(argv):
    """Run the command line ``argv`` (without the program name) in this process; returns the exit
    status."""
    parsed = prepare(argv)
    return parsed if isinstance(parsed, int) else execute(*parsed)


def run(argv=None):
    """The ``syq-tf`` console script. Help and command-line errors are answered at once; a command
    runs under absl.app (absl's own flags, such as logging verbosity, keep their defaults: each
    command parses its own flag set)."""
    argv = list(sys.argv if argv is None else argv)
    parsed = prepare(argv[1:])
    if isinstance(parsed, int):
        sys.exit(parsed)
    from syq_tf._bootstrap import quiet_native_startup  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    with quiet_native_startup(enabled=True):  # the CUDA probe's lines when TensorFlow first starts
        tf.config.list_physical_devices()

    def parse(args):
        flags.FLAGS(args[:1], known_only=True)
        return args

    app.run(lambda args: execute(*parsed), argv=argv[:1], flags_parser=parse)


# ---- shared helpers -----------------------------------------------------------------------------


def _widths(values):
    try:
        widths = tuple(int(v) for v in values)
    except ValueError:
        raise CliError(f"--widths={','.join(values)}: five comma-separated positive integers expected",
                       USAGE_ERROR) from None
    if len(widths) != 5 or min(widths) < 1:
        raise CliError(f"--widths={','.join(values)}: five comma-separated positive integers expected "
                       "(conv1,conv2,conv3,conv4,fc1)", USAGE_ERROR)
    return widths


def _options(fv):
    return {"ls": {"ls_mode": fv.ls_mode}, "la": {"la_mode": fv.la_mode}}.get(fv.method, {})


def dataset_shape(name, data_dir=None):
    """(input shape, classes) of a --dataset for a new model: Fashion-MNIST's and the synthetic
    set's (28, 28, 1), 10; a tensorflow-datasets dataset's from its metadata."""
    if name in DATASETS:
        return (28, 28, 1), 10
    from syq_tf import datasets  # noqa: PLC0415  (imports tensorflow_datasets)

    try:
        return datasets.image_spec(datasets.builder(name, data_dir), name)
    except ValueError as err:
        raise CliError(str(err)) from None


def load_dataset(name, split, limit=None, seed=0, shape=(28, 28, 1), classes=10, data_dir=None):
    """(x float32 [N, *shape] in [0, 1], y int64) of a --dataset choice."""
    from syq_tf import data  # noqa: PLC0415

    shape = tuple(int(d) for d in shape)
    if name not in DATASETS:
        from syq_tf import datasets  # noqa: PLC0415

        try:  # one-line errors for unknown / unprepared names
            x, y, n_classes = datasets.load(name, split, data_dir, limit)
        except ValueError as err:
            raise CliError(str(err)) from None
        if tuple(x.shape[1:]) != shape or n_classes != classes:
            raise CliError(f"--dataset {name}: {tuple(x.shape[1:])} images in {n_classes} classes; the model "
                           f"takes {shape} with {classes}")
        return x, y
    if name == "synthetic":
        n = limit or (SYNTHETIC_TRAIN if split == "train" else SYNTHETIC_TEST)
        return data.synthetic_images(n, seed=seed if split == "train" else SYNTHETIC_TEST_SEED + seed,
                                     shape=shape, classes=classes)
    if shape != (28, 28, 1) or classes != 10:
        raise CliError(f"the model takes {shape} inputs with {classes} classes; Fashion-MNIST is (28, 28, 1) "
                       "with 10 (use --dataset synthetic for other shapes)")
    x, y = data.load_fashion_mnist(split)
    if limit is None and split == "train":
        limit = 20000
    return (x[:limit], y[:limit]) if limit else (x, y)


def _write_json(path, obj):
    from syq_tf import files  # noqa: PLC0415

    files.write_atomic(path, json.dumps(obj, indent=2).encode())


def _load_keras(path, unsafe=False):
    """The Keras model at ``path`` (.keras, .h5, SavedModel directory) through syq_tf.saving.load_model:
    safe mode unless ``unsafe`` (a model whose loading would run code is refused, naming the layer)."""
    from syq_tf import saving  # noqa: PLC0415
    from syq_tf.errors import UnsafeModelError  # noqa: PLC0415

    if not os.path.exists(path):
        raise CliError(f"{path}: no such file or directory")
    try:
        return saving.load_model(path, safe_mode=not unsafe, compile=False)
    except UnsafeModelError as err:
        raise CliError(str(err).replace(saving.OPT_IN, "pass --unsafe")) from None
    except Exception as err:  # noqa: BLE001
        raise CliError(f"{path}: cannot load it as a Keras model (.keras, .h5 or SavedModel directory): "
                       f"{type(err).__name__}: {err}") from None


# ---- train --------------------------------------------------------------------------------------


def _test_metrics_callback(x, y, batch_size=512):
    import tensorflow as tf  # noqa: PLC0415

    class TestMetrics(tf.keras.callbacks.Callback):
        """Adds test_loss / test_accuracy to each epoch's logs (before History and TensorBoard)."""

        def on_epoch_end(self, epoch, logs=None):
            result = self.model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
            if logs is not None:
                logs["test_loss"] = float(result["loss"])
                logs["test_accuracy"] = float(result["accuracy"])

    return TestMetrics()


def _prepare_out(out):
    """Create --out and check it is a writable folder, before anything is trained."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"--out={out} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise CliError(f"--out={out}: cannot create the output directory: {err.strerror or err}") from None
    for folder in (out, os.path.join(out, "logs"), *(os.path.join(out, "logs", p) for p in LOG_PHASES)):
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            raise CliError(f"--out={out}: {folder} is not writable (permission denied); choose another --out")


def epoch_order(seed, phase, epoch, n):
    """The example order of one epoch: a permutation of ``n`` that depends only on (seed, phase,
    epoch), so that a resumed run sees the same batches as an uninterrupted one. Training draws no
    other random numbers (the demo CNN has no dropout; weights are initialised before the first
    epoch and, on --resume, overwritten from the checkpoint), so the checkpoint needs no RNG state."""
    seed = int(seed)
    return np.random.default_rng([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, phase, int(epoch)]).permutation(n)


def _epochs_dataset(x, y, seed, phase, first, last, batch_size):
    """Batches of epochs ``first`` .. ``last - 1`` of one phase (fit with steps_per_epoch: one
    iterator for the whole run, each epoch in its own :func:`epoch_order`)."""
    import tensorflow as tf  # noqa: PLC0415

    n = len(x)
    orders = np.stack([epoch_order(seed, phase, e, n) for e in range(first, last)]).astype(np.int64)
    xs, ys, orders = tf.constant(x), tf.constant(y), tf.constant(orders)

    def epoch(i):
        return tf.data.Dataset.from_tensor_slices(orders[i]).batch(batch_size)

    return (tf.data.Dataset.range(last - first).flat_map(epoch)
            .map(lambda idx: (tf.gather(xs, idx), tf.gather(ys, idx))).prefetch(tf.data.AUTOTUNE))


def _check_finite_data(x, what):
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise CliError(f"the {what} hold {bad} non-finite value(s) (NaN or Inf) of {np.size(x)}; training on them "
                       "would give a model of NaN weights")


def _variables_state(model):
    """Arrays and (name, shape) list of the model's variables and its optimizer's."""
    arrays, names = {}, []
    groups = (("w", model.weights), ("o", model.optimizer.variables if model.optimizer is not None else []))
    for tag, variables in groups:
        for i, v in enumerate(variables):
            arrays[f"{tag}{i}"] = v.numpy()
            names.append([tag, v.name, list(v.shape)])
    return arrays, names


def _restore_variables(model, arrays, names, path):
    model.optimizer.build(model.trainable_variables)
    groups = {"w": list(model.weights), "o": list(model.optimizer.variables)}
    expected = [[tag, v.name, list(v.shape)] for tag in ("w", "o") for v in groups[tag]]
    if [[t, s] for t, _, s in expected] != [[t, s] for t, _, s in names]:
        raise CliError(f"{path}: the checkpoint's variables do not match the model built from the flags "
                       f"({len(names)} saved, {len(expected)} in the model); was it written by another version?")
    for tag, variables in groups.items():
        for i, v in enumerate(variables):
            v.assign(arrays[f"{tag}{i}"])


def _write_checkpoint(path, state, arrays):
    import io  # noqa: PLC0415

    from syq_tf import files  # noqa: PLC0415

    buffer = io.BytesIO()
    np.savez(buffer, state=np.frombuffer(json.dumps(state).encode(), np.uint8), **arrays)
    files.write_atomic(path, buffer.getvalue())


def _read_checkpoint(path):
    if not os.path.isfile(path):
        raise CliError(f"--resume: no {CHECKPOINT} in {os.path.dirname(path) or '.'} (nothing to resume: the run "
                       "finished, or never completed an epoch)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        state = json.loads(arrays.pop("state").tobytes().decode())
        if state.get("version") != 1:
            raise ValueError(f"unknown checkpoint version {state.get('version')!r}")
    except Exception as err:  # noqa: BLE001
        raise CliError(f"{path}: cannot read the checkpoint: {type(err).__name__}: {err}") from None
    return state, arrays


def _adopt_checkpoint_flags(fv, saved):
    """--resume: flags not given take the checkpoint's values; given ones must match them."""
    differ = []
    for name, value in saved.items():
        if name in RESUME_FREE or name not in fv:
            continue
        if fv[name].value != value:
            if fv[name].present:
                differ.append(f"--{name}={_flag_text(fv[name].value)} (checkpoint: {_flag_text(value)})")
            else:
                setattr(fv, name, value)
    if differ:
        raise CliError("--resume: flags differ from the interrupted run's: " + ", ".join(differ)
                       + "; leave them out (or start a new run without --resume)", USAGE_ERROR)


def _flag_text(value):
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _event_files(logs):
    found = []
    for phase in LOG_PHASES:
        for root, _, names in os.walk(os.path.join(logs, phase)):
            found.extend(os.path.join(root, n) for n in names if n.startswith("events.out.tfevents"))
    return sorted(found)


def _train(fv):
    from syq_tf import files  # noqa: PLC0415

    out = fv.out
    _prepare_out(out)
    try:
        with files.lock_folder(out, f"another {PROG} train"):
            return _train_locked(fv, out)
    except files.FolderLocked as err:
        raise CliError(f"--out={err}") from None
    except PermissionError as err:
        if err.filename and os.path.dirname(str(err.filename)) == out.rstrip(os.sep):
            raise CliError(f"--out={out} is not writable ({err.strerror}); choose another --out") from None
        raise


def _train_locked(fv, out):
    import tensorflow as tf  # noqa: PLC0415

    import syq_tf  # noqa: PLC0415
    from syq_tf import files, recipes  # noqa: PLC0415

    started = time.time()
    files.clean_stale(out)  # temporary files of a killed earlier run
    checkpoint_path = os.path.join(out, CHECKPOINT)
    state = arrays = None
    if fv.resume:
        state, arrays = _read_checkpoint(checkpoint_path)
        _adopt_checkpoint_flags(fv, state["config"])
    elif os.path.exists(checkpoint_path):  # an interrupted earlier run's: this run starts afresh
        print(f"note: {checkpoint_path} of an interrupted run is discarded (--resume continues it instead)",
              flush=True)
        files.remove_files([checkpoint_path])
    widths = _widths(fv.widths)
    logs = os.path.join(out, "logs")
    tf.keras.utils.set_random_seed(fv.seed)
    shape, classes = dataset_shape(fv.dataset, fv.data_dir)
    x_train, y_train = load_dataset(fv.dataset, "train", fv.train_limit, fv.seed, shape, classes, fv.data_dir)
    x_test, y_test = load_dataset(fv.dataset, "test", fv.test_limit, fv.seed, shape, classes, fv.data_dir)
    _check_finite_data(x_train, f"training images (--dataset {fv.dataset})")
    _check_finite_data(x_test, f"test images (--dataset {fv.dataset})")
    steps = math.ceil(len(x_train) / fv.batch_size)
    quantized = fv.method != "float"
    options = _options(fv)
    label = recipes.method_label(fv.method if quantized else None, fv.bits, fv.act_bits, fv.granularity, **options)
    bits = recipes.effective_bits(fv.method, fv.bits, fv.la_mode) if quantized else 32
    float_epochs = fv.float_epochs + (0 if quantized else fv.epochs)
    config = {name: fv[name].value for name in COMMANDS["train"].order if name not in ("debug", "resume")}
    if state is None:
        state = {"version": 1, "config": config, "phase": "float", "epoch": 0, "history": {}, "seconds": {},
                 "earlier_logs": _event_files(logs), "float_test": None}
    before = state["seconds"].get("total_before", 0.0)  # spent by the interrupted run(s), up to their checkpoint

    def data(phase, first, last):
        return _epochs_dataset(x_train, y_train, fv.seed, phase, first, last, fv.batch_size)

    class Checkpoint(tf.keras.callbacks.Callback):
        """Records the epoch's logs and writes checkpoint.npz (atomically) at the end of every epoch."""

        def __init__(self, phase, t0):
            super().__init__()
            self.phase, self.t0, self.spent = phase, t0, state["seconds"].get(phase, 0.0)

        def on_epoch_end(self, epoch, logs=None):
            history = state["history"].setdefault(self.phase, {})
            for key, value in (logs or {}).items():
                history.setdefault(key, []).append(float(value))
            state["phase"], state["epoch"] = self.phase, epoch + 1
            state["seconds"][self.phase] = self.spent + time.time() - self.t0
            state["seconds"]["total_before"] = before + time.time() - started
            saved, state["variables"] = _variables_state(self.model)
            _write_checkpoint(checkpoint_path, state, saved)

    def callbacks(phase):
        return [_test_metrics_callback(x_test, y_test),
                tf.keras.callbacks.TensorBoard(os.path.join(logs, phase), histogram_freq=0, write_graph=False,
                                               profile_batch=0)]

    def fit(model, phase, phase_index, epochs, extra=()):
        first = state["epoch"] if state["phase"] == phase else 0
        if first >= epochs:
            return
        if first:
            print(f"   resuming at epoch {first + 1} of {epochs} (from {checkpoint_path})", flush=True)
        model.fit(data(phase_index, first, epochs), epochs=epochs, initial_epoch=first, steps_per_epoch=steps,
                  verbose=fv.verbose, callbacks=[*callbacks(phase), *extra, Checkpoint(phase, time.time())])

    def restore(model):
        _restore_variables(model, arrays, state["variables"], checkpoint_path)

    float_model = recipes.build_cnn(None, widths=widths, input_shape=shape, classes=classes)
    recipes.compile_model(float_model, fv.float_lr)
    in_float = state["phase"] == "float"
    if in_float:
        print(f"== float training: {float_epochs} epoch(s) on {len(x_train)} {fv.dataset} images", flush=True)
        if state["epoch"]:
            restore(float_model)
        fit(float_model, "float", 0, float_epochs)
        float_loss, float_acc = float_model.evaluate(x_test, y_test, batch_size=512, verbose=0)
        state["float_test"] = [float(float_loss), float(float_acc)]
    float_loss, float_acc = state["float_test"]
    model, test_loss, test_acc = float_model, float_loss, float_acc
    if quantized:
        print(f"== {label} fine-tuning: {fv.epochs} epoch(s), scales initialised from the float weights",
              flush=True)
        model = recipes.build_cnn(bits, fv.granularity, fv.act_bits, method=fv.method, widths=widths,
                                  input_shape=shape, classes=classes, **options)
        if in_float:
            # the float phase's checkpoint: a run interrupted before the first quantized epoch ends
            # resumes here (the float weights are saved with phase 'quantized', epoch 0)
            saved, state["variables"] = _variables_state(float_model)
            state["phase"], state["epoch"] = "quantized", 0
            state["seconds"]["total_before"] = before + time.time() - started
            _write_checkpoint(checkpoint_path, state, saved)
        elif state["epoch"] == 0:
            restore(float_model)
        if state["epoch"] == 0:
            calibration = data(2, 0, 1)
            recipes.prepare_finetune(model, float_model, calibration, lr=fv.lr, method=fv.method,
                                     fit_ranges=fv.fit_ranges)
        else:
            recipes.compile_model(model, fv.lr, fv.method)
            restore(model)
        fit(model, "quantized", 1, fv.epochs, [syq_tf.QuantizerLogger(os.path.join(logs, "quantizers"))])
        test_loss, test_acc = model.evaluate(x_test, y_test, batch_size=512, verbose=0)

    print()
    rows = syq_tf.summary(model)
    syq_tf.save_model(model, os.path.join(out, MODEL_FILE))
    written = {"model": MODEL_FILE, "metrics": "metrics.json", "logs": "logs", "training": "training.png"}
    if quantized:
        with files.atomic_path(os.path.join(out, "codebooks.png"), keep_extension=True) as tmp:
            syq_tf.plot_codebooks(model, tmp)
        written["codebooks"] = "codebooks.png"
    seconds = {"float": 0.0, **({"quantized": 0.0} if quantized else {}), **state["seconds"]}
    seconds.pop("total_before", None)
    seconds["total"] = before + time.time() - started
    # files of an earlier run into this --out that this run did not rewrite
    stale = [os.path.join(out, name) for name in TRAIN_OUTPUTS if name not in written.values()]
    stale = [p for p in stale if os.path.lexists(p)] + [p for p in state["earlier_logs"] if os.path.lexists(p)]
    metrics_config = dict(config, widths=list(widths))
    metrics = {
        "command": "train",
        "label": label,
        "method": fv.method,
        "bits": bits,
        "act_bits": fv.act_bits if quantized else 32,
        "granularity": fv.granularity if fv.method == "syq" else None,
        "dataset": fv.dataset,
        "train_examples": int(len(x_train)),
        "test_examples": int(len(x_test)),
        "history": state["history"],
        "float_test_accuracy": float(float_acc),
        "float_test_loss": float(float_loss),
        "test_accuracy": float(test_acc),
        "test_loss": float(test_loss),
        "params": int(sum(r.params for r in rows)),
        "bytes_at_stored_bits": float(sum(r.bytes for r in rows)),
        "float32_bytes": int(4 * sum(r.params for r in rows)),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "config": metrics_config,
        "files": written,
        "resumed": bool(fv.resume),
        "removed": sorted(os.path.relpath(p, out) for p in stale),
    }
    with files.atomic_path(os.path.join(out, "training.png"), keep_extension=True) as tmp:
        syq_tf.plot_training(metrics, tmp)
    _write_json(os.path.join(out, "metrics.json"), metrics)
    files.remove_files([*stale, checkpoint_path])
    print(f"\nfloat test accuracy: {float_acc:.4f}" + (f"   {label} test accuracy: {test_acc:.4f}" if quantized else ""))
    print(f"{metrics['bytes_at_stored_bits']:.0f} bytes at stored bit widths "
          f"({metrics['float32_bytes'] / max(metrics['bytes_at_stored_bits'], 1e-9):.1f}x smaller than float32); "
          f"{seconds['total']:.1f} s")
    print("wrote: " + ", ".join(os.path.join(out, f) for f in written.values()))
    if stale:
        print("removed (files of an earlier run): " + ", ".join(metrics["removed"]))
    return 0


# ---- export -------------------------------------------------------------------------------------


def _export(fv):
    import syq_tf  # noqa: PLC0415

    model = _load_keras(fv.model, unsafe=fv.unsafe)
    shape, classes = tuple(model.input_shape[1:]), int(model.output_shape[-1])
    if any(d is None for d in shape):
        raise CliError(f"{fv.model}: the model's input shape {shape} is not fully defined")
    x_rep, _ = load_dataset(fv.dataset, "train", fv.representative, fv.seed, shape, classes, fv.data_dir)
    x_ver = y_ver = None
    if fv.verify_limit:
        x_ver, y_ver = load_dataset(fv.dataset, "test", fv.verify_limit, fv.seed, shape, classes, fv.data_dir)
    out = fv.out
    if out is None:
        out = os.path.splitext(fv.model.rstrip("/"))[0] + f"_{fv.target}.tflite"
    elif os.path.isdir(out) or out.endswith(os.sep):
        out = os.path.join(out, f"model_{fv.target}.tflite")
    result = syq_tf.export.to_tflite(model, x_rep, target=fv.target, verify_data=x_ver, verify_labels=y_ver,
                                     require_exact=fv.require_exact, weights=fv.weights,
                                     requantization=fv.requantization)
    path = result.save(out)
    print(result.table())
    stem = os.path.splitext(path)[0]
    written = [p for p in (path, path + ".json", stem + ".h", stem + ".cc") if os.path.exists(p)]
    print("wrote: " + ", ".join(written))
    agreement = (result.verification or {}).get("top1_agreement")
    if fv.min_agreement and agreement is not None and agreement < fv.min_agreement:
        raise CliError(f"the {fv.target} model agrees with Keras on {agreement:.4f} of {len(x_ver)} examples, "
                       f"below --min_agreement={fv.min_agreement}")
    return 0


# ---- inspect ------------------------------------------------------------------------------------


def _is_tflite(path):
    if not os.path.isfile(path):
        return False
    if path.endswith(".tflite"):
        return True
    with open(path, "rb") as f:
        head = f.read(8)
    return path.endswith(".tflite") or head[4:8] == b"TFL3"


def _inspect(path, unsafe=False):
    import stat  # noqa: PLC0415

    if not os.path.exists(path):
        raise CliError(f"{path}: no such file or directory")
    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a named pipe would block the read forever
        raise CliError(f"{path}: not a regular file (a named pipe, device or socket); inspect reads a model "
                       "file or a SavedModel directory")
    if _is_tflite(path):
        return _inspect_tflite(path)
    return _inspect_keras(path, unsafe=unsafe)


def _inspect_read_file(path):
    """The bytes of a regular file of at most flatbuffer.MAX_FILE_BYTES (2 GiB - 1, the flatbuffer
    limit); opened without blocking, so a file replaced by a named pipe after the check fails too."""
    from syq_tf.export import flatbuffer  # noqa: PLC0415
    import stat  # noqa: PLC0415

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CliError(f"{path}: not a regular file (a named pipe, device or socket)")
        if info.st_size > flatbuffer.MAX_FILE_BYTES:
            raise CliError(f"{path}: {info.st_size} bytes, above the TFLite flatbuffer limit of "
                           f"{flatbuffer.MAX_FILE_BYTES} bytes")
        return f.read(flatbuffer.MAX_FILE_BYTES + 1)


def _levels_text(levels, limit=7):
    if len(levels) > limit:
        return f"{len(levels)} distinct"
    return " ".join(f"{v:.4g}" for v in levels)


def keras_codebook_rows(model):
    """Per quantized kernel: layer, quantizer, bits, granularity, subgroups, levels per subgroup
    (max), distinct levels in the kernel, the levels (text)."""
    from syq_tf.plots import kernel_codebook, quantized_kernel_list  # noqa: PLC0415
    from syq_tf.summary import method_name, quantizer_bits  # noqa: PLC0415

    rows = []
    for layer, attr, quantizer, kernel in quantized_kernel_list(model):
        book = kernel_codebook(quantizer, kernel)
        name = layer.name if attr in ("kernel", "depthwise_kernel") else f"{layer.name}/{attr}"
        rows.append({"layer": name, "quantizer": method_name(quantizer), "bits": quantizer_bits(quantizer),
                     "granularity": getattr(quantizer, "granularity", None) or "layer",
                     "subgroups": book["subgroups"], "levels_per_subgroup": book["levels_per_subgroup"],
                     "distinct": int(len(book["levels"])), "levels": _levels_text(book["levels"])})
    return rows


def _inspect_keras(path, unsafe=False):
    import syq_tf  # noqa: PLC0415

    model = _load_keras(path, unsafe=unsafe)
    print(f"{path}: Keras model '{model.name}', input {tuple(model.input_shape[1:])}, "
          f"output {tuple(model.output_shape[1:])}")
    print()
    syq_tf.summary(model)
    rows = keras_codebook_rows(model)
    print()
    if not rows:
        print("codebooks: none (no layer has a kernel quantizer: a float model)")
        return 0
    wl = max([8] + [len(r["layer"]) + 2 for r in rows])
    wq = max([12] + [len(r["quantizer"]) + 2 for r in rows])
    head = (f"{'layer':<{wl}}{'quantizer':<{wq}}{'bits':>5}{'granularity':>13}{'subgroups':>11}"
            f"{'levels/subgroup':>17}{'distinct':>10}  levels")
    print("codebooks (quantizer applied to the float kernel):")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['layer']:<{wl}}{r['quantizer']:<{wq}}{r['bits']:>5}{r['granularity']:>13}{r['subgroups']:>11}"
              f"{r['levels_per_subgroup']:>17}{r['distinct']:>10}  {r['levels']}")
    return 0


def _channel_levels(values, axis):
    """Most distinct values in one slice along ``axis`` (the whole tensor if None)."""
    values = np.asarray(values)
    if axis is None or values.ndim == 0:
        return int(np.unique(values).size)
    groups = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    ordered = np.sort(groups, axis=1)
    return int((1 + np.count_nonzero(np.diff(ordered, axis=1), axis=1)).max())


_DTYPE_BITS = {"INT4": 4, "INT8": 8, "UINT8": 8, "INT16": 16, "INT32": 32, "INT64": 64, "FLOAT32": 32,
               "FLOAT16": 16}


def tflite_weight_rows(buffer):
    """Per constant weight tensor of a .tflite: op, tensor, shape, dtype, channels, levels per channel
    (max), bits = ceil(log2(levels)), weights, stored bytes, bytes at those bits. A malformed file
    raises syq_tf.errors.MalformedModelError (a ValueError), nothing else."""
    from syq_tf.export import flatbuffer  # noqa: PLC0415

    return flatbuffer.reader(_inspect_weight_rows)(buffer)  # noqa: SLF001


def _inspect_weight_rows(buffer):
    from syq_tf.export import flatbuffer  # noqa: PLC0415

    rows = []
    for t in flatbuffer.weight_tensors(buffer):
        axis = int(t.quantized_dimension) if t.scales.size > 1 else None
        levels = _channel_levels(t.values, axis)
        count = int(t.values.size)
        bits = min(max(1, math.ceil(math.log2(max(levels, 1)))), _DTYPE_BITS.get(t.dtype, 32))
        rows.append({"op": t.op, "tensor": t.name, "shape": tuple(int(s) for s in t.values.shape),
                     "dtype": t.dtype, "channels": 1 if axis is None else int(t.values.shape[axis]),
                     "levels": levels, "bits": bits, "weights": count,
                     "stored_bytes": int(getattr(t, "stored_bytes", 0) or t.values.nbytes),
                     "packed_bytes": math.ceil(bits * count / 8)})
    if DECODE_OP in flatbuffer.op_names(buffer):
        rows.extend(_tflm_rows(buffer))
    return rows



def _tflm_rows(buffer):
    """TFLM LUT-compressed weights (DECODE op inputs): stored = packed indices + value tables."""
    from syq_tf.export import flatbuffer, tflm  # noqa: PLC0415

    rows, budget = [], flatbuffer.data_budget(buffer)
    for name, (encoded, ancillary, shape) in tflm.decode_pairs(buffer).items():
        budget -= math.prod(shape)
        if budget < 0:  # decoded values: bounded like the int8 weights the other readers copy
            raise flatbuffer.MalformedModelError(
                f"{DECODE_OP} output {name!r} of shape {tuple(shape)}: the decoded weights exceed "
                f"{flatbuffer.data_budget(buffer)} values (4 x the file size + 64 MiB)")
        values = tflm.unpack(encoded, ancillary, shape)
        axis_code, bits = ancillary[5] >> 4, ancillary[5] & 7
        axis = None if axis_code == 15 else int(axis_code)
        count = int(values.size)
        rows.append({"op": DECODE_OP, "tensor": name, "shape": tuple(shape), "dtype": f"LUT{bits}",
                     "channels": 1 if axis is None else int(values.shape[axis]),
                     "levels": _channel_levels(values, axis), "bits": int(bits), "weights": count,
                     "stored_bytes": len(encoded) + len(ancillary), "packed_bytes": math.ceil(bits * count / 8)})
    return rows


def _inspect_tflite(path):
    from syq_tf.export import flatbuffer  # noqa: PLC0415

    buffer = _inspect_read_file(path)
    try:
        ops = flatbuffer.op_names(buffer)
        rows = tflite_weight_rows(buffer)
    except flatbuffer.MalformedModelError as err:
        raise CliError(f"{path}: {err}") from None
    counts = collections.Counter(ops)
    print(f"{path}: TFLite model, {len(buffer)} bytes, {len(ops)} ops: "
          + ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())))
    print()
    if not rows:
        print("no constant weight tensors of CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED / TRANSPOSE_CONV / LSTM "
              "ops found")
        return 0
    wt = min(44, max([8] + [len(r["tensor"]) + 2 for r in rows]))
    wo = max([6] + [len(r["op"]) + 2 for r in rows])
    head = (f"{'op':<{wo}}{'tensor':<{wt}}{'shape':<18}{'dtype':<8}{'channels':>9}{'levels':>7}{'bits':>5}"
            f"{'weights':>9}{'stored B':>10}{'at bits B':>11}{'ratio':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        name = r["tensor"] if len(r["tensor"]) < wt - 1 else r["tensor"][: wt - 4] + "..."
        shape = "x".join(str(s) for s in r["shape"])
        ratio = r["stored_bytes"] / max(r["packed_bytes"], 1)
        print(f"{r['op']:<{wo}}{name:<{wt}}{shape:<18}{r['dtype']:<8}{r['channels']:>9}{r['levels']:>7}"
              f"{r['bits']:>5}{r['weights']:>9}{r['stored_bytes']:>10}{r['packed_bytes']:>11}{ratio:>6.1f}x")
    weights = sum(r["weights"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    packed = sum(r["packed_bytes"] for r in rows)
    print("-" * len(head))
    print(f"total: {weights} weights; stored {stored} bytes, {packed} bytes at their bits "
          f"(ratio = stored / at bits: {stored / max(packed, 1):.2f}x); float32 would be {4 * weights} bytes "
          f"({4 * weights / max(packed, 1):.1f}x the bytes at their bits)")
    return 0


# ---- bench --------------------------------------------------------------------------------------


def default_bench_script():
    import syq_tf  # noqa: PLC0415

    return Path(syq_tf.__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


def _bench(fv, extra):
    script = Path(fv.script) if fv.script else default_bench_script()
    if not script.is_file():
        raise CliError(f"the benchmark script {script} is not there: `{PROG} bench` runs benchmarks/accuracy.py "
                       "of the source tree (a git checkout installed with `pip install -e .`)")
    command = [sys.executable, str(script)]
    command += ["--quick"] if fv.quick else []
    command += ["--out", fv.out] if fv.out else []
    command += ["--rows", fv.rows] if fv.rows else []
    command += list(extra)
    print("running: " + " ".join(command), flush=True)
    status = subprocess.call(command)
    if status:
        raise CliError(f"{script.name} exited with status {status}", status if 0 < status < 128 else RUNTIME_ERROR)
    return 0



if __name__ == "__main__":  # python -m syq_tf.cli (the same as the syq-tf console script)
    run()
